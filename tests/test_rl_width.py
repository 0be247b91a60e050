"""The RL update run only as wide as its rollouts (train.text_bucket), not at the explanation cap.

A rollout's tokens after a row's length are padding: the AV's teacher-forced passes are causal and
masked to the sampled tokens, and the AR reads at the end of its suffix, which follows the
explanation wherever it ends. So the update on the first `width` tokens (width >= every row's
length) must take the same step as at the cap: the same losses, rewards, metrics and updated
parameters up to float summation order. And the trainer's split path (rollout, then an update per
width) must log what the one-function step logs.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nla_jax import configlib
from nla_jax.nla import av as av_lib
from nla_jax.nla import run as run_lib
from nla_jax.nla import state as state_lib
from test_mixed_precision import _stats
from test_train import RL_ONLY, _records, _train, store  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
METRICS = ("av_loss", "ar_loss", "reward_mean", "reward_std", "kl", "clip_frac", "entropy", "expl_len",
           "sampled_len", "extract_fail", "mse_nrm", "grad_norm_av", "grad_norm_ar", "logprob_gap")


def _run() -> run_lib.Run:
    cfg = configlib.get(TINY, ["mesh.shape=(1,1,1)", "av.closer=8", "rl.optim_av.warmup=0",
                               "rl.optim_ar.warmup=0", "rl.beta=0.05"])
    return run_lib.build(cfg, store=False, stats=_stats(64))


def _rollout(run, n: int, rng) -> dict:
    """Sampled-looking rows of lengths 5..12 (cap 24): most close with the closer then EOS, some end
    with EOS unclosed (a failure that is still short), every token after a row's length is padding."""
    spec = run.ctx.av
    cap = spec.max_len
    avoid = {spec.eos, run.model_cfg.pad_id, *spec.closer}
    vocab = np.array([t for t in range(32, 127) if t not in avoid], np.int32)
    tokens = np.full((n, cap), run.model_cfg.pad_id, np.int32)
    lengths = rng.integers(5, 13, n).astype(np.int32)
    for i, length in enumerate(lengths):
        body = rng.choice(vocab, length - 1)
        if i % 3:                                           # closed: ... closer EOS
            body[-len(spec.closer):] = spec.closer
        tokens[i, :length - 1], tokens[i, length - 1] = body, spec.eos
    expl_len, ok = av_lib.explanation_span(jnp.asarray(tokens), jnp.asarray(lengths), spec)
    assert bool(ok.any()) and not bool(ok.all()), "the rollout must mix closed and failed rows"
    return {"tokens": jnp.asarray(tokens), "lengths": jnp.asarray(lengths), "expl_len": expl_len, "ok": ok,
            "logprobs": jnp.asarray(rng.normal(size=(n, cap)) * 0.1, jnp.float32),
            "widest": jnp.int32(lengths.max())}


def test_a_narrow_update_takes_the_cap_width_step():
    run = _run()
    rng = np.random.default_rng(0)
    B, G, d = 2, run.cfg.rl.group_size, run.model_cfg.d_model
    batch = {"acts": jnp.asarray(rng.normal(size=(B, d)) * 10, jnp.float32)}
    roll = _rollout(run, B * G, rng)
    width, cap = int(roll["widest"]), run.ctx.av.max_len
    assert width < cap and width < run.ctx.ar.max_len, "the rollout must leave padding to trim"
    layout = state_lib.rl(run)

    def step(w):
        state = state_lib.fresh(run, layout)
        ref = state_lib.frozen_reference(run, jax.tree.map(jnp.copy, state["av"]))
        fn = state_lib.rl_update(run, layout, jax.tree.map(lambda a: a.sharding, ref), w)
        state, m = fn(state, ref, batch, roll, run.mean)
        return jax.device_get(m), jax.tree.map(np.asarray, {"av": state["av"], "ar": state["ar"]})

    full_m, full_p = step(cap)
    narrow_m, narrow_p = step(width)
    assert float(full_m["reward_std"]) > 0 and float(full_m["grad_norm_av"]) > 0   # a step that moves
    for k in METRICS:
        # av_loss is a token mean of -advantage * ratio whose O(1) terms nearly cancel (advantages sum
        # to ~0 per group; here ~0.008 from terms of ~1): float32 summation in another order moves it
        # by ~1e-6 absolute, so it gets an absolute tolerance of that size, the rest a relative one.
        assert float(narrow_m[k]) == pytest.approx(float(full_m[k]), rel=1e-5, abs=2e-6 if k == "av_loss" else 1e-7), k
    p0 = jax.tree.map(np.asarray, state_lib.fresh(run, layout))
    moves = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(full_p), jax.tree.leaves({"av": p0["av"], "ar": p0["ar"]}))]
    diffs = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(full_p), jax.tree.leaves(narrow_p))]
    # Adam's first step moves each element by ~lr * g / |g| wherever its gradient is not 0, so an
    # element whose gradient is at rounding level may move by a visible fraction of lr either way:
    # the two steps must agree to 1% of the largest move (measured: 4e-7 of 1e-4).
    assert max(moves) > 0 and max(diffs) <= 0.01 * max(moves), (max(diffs), max(moves))


@pytest.mark.timeout(600)
def test_trainer_split_rollout_and_update_logs_what_the_one_function_step_logs(store, tmp_path):
    """RL on the tiny store with text_bucket=0 (one compiled step) and text_bucket=4 (rollout, then an
    update per width): the same rollouts (same keys) and the same losses and metrics at every step.
    The random tiny model rarely samples EOS, so its rollouts run to the cap and this checks the split
    path itself; narrower widths are the test above."""
    args = (*RL_ONLY, "--config.rl.steps=3")
    logs = {}
    for bucket in (0, 4):
        wd = str(tmp_path / f"b{bucket}")
        r = _train(store, wd, *args, f"--config.train.text_bucket={bucket}")
        assert r.returncode == 0, r.stderr[-3000:]
        logs[bucket] = _records(wd, "rl")
    one, split = logs[0], logs[4]
    assert sorted(one) == sorted(split) == [1, 2, 3]
    for step in one:
        a, b = one[step], split[step]
        assert "text_width" not in a and b["text_width"] % 4 == 0 and b["sampled_len"] <= b["text_width"] <= 24
        for k in METRICS:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (step, k)
