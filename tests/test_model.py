"""The transformer against an independent float64 NumPy reference, plus padding and overrides."""
from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nla_jax import sampling
from nla_jax.models import transformer as T
from numpy_reference import reference_forward, rel_err

# float32 model vs float64 reference; accumulated rounding over 30 blocks stays ~1e-5.
TOL = 1e-4

fwd = jax.jit(T.forward, static_argnames=("cfg", "capture_layer", "logits", "remat"))


def _tokens(cfg, n: int, seed: int) -> np.ndarray:
    # avoid ids 0..2 (pad / bos / eos in the tiny config) so nothing special is implied
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, size=n).astype(np.int32)


# ----------------------------------------------------------------------------- reference parity

def test_tiny_matches_reference(tiny):
    cfg, params, _ = tiny
    toks = _tokens(cfg, 13, seed=1)
    ref = reference_forward(params, toks, cfg)
    out = fwd(params, jnp.asarray(toks[None]), cfg=cfg)
    assert out["logits"].shape == (1, 13, cfg.vocab_size)
    assert out["logits"].dtype == jnp.float32
    assert rel_err(out["logits"][0], ref["logits"]) <= TOL


def test_tiny_capture_layer_matches_reference_blocks(tiny):
    cfg, params, _ = tiny
    toks = jnp.asarray(_tokens(cfg, 9, seed=2)[None])
    ref = reference_forward(params, np.asarray(toks[0]), cfg)
    # the blocks really differ, so matching block K is not an accident of the convention
    assert rel_err(ref["hidden"][0], ref["hidden"][1]) > 0.05
    for K in range(cfg.n_layers):
        out = fwd(params, toks, cfg=cfg, capture_layer=K)
        assert rel_err(out["hidden"][0], ref["hidden"][K]) <= TOL
        assert rel_err(out["logits"][0], ref["logits"]) <= TOL
        only = fwd(params, toks, cfg=cfg, capture_layer=K, logits=False)
        assert set(only) == {"hidden"}
        np.testing.assert_allclose(only["hidden"], out["hidden"], rtol=1e-6, atol=1e-6)


