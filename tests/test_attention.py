"""The attention implementations (`model.attention`) against the einsum reference on CPU.

xla is jax.nn.dot_product_attention's own path; splash is the TPU kernel run in Pallas interpret
mode (the same kernel code XLA:TPU compiles: tests/test_aot.py checks that it does). cudnn needs an
NVIDIA GPU and is only checked for its refusal here.

Tolerance: float32 everywhere, so the kernels differ from the reference only in summation order
(splash: blockwise online softmax) and in where the 1/sqrt(hd) scale is applied (splash scales q
before the dot); 1e-5 relative on logits, 1e-4 on gradients (the backward adds a recomputation).
Compared at the real positions: the kernels see a left-padding query's row differently (module
docstring of nla_jax/models/attention.py), and nothing reads those rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nla_jax import configlib, sampling, sharding
from nla_jax.errors import UserError
from nla_jax.models import attention as attention_lib
from nla_jax.models import transformer as T
from nla_jax.models.config import ModelConfig
from nla_jax.nla import run as run_lib

KERNELS = ("xla", "splash")


def _batch(cfg, lengths=(40, 17, 64, 1), seed=0):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]
    toks, valid = sampling.pad_prompts(rows, cfg.pad_id)
    return jnp.asarray(toks), jnp.asarray(valid)


def _rel_err(a, b, where) -> float:
    a, b, w = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(where)
    return float(np.abs(a - b)[w].max() / np.abs(b)[w].max())


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma3"])
def family(request):
    """Each tiny family; gemma3 has sliding and full blocks mixed in one scan (window 4)."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.mark.parametrize("impl", KERNELS)
def test_forward_matches_reference(family, impl):
    cfg, params, _ = family
    toks, valid = _batch(cfg)
    want = T.forward(params, toks, cfg, valid=valid, capture_layer=0)
    got = jax.jit(lambda p, t, v: T.forward(p, t, cfg.replace(attention=impl), valid=v, capture_layer=0))(
        params, toks, valid)
    assert _rel_err(got["logits"], want["logits"], valid) <= 1e-5
    assert _rel_err(got["hidden"], want["hidden"], valid) <= 1e-5
    assert np.isfinite(np.asarray(got["logits"])).all()          # padding rows stay finite too


def test_splash_really_runs_and_pads_to_its_block(tiny_llama, monkeypatch):
    """The kernel is called (not the einsum fallback) on a sequence that is not a multiple of 128."""
    cfg, params, _ = tiny_llama
    seen = []
    real = attention_lib._splash_local
    monkeypatch.setattr(attention_lib, "_splash_local", lambda q, *a: (seen.append(q.shape), real(q, *a))[1])
    toks, valid = _batch(cfg, lengths=(130, 7))
    T.forward(params, toks, cfg.replace(attention="splash"), valid=valid)
    assert seen and all(shape[2] == 256 for shape in seen)        # 130 tokens padded to 2 x 128


@pytest.mark.parametrize("impl", KERNELS)
def test_gradients_match_reference(tiny_gemma3, impl):
    cfg, params, _ = tiny_gemma3
    toks, valid = _batch(cfg)
    weights = jax.random.normal(jax.random.key(0), toks.shape + (cfg.vocab_size,)) * valid[..., None]

    def loss(p, c):
        return jnp.sum(T.forward(p, toks, c, valid=valid, remat="minimal")["logits"] * weights)

    want = jax.grad(loss)(params, cfg)
    got = jax.jit(jax.grad(lambda p: loss(p, cfg.replace(attention=impl))))(params)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        err = np.abs(np.asarray(g) - np.asarray(w)).max() / np.abs(np.asarray(w)).max()
        assert err <= 1e-4, (jax.tree_util.keystr(path), err)


def test_grouped_prompt_runs_the_kernel_and_matches(tiny_qwen2):
    """GRPO's grouped forward: the shared prompt's self-attention takes the kernel, the completions
    (queries offset against the prompt's keys) keep the dense mask; logits equal the reference."""
    cfg, params, _ = tiny_qwen2
    prompt, valid = _batch(cfg, lengths=(12, 5))
    completion = jax.random.randint(jax.random.key(1), (6, 9), 3, cfg.vocab_size)
    want = T.forward_grouped(params, prompt, valid, completion, cfg, group=3)
    got = T.forward_grouped(params, prompt, valid, completion, cfg.replace(attention="splash"), group=3)
    assert _rel_err(got, want, np.ones(want.shape[:2], bool)) <= 1e-5


def test_decode_with_a_kv_cache_keeps_the_reference(tiny_llama):
    """The sampler's one-query decode cannot use the self-attention kernel: same greedy ids."""
    cfg, params, _ = tiny_llama
    toks, valid = _batch(cfg, lengths=(9, 4))
    sc = sampling.SampleConfig(max_new_tokens=6, greedy=True)
    run = lambda c: sampling.sample(params, toks, valid, jax.random.key(0), cfg=c, sc=sc)
    np.testing.assert_array_equal(np.asarray(run(cfg.replace(attention="splash")).tokens),
                                  np.asarray(run(cfg).tokens))


def test_unknown_or_misplaced_implementation_is_one_line():
    with pytest.raises(UserError, match="attention='flash'"):
        ModelConfig(family="llama", n_layers=1, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8,
                    vocab_size=16, attention="flash")
    cfg = configlib.get("configs/tiny.py:llama")
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg.model.attention = "cudnn"
    with pytest.raises(UserError, match="model.attention=cudnn needs NVIDIA GPUs; this mesh is on cpu"):
        run_lib.attention_impl(cfg, mesh)
    cfg.model.attention = "nope"
    with pytest.raises(UserError, match="model.attention='nope': expected one of einsum, xla, cudnn, splash"):
        run_lib.attention_impl(cfg, mesh)
    cfg.model.attention = "splash"               # CPU: interpret mode, allowed (the tests above use it)
    assert run_lib.attention_impl(cfg, mesh) == "splash"


def test_tpu_variants_attend_with_splash():
    for name, variant in [("qwen2_5_0_5b.py", "v5e8"), ("qwen2_5_7b.py", "v5p8"), ("llama3_3_70b.py", "v5p64"),
                          ("gemma3_12b.py", "v5p16")]:
        assert configlib.get(f"configs/{name}:{variant}").model.attention == "splash", name
        assert configlib.get(f"configs/{name}").model.attention == "einsum", name
