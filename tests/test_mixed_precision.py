"""Mixed precision: float32 master weights and optimizer state, forward passes in model.dtype.

The point of float32 masters: an AdamW step at an actor learning rate (1e-6) moves each weight by
about the learning rate, far below bfloat16's resolution for weights of size ~0.02 (half an ulp is
2^-9 of the value, ~4e-5), so a bf16-only update rounds away while the float32 masters move.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nla_jax import configlib
from nla_jax.nla import run as run_lib
from nla_jax.nla import state as state_lib
from nla_jax.nla import stats as stats_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
LR = 1e-6


def _stats(d: int) -> stats_lib.ActStats:
    """Statistics of a made-up dataset (the step only needs the mean and Var(v_nrm))."""
    mean = tuple(float(x) for x in np.random.default_rng(0).normal(size=d))
    return stats_lib.ActStats(d=d, mean=mean, mean_norm=8.0, var_nrm=0.5, var_nrm_centered=0.9, floor_fve=-0.1,
                              floor_fve_centered=0.0, rows=100, mean_nrm=mean, mean_nrm_centered=mean)


def _run(dtype: str, weight_dtype: str) -> run_lib.Run:
    cfg = configlib.get(TINY, [f"model.dtype={dtype}", f"model.weight_dtype={weight_dtype}",
                               f"sft_ar.optim.lr={LR}", f"sft_ar.optim.lr_head={LR}", "sft_ar.optim.warmup=0",
                               "sft_ar.optim.weight_decay=0.0", "mesh.shape=(1,1,1)"])
    return run_lib.build(cfg, store=False, stats=_stats(64))


def _one_sft_ar_step(run: run_lib.Run) -> tuple[dict, dict]:
    """(AR params before, after) one SFT-AR step on a fixed random batch."""
    layout = state_lib.sft_ar(run)
    state = state_lib.fresh(run, layout)
    before = jax.tree.map(np.asarray, state["ar"])
    rng = np.random.default_rng(1)
    b, m = 8, run.ctx.ar.max_len
    batch = {"acts": jnp.asarray(rng.normal(size=(b, 64)) * 10, jnp.float32),
             "expl": jnp.asarray(rng.integers(3, 500, (b, m)), jnp.int32),
             "expl_len": jnp.asarray(rng.integers(4, m, b), jnp.int32)}
    step = state_lib.sft_step(run, layout)
    state, metrics = step(state, batch, run.mean)
    assert bool(metrics["finite"])
    return before, jax.tree.map(np.asarray, state["ar"])


def _changed_fraction(before: dict, after: dict) -> float:
    """Fraction of the transformer-block weights that moved."""
    moved = total = 0
    for k, w in before["layers"].items():
        if k.endswith("norm"):
            continue
        moved += int((after["layers"][k] != w).sum())
        total += w.size
    return moved / total


def test_float32_masters_take_an_lr_1e6_step_that_bf16_weights_round_away():
    mixed = _run("bfloat16", "float32")
    assert mixed.ctx.compute_dtype == jnp.bfloat16
    before, after = _one_sft_ar_step(mixed)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(after))
    moved_mixed = _changed_fraction(before, after)

    bf16_only = _run("bfloat16", "bfloat16")
    assert bf16_only.ctx.compute_dtype is None        # weights already in the compute dtype
    before16, after16 = _one_sft_ar_step(bf16_only)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(after16["layers"]))
    moved_bf16 = _changed_fraction(before16, after16)
    # Adam moves every trained weight by ~LR; only weights within ~2e-4 of zero (about 1% of an
    # N(0, 0.02) init) have a bf16 half-ulp below that.
    assert moved_mixed > 0.95, moved_mixed
    assert moved_bf16 < 0.05, moved_bf16


def test_float32_configs_compile_the_programs_they_did():
    """weight_dtype == dtype: no cast anywhere (ctx.compute_dtype None), so CPU runs are unchanged."""
    run = _run("float32", "float32")
    assert run.ctx.compute_dtype is None
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(run.target))


def test_bf16_compute_runs_the_forward_in_bf16():
    """The loss's matmuls see bf16 operands (the cast happens inside the step), the gradient arrives
    in float32 for the masters."""
    from nla_jax.nla import steps
    run = _run("bfloat16", "float32")
    ar = state_lib.init_ar(run, run.target)
    b, m = 2, run.ctx.ar.max_len
    expl = jnp.zeros((b, m), jnp.int32)
    lens = jnp.full((b,), 4, jnp.int32)
    acts = jnp.ones((b, 64), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda p: steps.ar_mse(p, run.ctx, expl, lens, acts, run.mean).mean())(ar))
    assert "bf16" in jaxpr and "dot_general" in jaxpr
    grads = jax.grad(lambda p: steps.ar_mse(p, run.ctx, expl, lens, acts, run.mean).mean())(ar)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("saved", [{"dtype": "bfloat16"}, {"dtype": "float32", "weight_dtype": "bfloat16"}])
def test_weight_dtype_of_configs_saved_before_the_key(saved):
    """A checkpoint's saved config without model.weight_dtype held its parameters in model.dtype."""
    import ml_collections
    from nla_jax import weights
    section = ml_collections.ConfigDict(saved)
    assert weights.weight_dtype_name(section) == saved.get("weight_dtype", saved["dtype"])


@pytest.mark.timeout(900)
def test_inference_reads_the_pair_in_the_compute_dtype(tmp_path_factory):
    """A bf16-compute pair trained with float32 masters is read for inference (evaluate, explain)
    as bf16, cast while restoring: half the memory, and the values the trainer's forward passes
    used (they cast the masters the same way). Export reads the masters as saved. The AV's input
    projection and the AR's head are float32 in training whatever model.dtype is, and stay so."""
    from _tiny_run import trained_workdir
    from nla_jax.errors import UserError
    from nla_jax.nla import workdir as workdir_lib
    wd = trained_workdir(tmp_path_factory, "--config.model.dtype=bfloat16", "--config.av.input_proj=True")
    held = workdir_lib.load_pair_here(wd, with_target=False, dtype="weight")
    comp = workdir_lib.load_pair_here(wd, with_target=False)           # dtype="compute" by default
    for part in ("av", "ar"):
        for (path, w), (_, c) in zip(jax.tree_util.tree_leaves_with_path(getattr(held, part)),
                                     jax.tree_util.tree_leaves_with_path(getattr(comp, part))):
            name = part + jax.tree_util.keystr(path)
            f32_by_design = "'extra'" in name or "'head'" in name
            assert w.dtype == jnp.float32, name
            assert c.dtype == (jnp.float32 if f32_by_design else jnp.bfloat16), name
            np.testing.assert_array_equal(np.asarray(c), np.asarray(w.astype(c.dtype)), err_msg=name)
    assert any(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(comp.av["model"]))
    with pytest.raises(UserError, match="dtype 'int7'"):
        workdir_lib.load_pair_here(wd, with_target=False, dtype="int7")