def test_real_matches_reference(real):
    cfg, params, tok = real
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital of"
    ids = tok.encode(text)
    ids = np.asarray([tok.bos_id] + ids[:23], np.int32)
    assert len(ids) == 24
    ref = reference_forward(params, ids, cfg)
    last = cfg.n_layers - 1
    out = fwd(params, jnp.asarray(ids[None]), cfg=cfg, capture_layer=0)
    assert rel_err(out["logits"][0], ref["logits"]) <= TOL
    assert rel_err(out["hidden"][0], ref["hidden"][0]) <= TOL
    out_last = fwd(params, jnp.asarray(ids[None]), cfg=cfg, capture_layer=last, logits=False)
    assert set(out_last) == {"hidden"}
    assert rel_err(out_last["hidden"][0], ref["hidden"][last]) <= TOL
    # neighbouring blocks are far apart: an off-by-one in the layer index would fail above
    assert rel_err(ref["hidden"][last - 1], ref["hidden"][last]) > 0.01
    assert rel_err(ref["hidden"][0], ref["hidden"][1]) > 0.01
    # the model predicts text sensibly: after "Paris is the capital of" comes " France"
    pos = len(tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of"))
    assert ids[pos + 1] == tok.encode(" France")[0]
    assert int(np.argmax(ref["logits"][pos])) == ids[pos + 1]


def test_capture_layer_out_of_range(tiny_llama):
    cfg, params, _ = tiny_llama
    toks = jnp.asarray(_tokens(cfg, 4, seed=3)[None])
    for bad in (-1, cfg.n_layers):
        with pytest.raises(ValueError, match="capture_layer"):
            T.forward(params, toks, cfg, capture_layer=bad)


def test_run_blocks_compose_and_remat(tiny_qwen2):
    cfg, params, _ = tiny_qwen2
    toks = jnp.asarray(_tokens(cfg, 7, seed=4)[None])
    valid = jnp.ones(toks.shape, bool)
    pos, mask = T.positions_from_mask(valid), T.causal_mask(valid)
    x = T.embed(params, toks)
    full = T.run_blocks(cfg, params["layers"], x, pos, mask)
    first = T.run_blocks(cfg, params["layers"], x, pos, mask, 0, 1)
    both = T.run_blocks(cfg, params["layers"], first, pos, mask, 1, cfg.n_layers)
    np.testing.assert_allclose(both, full, rtol=1e-5, atol=1e-5)
    assert not np.allclose(first, full, atol=1e-3)
    # an empty range is the identity
    np.testing.assert_array_equal(T.run_blocks(cfg, params["layers"], x, pos, mask, 1, 1), x)
    a = fwd(params, toks, cfg=cfg)["logits"]
    b = fwd(params, toks, cfg=cfg, remat=True)["logits"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_param_tree_consistency(tiny):
    cfg, params, _ = tiny
    shapes = T.param_shapes(cfg)
    axes = T.param_axes(cfg)
    abstract = T.abstract_params(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for a, p in zip(jax.tree.leaves(abstract), jax.tree.leaves(params)):
        assert a.shape == p.shape
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(s, str) for s in x)
    flat_axes = jax.tree.leaves(axes, is_leaf=is_axes)
    assert len(flat_axes) == len(jax.tree.leaves(params))
    for ax, p in zip(flat_axes, jax.tree.leaves(params)):
        assert len(ax) == p.ndim
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    assert ("bq" in params["layers"]) == cfg.qkv_bias
    np.testing.assert_array_equal(params["final_norm"], np.ones(cfg.d_model, np.float32))
    assert shapes["layers"]["wq"][0] == (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim)


# ----------------------------------------------------------------------------- left padding

def test_left_padding_matches_rows_alone(tiny):
    cfg, params, _ = tiny
    rows = [_tokens(cfg, n, seed=10 + n).tolist() for n in (5, 11, 16, 1)]
    toks, valid = sampling.pad_prompts(rows, cfg.pad_id)
    assert toks.shape == (4, 16)
    assert valid.sum(1).tolist() == [5, 11, 16, 1]
    out = fwd(params, jnp.asarray(toks), cfg=cfg, valid=jnp.asarray(valid), capture_layer=0)
    logits, hidden = np.asarray(out["logits"]), np.asarray(out["hidden"])
    assert np.isfinite(logits).all() and np.isfinite(hidden).all()  # padding rows never NaN
    for i, r in enumerate(rows):
        alone = fwd(params, jnp.asarray([r], jnp.int32), cfg=cfg, capture_layer=0)
        n = len(r)
        assert rel_err(logits[i, 16 - n:], alone["logits"][0]) <= TOL, f"row {i}"
        assert rel_err(hidden[i, 16 - n:], alone["hidden"][0]) <= TOL, f"row {i}"


def test_pad_prompts_layout():
    toks, valid = sampling.pad_prompts([[5, 6, 7], [8]], pad_id=9, multiple=4)
    np.testing.assert_array_equal(toks, [[9, 5, 6, 7], [9, 9, 9, 8]])
    np.testing.assert_array_equal(valid, [[False, True, True, True], [False, False, False, True]])
    toks, _ = sampling.pad_prompts([[1] * 9], pad_id=0)
    assert toks.shape == (1, 16)
    with pytest.raises(ValueError):
        sampling.pad_prompts([[1] * 5], pad_id=0, length=4)


# ----------------------------------------------------------------------------- embedding override

def test_embed_override_replaces_exactly_the_named_rows(tiny_llama):
    cfg, params, _ = tiny_llama
    b, s, d = 2, 10, cfg.d_model
    toks = jnp.asarray(np.stack([_tokens(cfg, s, seed=20), _tokens(cfg, s, seed=21)]))
    positions = np.array([[2, 7, -1], [-1, 0, 9]], np.int32)
    vectors = np.random.default_rng(0).normal(size=(b, 3, d)).astype(np.float32)
    vectors[0, 2] = 1e3  # the -1 slots hold a loud vector that must appear nowhere
    vectors[1, 0] = 1e3
    plain = np.asarray(T.embed(params, toks))
    got = np.asarray(T.embed(params, toks, T.Override(jnp.asarray(positions), jnp.asarray(vectors))))
    assert got.shape == (b, s, d)
    changed = np.any(got != plain, axis=-1)
    expected = np.zeros((b, s), bool)
    for i in range(b):
        for j, p in enumerate(positions[i]):
            if p >= 0:
                expected[i, p] = True
                np.testing.assert_array_equal(got[i, p], vectors[i, j])
    np.testing.assert_array_equal(changed, expected)
    assert np.abs(got).max() < 1e3


def test_forward_override_is_causal_and_matches_reference(tiny):
    cfg, params, _ = tiny
    s, p = 12, 6
    toks = jnp.asarray(_tokens(cfg, s, seed=30)[None])
    vec = np.random.default_rng(1).normal(size=(cfg.d_model,)).astype(np.float32)
    ov = T.Override(jnp.asarray([[p, -1]], jnp.int32), jnp.asarray(np.stack([vec, 5 * vec])[None]))
    plain = np.asarray(fwd(params, toks, cfg=cfg)["logits"][0])
    got = np.asarray(fwd(params, toks, cfg=cfg, override=ov)["logits"][0])
    np.testing.assert_allclose(got[:p], plain[:p], rtol=1e-5, atol=1e-5)
    change = np.abs(got - plain).max(axis=-1)
    assert (change[p:] > 1e-2 * np.abs(plain).max()).all(), change
    ref = reference_forward(params, np.asarray(toks[0]), cfg, override={p: vec})
    assert rel_err(got, ref["logits"]) <= TOL
    # only -1 slots: the same as no override at all
    none = T.Override(jnp.full((1, 2), -1, jnp.int32), jnp.asarray(np.stack([vec, vec])[None]))
    np.testing.assert_allclose(fwd(params, toks, cfg=cfg, override=none)["logits"][0], plain, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 16-bit matmuls

BF16_UNIT = 2.0 ** -8         # bf16 keeps 8 significant bits: rounding moves a value by <= 2^-8 of it
F32_UNIT = 2.0 ** -24         # float32 unit roundoff


def f32_dot_bound(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Worst-case |f32 result - exact| of a @ b for any summation order (the CPU kernels of different
    machines add in different orders): gamma_K * (|a| @ |b|) with gamma_K = K u / (1 - K u)
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). Products of two bf16 values are
    exact in float32, so the sum is the only rounding."""
    k = a.shape[-1]
    gamma = k * F32_UNIT / (1 - k * F32_UNIT)
    return gamma * (np.abs(a) @ np.abs(b))


def assert_f32_sum_rounded_once_to_bf16(got, a: np.ndarray, b: np.ndarray) -> None:
    """`got` (bf16) is a @ b summed in float32 and rounded to bf16 once: within half a bf16 ulp of
    some float32 sum, i.e. |got - exact| <= 2^-8 (|exact| + e) + e, e the float32 bound. A sum kept
    in bf16 misses by orders of magnitude more (checked beside each use)."""
    exact = a @ b
    e = f32_dot_bound(a, b)
    err = np.abs(np.asarray(got, np.float64) - exact)
    bound = BF16_UNIT * (np.abs(exact) + e) + e
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"


def bf16_running_sum(terms: np.ndarray) -> float:
    """Terms added one by one in bf16 (what a dot without f32 accumulation would do)."""
    total = ml_dtypes.bfloat16(0)
    for t in terms.astype(ml_dtypes.bfloat16):
        total = ml_dtypes.bfloat16(total + t)
    return float(total)


@pytest.mark.parametrize("cpu_grad", [True, False])
def test_bf16_matmul_accumulates_in_float32(cpu_grad, monkeypatch):
    """bf16 x bf16 dots accumulate in f32 and round once (the AMX path on CPU, native elsewhere).

    K = 4096 terms of one sign: summed in bf16 the running total loses its low bits (bf16 has 8
    mantissa bits), summed in f32 and rounded once it is the f32 result rounded to bf16.
    The gradient's dx and dw get the same treatment, in both the hand-written CPU VJP and autodiff.
    Every bound follows from the arithmetic (f32_dot_bound), not from one machine's summation order.
    """
    monkeypatch.setattr(T, "CPU_HANDWRITTEN_MATMUL_GRAD", cpu_grad)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0.5, 1.5, (4, 4096)), jnp.bfloat16)
    w = jnp.asarray(rng.uniform(0.5, 1.5, (4096, 8)), jnp.bfloat16)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    # the check can tell the two apart: a bf16 running sum of one output misses by far more than the bound
    terms = x64[0] * w64[:, 0]
    assert abs(bf16_running_sum(terms) - terms.sum()) > 100 * (BF16_UNIT * terms.sum() + f32_dot_bound(x64[:1], w64[:, :1])[0, 0])
    y = T.matmul(x, w)
    assert y.dtype == jnp.bfloat16
    # XLA:CPU would give these values from a bf16-output dot too (it upcasts), but only the f32-output
    # dot reaches its AMX kernels (~4x faster): the program must ask for f32 accumulation.
    assert "preferred_element_type=float32" in str(jax.make_jaxpr(lambda a, b: T.matmul(a, b))(x, w))
    assert_f32_sum_rounded_once_to_bf16(y, x64, w64)
    logits = T.matmul(x, w.T, w_out_first=True, out_dtype=jnp.float32)   # the tied unembedding
    assert logits.dtype == jnp.float32
    assert (np.abs(np.asarray(logits, np.float64) - x64 @ w64) <= f32_dot_bound(x64, w64)).all()
    assert np.any(np.asarray(logits) != np.asarray(logits.astype(jnp.bfloat16), np.float32)), \
        "float32 logits of bf16 operands were rounded to bf16"
    dy = jnp.asarray(rng.uniform(0.5, 1.5, (4, 8)), jnp.bfloat16)
    dx, dw = jax.grad(lambda a, b: jnp.sum(T.matmul(a, b).astype(jnp.float32) * dy.astype(jnp.float32)),
                      argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    dy64 = np.asarray(dy, np.float64)
    assert_f32_sum_rounded_once_to_bf16(dx, dy64, w64.T)
    assert_f32_sum_rounded_once_to_bf16(dw, x64.T, dy64)


def test_bf16_forward_stays_close_to_float32(tiny):
    """A bf16 copy of the weights gives float32 logits within bf16's rounding of the f32 model's."""
    cfg, params, _ = tiny
    toks = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    ref = np.asarray(T.forward(params, toks, cfg)["logits"])
    out = T.forward(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), toks, cfg)["logits"]
    assert out.dtype == jnp.float32
    # bf16 weights and activations: ~2^-8 relative per rounding, a few layers deep
    assert rel_err(np.asarray(out), ref) < 0.05


def _scan_residuals(cfg, params, toks, remat):
    """Shapes the forward scan of a gradient stacks for its backward pass (its outputs bar the carry)."""
    loss = lambda p: T.forward(p, toks, cfg, remat=remat)["logits"].sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    scans = []

    def walk(jp):
        for e in jp.eqns:
            if e.primitive.name == "scan":
                scans.append(e)
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    first = scans[0]  # the forward's scan comes first; the backward's scans over the same layers follow
    return [tuple(v.aval.shape) for v in first.outvars[1:]]


def test_backward_keeps_matmul_outputs_not_elementwise_intermediates(tiny_llama):
    # remat=False keeps the weight-matmul outputs and recomputes the elementwise work: the MLP
    # leaves exactly two [L, b, s, F] stacks (gate and up), where keeping everything also stacks
    # silu(gate), its sigmoid and the product (6 on this tree); remat=True keeps none.
    cfg, params, _ = tiny_llama
    toks = jnp.asarray(_tokens(cfg, 7, seed=4)[None])
    L, F = cfg.n_layers, cfg.d_ff
    ff = lambda shapes: sum(1 for s in shapes if s[0] == L and s[-1] == F)
    assert F not in (cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
    assert ff(_scan_residuals(cfg, params, toks, remat=False)) == 2
    assert ff(_scan_residuals(cfg, params, toks, remat=True)) == 0
    # by name (MaxText's vocabulary): minimal = False, full = True, none keeps every intermediate
    assert ff(_scan_residuals(cfg, params, toks, remat="minimal")) == 2
    assert ff(_scan_residuals(cfg, params, toks, remat="full")) == 0
    assert ff(_scan_residuals(cfg, params, toks, remat="none")) > 2
    g = lambda remat: jax.grad(lambda p: fwd(p, toks, cfg=cfg, remat=remat)["logits"].sum())(params)
    for other in (True, "none"):
        for a, b in zip(jax.tree.leaves(g(False)), jax.tree.leaves(g(other))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="remat policy 'some'"):
        T.remat_name("some")
