"""A decoder-only transformer as pure functions of an explicit parameter pytree.

Layers are stacked on a leading `layers` axis and run with `lax.scan` (one compiled block,
fast compile). Every parameter has logical axis names (`param_axes`) that the sharding rules
in the config map onto the mesh.

Block index convention: "block K" is the residual stream *after* block K (0-based), which
equals Hugging Face `hidden_states[K + 1]`.

Entry points:
  forward(params, tokens, cfg, ...)          logits, and optionally block K's output
  run_blocks(params, x, ...)                 blocks [start, stop) on embeddings (the AR)
  embed(params, tokens, override=...)        token embeddings with rows replaced (the AV)
  block(...)                                 one block, with or without a KV cache (sampler)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nla_jax import sharding
from nla_jax.models import attention as attention_lib
from nla_jax.models.config import ModelConfig

Params = dict[str, Any]


# ----------------------------------------------------------------------------- parameters

def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """Shapes and logical axes of every parameter: {name: (shape, axes)}."""
    L, D, H, KV, hd, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                             cfg.d_ff, cfg.vocab_size)
    layers = {
        "attn_norm": ((L, D), ("layers", "norm")),
        "wq": ((L, D, H, hd), ("layers", "embed", "heads", "head_dim")),
        "wk": ((L, D, KV, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "wv": ((L, D, KV, hd), ("layers", "embed", "kv_heads", "head_dim")),
        "wo": ((L, H, hd, D), ("layers", "heads", "head_dim", "embed")),
        "mlp_norm": ((L, D), ("layers", "norm")),
        "w_gate": ((L, D, F), ("layers", "embed", "mlp")),
        "w_up": ((L, D, F), ("layers", "embed", "mlp")),
        "w_down": ((L, F, D), ("layers", "mlp", "embed")),
    }
    if cfg.qk_norm:
        layers["q_norm"] = ((L, hd), ("layers", "norm"))
        layers["k_norm"] = ((L, hd), ("layers", "norm"))
    if cfg.sandwich_norms:  # Gemma: the sub-layer outputs are normalised before the residual add
        layers["post_attn_norm"] = ((L, D), ("layers", "norm"))
        layers["post_mlp_norm"] = ((L, D), ("layers", "norm"))
    if cfg.qkv_bias:
        layers["bq"] = ((L, H, hd), ("layers", "heads", "head_dim"))
        layers["bk"] = ((L, KV, hd), ("layers", "kv_heads", "head_dim"))
        layers["bv"] = ((L, KV, hd), ("layers", "kv_heads", "head_dim"))
    out = {
        "embed": ((V, D), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ((D,), ("norm",)),
    }
    if not cfg.tie_embeddings:
        out["lm_head"] = ((D, V), ("embed", "vocab"))
    return out


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Logical axis names, a pytree matching the params."""
    return jax.tree.map(lambda s: s[1], param_shapes(cfg), is_leaf=_is_spec)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict[str, Any]:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], dtype), param_shapes(cfg), is_leaf=_is_spec)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random init (tests and tiny configs): normal(0, 1/sqrt(fan_in)), norms at 1 (stored as 0
    when the family's norms scale by 1 + w)."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree.flatten(shapes, is_leaf=_is_spec)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_spec)[0]]
    keys = jax.random.split(key, len(flat))
    leaves = []
    for k, (shape, axes), path in zip(keys, flat, paths):
        if "norm" in path:
            leaves.append((jnp.zeros if cfg.norm_plus_one else jnp.ones)(shape, dtype))
        elif path.endswith("['bq']") or path.endswith("['bk']") or path.endswith("['bv']"):
            leaves.append((0.1 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
        else:
            fan_in = shape[1] if axes[0] == "layers" else shape[0]
            if axes[:2] == ("layers", "heads"):  # wo: [L, H, hd, D]
                fan_in = shape[1] * shape[2]
            if axes[0] == "vocab":
                fan_in = shape[1]
            # drawn in float32 and cast once: a numpy scalar divisor would promote bf16 to float32
            leaves.append((jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- pieces

_acc = attention_lib.accumulation_dtype      # float32 accumulation for narrower operands (one definition)


def _dot(a: jax.Array, b: jax.Array, dims, out_dtype) -> jax.Array:
    """dot_general accumulating in `_acc`, cast to out_dtype."""
    y = jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=_acc(a, b))
    return y.astype(out_dtype)


def _dot_last(x: jax.Array, w: jax.Array, w_out_first: bool, out_dtype) -> jax.Array:
    """x [..., K] times w ([K, M], or [M, K] when w_out_first) -> [..., M] in out_dtype."""
    return _dot(x, w, ((x.ndim - 1,), (1 if w_out_first else 0,)), out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_cpu(x: jax.Array, w: jax.Array, w_out_first: bool, out_dtype) -> jax.Array:
    return _dot_last(x, w, w_out_first, out_dtype)


def _matmul_cpu_fwd(x, w, w_out_first, out_dtype):
    return _dot_last(x, w, w_out_first, out_dtype), (x, w)


def _matmul_cpu_bwd(w_out_first, out_dtype, res, dy):
    # Written out because XLA:CPU schedules autodiff's version badly: it fuses the elementwise
    # backward (silu', softmax') into a transposed copy feeding the weight-gradient dot, a loop
    # that strides through memory and cost more than the matmuls (SwiGLU MLP forward+backward
    # 106 ms -> 59 ms at 8x128 tokens). Contracting the token axis of two row-major 2-D arrays
    # directly keeps every operand in the layout it was produced in.
    x, w = res
    dy = dy.astype(x.dtype)  # a float32 cotangent of 16-bit operands (the logits) meets them at their width
    k, m = x.shape[-1], dy.shape[-1]
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, m)
    dx = _dot(dy, w, ((dy.ndim - 1,), (0 if w_out_first else 1,)), x.dtype)
    if w_out_first:
        dw = _dot(dy2, x2, ((0,), (0,)), w.dtype)  # [M, K]
    else:
        dw = _dot(x2, dy2, ((0,), (0,)), w.dtype)  # [K, M]
    return dx, dw


_matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


# Benchmarks flip this to measure the plain-autodiff baseline; nothing else should.
CPU_HANDWRITTEN_MATMUL_GRAD = True
# `aot`'s cost probe only (nothing else sets these). XLA's cost analysis counts a loop body once
# whatever its trip count, so aot compiles a step again with the scans of one trip count unrolled
# twice (SCAN_PROBE = that count) and reads one block's cost from the difference; SCAN_TRIPS
# collects the trip counts a traced program's layer scans have.
SCAN_PROBE: int | None = None
SCAN_TRIPS: set[int] = set()


def _scan_layers(body: Callable, carry, layers):
    n = jax.tree.leaves(layers)[0].shape[0]
    SCAN_TRIPS.add(int(n))
    return jax.lax.scan(body, carry, layers, unroll=2 if n == SCAN_PROBE else 1)


def matmul(x: jax.Array, w: jax.Array, *, w_out_first: bool = False, out_dtype=None) -> jax.Array:
    """A weight matmul: x [..., K] @ w [K, M] (or w [M, K] with w_out_first) -> [..., M].

    On CPU the gradient is hand-written (`_matmul_cpu_bwd`); elsewhere plain autodiff. 16-bit
    operands accumulate in float32 (`_acc`); the result is x's dtype unless out_dtype is given.
    """
    out = jnp.dtype(out_dtype if out_dtype is not None else x.dtype)
    if jax.default_backend() == "cpu" and CPU_HANDWRITTEN_MATMUL_GRAD:
        return _matmul_cpu(x, w, w_out_first, out)
    return _dot_last(x, w, w_out_first, out)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm over the last axis in float32; the scale is w, or 1 + w (Gemma stores offsets)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    w32 = w.astype(jnp.float32)
    return (y * (1.0 + w32 if plus_one else w32)).astype(x.dtype)


def norm(cfg: ModelConfig, x: jax.Array, w: jax.Array) -> jax.Array:
    """The family's RMSNorm (its eps, w or 1 + w)."""
    return rms_norm(x, w, cfg.rms_eps, cfg.norm_plus_one)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None = None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2]; `scaling` applies Llama-3's long-context rule, or the
    linear rule (positions divided by `factor`: Gemma-3's global layers)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling and dict(scaling).get("rope_type", "llama3" if "low_freq_factor" in dict(scaling) else "linear") == "linear":
        return inv_freq / float(dict(scaling)["factor"])
    if scaling:
        s = dict(scaling)
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv_freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                scaling: tuple | None = None) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [b, s, head_dim // 2] for integer positions [b, s]."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout). x: [b, heads, s, hd]; cos, sin: [b, s, hd/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos[:, None, :, :].astype(x.dtype)
    s = sin[:, None, :, :].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class Override(NamedTuple):
    """Vectors written *in place of* token embeddings (not added).

    positions: [b, n] int, -1 for "no override in this slot"
    vectors:   [b, n, d]
    """
    positions: jax.Array
    vectors: jax.Array


def embed(params: Params, tokens: jax.Array, override: Override | None = None,
          cfg: ModelConfig | None = None) -> jax.Array:
    """Token embeddings [b, s, d]; rows named by `override` are replaced by its vectors.

    With a `cfg` whose family scales embeddings (Gemma: sqrt(d)), looked-up rows are scaled and the
    override's vectors are not: an injected activation is already in residual-stream units (the
    official release's convention; its injection scale, 80 000 for Gemma-3-12B, is such a norm).
    """
    x = jnp.take(params["embed"], tokens, axis=0)  # [b, s, d]
    if cfg is not None and cfg.embed_scale:
        x = x * jnp.asarray(cfg.embed_multiplier, x.dtype)
    if override is not None:
        s = tokens.shape[1]
        hit = (jnp.arange(s)[None, :, None] == override.positions[:, None, :])  # [b, s, n]
        hit_f = hit.astype(x.dtype)
        replaced = jnp.einsum("bsn,bnd->bsd", hit_f, override.vectors.astype(x.dtype))
        x = jnp.where(hit.any(-1)[..., None], replaced, x)
    return sharding.constrain(x, ("batch", "seq", "act_embed"))


def add_at(x: jax.Array, override: Override) -> jax.Array:
    """Add override vectors, norm-matched, to the residual stream at their positions.

    x: [b, s, d]. Each vector's direction is scaled to the norm of the residual it is added to
    (the "Activation Oracles" injection: h + |h| * v/|v|), so the addition is commensurate at any
    layer. The norm of `override.vectors` itself only sets an extra multiplier: |v| / sqrt(d).
    """
    s, d = x.shape[1], x.shape[2]
    hit = (jnp.arange(s)[None, :, None] == override.positions[:, None, :]).astype(jnp.float32)  # [b, s, n]
    v = override.vectors.astype(jnp.float32)                                              # [b, n, d]
    here = jnp.einsum("bsn,bsd->bnd", hit, x.astype(jnp.float32))                       # [b, n, d]
    scale = jnp.linalg.norm(here, axis=-1, keepdims=True) / (d ** 0.5)                  # [b, n, 1]
    return x + jnp.einsum("bsn,bnd->bsd", hit, v * scale).astype(x.dtype)


def positions_from_mask(valid: jax.Array) -> jax.Array:
    """Position ids [b, s] for a left-padded batch: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


class Tables(NamedTuple):
    """What a block's attention needs besides its weights: RoPE cos, sin [b, s, hd/2], mask [b, s, t]."""
    cos: jax.Array
    sin: jax.Array
    mask: jax.Array


def attn_tables(cfg: ModelConfig, positions: jax.Array, mask: jax.Array, q_index: jax.Array,
                k_index: jax.Array) -> tuple[Tables, Tables | None]:
    """(tables of the full-attention blocks, tables of the sliding-window blocks or None).

    positions: [b, s] RoPE positions of the queries; mask: [b, s, t]; q_index [s] / k_index [t]: the
    queries' and keys' slots in the sequence (or KV cache). A sliding block sees keys with
    q - k < sliding_window and uses its own RoPE base without scaling (Gemma-3). Slot distances equal
    position distances for the real tokens of a left-padded row, so the window is right with padding.
    """
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    full = Tables(cos, sin, mask)
    if not cfg.has_sliding:
        return full, None
    cos_l, sin_l = rope_tables(positions, cfg.head_dim, cfg.rope_local_theta)
    near = (q_index[:, None] - k_index[None, :]) < cfg.sliding_window   # [s, t]
    return full, Tables(cos_l, sin_l, mask & near[None])


def pick(tables: tuple[Tables, Tables | None], sliding) -> Tables:
    """The tables of one block: `sliding` a Python bool (unrolled layers) or a traced one (scan)."""
    full, local = tables
    if local is None or sliding is False:
        return full
    if sliding is True:
        return local
    return Tables(*(jnp.where(sliding, b, a) for a, b in zip(full, local)))


def _with_kinds(cfg: ModelConfig, layers: Params, start: int, stop: int, tables) -> Any:
    """Scan input: the layers, plus each block's sliding flag when the tables differ by block."""
    if tables[1] is None:
        return layers
    return layers, jnp.asarray(cfg.sliding_layers[start:stop])


def _unpack(xs, tables) -> tuple[Params, Tables]:
    if tables[1] is None:
        return xs, tables[0]
    lp, sliding = xs
    return lp, pick(tables, sliding)


# ----------------------------------------------------------------------------- one block

attention = attention_lib.attention   # einsum reference or a kernel, by cfg.attention (models/attention.py)


def block(cfg: ModelConfig, lp: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
          cache_write: Callable[[jax.Array, jax.Array], Any] | None = None,
          self_attn: attention_lib.SelfAttn | None = None) -> tuple[jax.Array, Any]:
    """One pre-norm block. x: [b, s, d]; returns (x_out, aux).

    Without `cache_write`, attention runs over this call's own keys and aux = (k, v), each
    [b, KV, s, hd]. With it (the sampler), `cache_write(k, v)` stores them in a KV cache and
    returns (keys, values, aux): attention then runs over the cache's [b, KV, t, hd].
    `self_attn` (self-attention only) lets a fused kernel (cfg.attention) replace the dense mask.
    """
    b, s_len, D = x.shape
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = norm(cfg, x, lp["attn_norm"])

    def heads(w, bias, n):  # [b, s, D] -> [b, n, s, hd]
        y = matmul(h, w.reshape(D, n * hd)).reshape(b, s_len, n, hd)
        if bias is not None:
            y = y + bias
        return y.transpose(0, 2, 1, 3)

    q = heads(lp["wq"], lp.get("bq") if cfg.qkv_bias else None, H)   # [b, H, s, hd]
    k = heads(lp["wk"], lp.get("bk") if cfg.qkv_bias else None, KV)  # [b, KV, s, hd]
    v = heads(lp["wv"], lp.get("bv") if cfg.qkv_bias else None, KV)
    if cfg.qk_norm:  # over head_dim, before RoPE (Qwen3, Gemma-3)
        q = norm(cfg, q, lp["q_norm"])
        k = norm(cfg, k, lp["k_norm"])
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    if cache_write is None:
        keys, values, aux = k, v, (k, v)
    else:
        keys, values, aux = cache_write(k, v)
    a = attention(q, keys, values, mask, cfg.attn_scale, cfg.attention, self_attn)      # [b, H, s, hd]
    a = a.transpose(0, 2, 1, 3).reshape(b, s_len, H * hd)
    a = matmul(a, lp["wo"].reshape(H * hd, D))
    if cfg.sandwich_norms:
        a = norm(cfg, a, lp["post_attn_norm"])
    x = sharding.constrain(x + a, ("batch", "seq", "act_embed"))
    h = norm(cfg, x, lp["mlp_norm"])
    g = matmul(h, lp["w_gate"])  # [b, s, F]
    u = matmul(h, lp["w_up"])
    act = jax.nn.silu(g) if cfg.activation == "silu" else jax.nn.gelu(g, approximate=True)
    f = sharding.constrain(act * u, ("batch", "seq", "act_mlp"))
    y = matmul(f, lp["w_down"])
    if cfg.sandwich_norms:
        y = norm(cfg, y, lp["post_mlp_norm"])
    x = x + y
    return sharding.constrain(x, ("batch", "seq", "act_embed")), aux


# ----------------------------------------------------------------------------- stacks

def _slice_layers(layers: Params, start: int, stop: int) -> Params:
    return jax.tree.map(lambda a: a[start:stop], layers)


def run_blocks(cfg: ModelConfig, layers: Params, x: jax.Array, positions: jax.Array, mask: jax.Array,
               start: int = 0, stop: int | None = None, remat: bool = False,
               valid: jax.Array | None = None) -> jax.Array:
    """Blocks [start, stop) of a stack on residual stream x: [b, s, d] -> [b, s, d].

    mask: [b, s, s] = causal_mask(valid). With `valid` [b, s] given, a fused attention kernel
    (cfg.attention = splash) can run instead of the dense mask."""
    n = jax.tree.leaves(layers)[0].shape[0]
    stop = n if stop is None else stop
    if stop <= start:
        return x
    if (start, stop) != (0, n):
        layers = _slice_layers(layers, start, stop)
    s = x.shape[1]
    tables = attn_tables(cfg, positions, mask, jnp.arange(s), jnp.arange(s))

    def body(h, xs):
        lp, t = _unpack(xs, tables)
        sa = None
        if valid is not None and cfg.attention == "splash":
            sa = attention_lib.SelfAttn(valid, xs[1] if tables[1] is not None else False,
                                        cfg.sliding_window)
        h, _ = block(cfg, lp, h, t.cos, t.sin, t.mask, self_attn=sa)
        return h, None

    x, _ = _scan_layers(_saving(body, remat), x, _with_kinds(cfg, layers, start, stop, tables))
    return x


REMAT_POLICIES = ("none", "minimal", "full")


def remat_name(remat: str | bool) -> str:
    """A remat policy by name (MaxText's vocabulary); the older booleans: True = full, False = minimal."""
    if isinstance(remat, bool):
        return "full" if remat else "minimal"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy {remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
    return remat


def _saving(body: Callable, remat: str | bool) -> Callable:
    """What a scanned block keeps for its backward pass (`remat_name`).

    full: only the block's input; everything else is recomputed (least memory).
    minimal: the outputs of the weight matmuls; the elementwise work (norms, RoPE, attention
    softmax, SiLU) is recomputed in the backward (MaxText's "minimal" policy).
    none: every intermediate (most memory). On SmolLM2-135M at 8x128 that stacks ~2.1 GB of
    residuals a step against minimal's ~0.64 GB, and on the 2-core CPU writing and re-reading them
    cost more than the recompute.
    """
    name = remat_name(remat)
    if name == "none":
        return body
    policy = None if name == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint(body, prevent_cse=False, policy=policy)


def causal_mask(valid: jax.Array) -> jax.Array:
    """[b, s, s] bool: causal and key not padding. valid: [b, s] bool."""
    s = valid.shape[1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    return causal[None] & valid[:, None, :]


def unembed(cfg: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """Final norm then logits in float32. h: [b, s, d] -> [b, s, V]."""
    h = norm(cfg, h, params["final_norm"])
    if cfg.tie_embeddings:  # embed: [V, d]
        logits = matmul(h, params["embed"], w_out_first=True, out_dtype=jnp.float32)
    else:  # lm_head: [d, V]
        logits = matmul(h, params["lm_head"], out_dtype=jnp.float32)
    return sharding.constrain(logits, ("batch", "seq", "act_vocab"))


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, *, valid: jax.Array | None = None,
            override: Override | None = None, capture_layer: int | None = None,
            logits: bool = True, remat: bool = False, add_after: int | None = None,
            logits_from: int = 0) -> dict[str, jax.Array]:
    """Full forward pass.

    tokens: [b, s] int; valid: [b, s] bool (False = left padding), default all True.
    Returns {"logits": [b, s, V] float32} and, if capture_layer=K, {"hidden": [b, s, d]} = the
    residual stream after block K (Hugging Face hidden_states[K + 1]). With logits=False the
    blocks after K are not run at all. With add_after=j the override is not written into the
    embeddings but added (norm-matched, `add_at`) to the residual stream after block j.
    logits_from=p computes logits only for positions p.. (the policy step needs the completion's
    logits, not the prompt's: the vocabulary projection is a large share of a small model's FLOPs).
    """
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    positions = positions_from_mask(valid)
    mask = causal_mask(valid)
    out: dict[str, jax.Array] = {}
    n = cfg.n_layers
    if add_after is not None:
        if capture_layer is not None or override is None:
            raise ValueError("add_after needs an override and no capture_layer")
        x = embed(params, tokens, cfg=cfg)
        x = run_blocks(cfg, params["layers"], x, positions, mask, 0, add_after + 1, remat, valid)
        x = run_blocks(cfg, params["layers"], add_at(x, override), positions, mask, add_after + 1, n, remat, valid)
        return {"logits": unembed(cfg, params, x[:, logits_from:])} if logits else {"last": x}
    x = embed(params, tokens, override, cfg)
    if capture_layer is not None:
        if not 0 <= capture_layer < n:
            raise ValueError(f"capture_layer={capture_layer} out of range [0, {n})")
        x = run_blocks(cfg, params["layers"], x, positions, mask, 0, capture_layer + 1, remat, valid)
        out["hidden"] = x
        if logits:
            x = run_blocks(cfg, params["layers"], x, positions, mask, capture_layer + 1, n, remat, valid)
    else:
        x = run_blocks(cfg, params["layers"], x, positions, mask, 0, n, remat, valid)
    if logits:
        out["logits"] = unembed(cfg, params, x[:, logits_from:])
    return out


def forward_grouped(params: Params, prompt: jax.Array, valid: jax.Array, completion: jax.Array, cfg: ModelConfig,
                    *, group: int, override: Override | None = None, add_after: int | None = None,
                    remat: bool = False, override_in: str = "prompt", logits_from: int = 0) -> jax.Array:
    """Logits of G continuations per prompt, running each shared prompt once.

    prompt, valid: [B, P] (left-padded); completion: [B*G, C] int, rows b*G..b*G+G-1 continuing
    prompt b. Returns float32 logits [B*G, 1 + C, V]: at the prompt's last position (the same for
    the whole group), then at each completion position. Equal to `forward` on the concatenated
    rows with logits_from=P-1, but the prompt's blocks run for B rows instead of B*G: the
    completions attend to the prompt's keys/values repeated over the group (the gradient sums
    back through the repeat). A GRPO step's forward+backward shrinks by the prompt's share.
    `override` / `add_after` act on the prompt, as in `forward`; with override_in="completion" they
    act on the completion rows instead (their positions counted from the completion's start: a
    prefix shared by the whole batch, then each row's own injected vector). logits_from=j returns
    only [N, 1 + C - j, V], from output position j (no unembedding where no logits are wanted).
    """
    if override_in not in ("prompt", "completion"):
        raise ValueError(f"override_in={override_in!r}: expected 'prompt' or 'completion'")
    on_prompt = override_in == "prompt"
    B, P = prompt.shape
    N, C = completion.shape
    positions_p = positions_from_mask(valid)                          # [B, P]
    start = jnp.repeat(positions_p[:, -1] + 1, group, axis=0)         # [N]
    mask_p = causal_mask(valid)                                       # [B, P, P]
    mask_c = jnp.concatenate([jnp.broadcast_to(jnp.repeat(valid, group, axis=0)[:, None, :], (N, C, P)),
                              jnp.broadcast_to(jnp.tril(jnp.ones((C, C), bool))[None], (N, C, C))], axis=2)
    tab_p = attn_tables(cfg, positions_p, mask_p, jnp.arange(P), jnp.arange(P))
    tab_c = attn_tables(cfg, start[:, None] + jnp.arange(C)[None], mask_c, P + jnp.arange(C), jnp.arange(P + C))

    def body(carry, xs):
        xp, xc = carry
        lp, tp = _unpack(xs, tab_p)
        _, tc = _unpack(xs, tab_c)
        sa = None
        if cfg.attention == "splash":  # the prompt attends to itself: the kernel can run there
            sa = attention_lib.SelfAttn(valid, xs[1] if tab_p[1] is not None else False, cfg.sliding_window)
        xp, (kp, vp) = block(cfg, lp, xp, tp.cos, tp.sin, tp.mask, self_attn=sa)

        def with_prompt(k, v):  # [N, KV, C, hd] -> keys over prompt + completion [N, KV, P + C, hd]
            return (jnp.concatenate([jnp.repeat(kp, group, axis=0), k], axis=2),
                    jnp.concatenate([jnp.repeat(vp, group, axis=0), v], axis=2), None)

        xc, _ = block(cfg, lp, xc, tc.cos, tc.sin, tc.mask, cache_write=with_prompt)
        return (xp, xc), None

    body = _saving(body, remat)

    def run(carry, a, b):
        n = jax.tree.leaves(params["layers"])[0].shape[0]
        if b <= a:
            return carry
        layers = params["layers"] if (a, b) == (0, n) else _slice_layers(params["layers"], a, b)
        return _scan_layers(body, carry, _with_kinds(cfg, layers, a, b, tab_p))[0]

    n = cfg.n_layers
    embed_ov = None if add_after is not None else override
    xp = embed(params, prompt, embed_ov if on_prompt else None, cfg)
    carry = (xp, embed(params, completion, None if on_prompt else embed_ov, cfg))
    if add_after is not None:
        if override is None:
            raise ValueError("add_after needs an override")
        xp, xc = run(carry, 0, add_after + 1)
        carry = (add_at(xp, override), xc) if on_prompt else (xp, add_at(xc, override))
        carry = run(carry, add_after + 1, n)
    else:
        carry = run(carry, 0, n)
    xp, xc = carry
    h = jnp.concatenate([jnp.repeat(xp[:, -1:], group, axis=0), xc], axis=1)   # [N, 1 + C, d]
    return unembed(cfg, params, h[:, logits_from:])


# ----------------------------------------------------------------------------- compile boundary

def make_forward(cfg: ModelConfig, mesh, rules, *, capture_layer: int | None = None, logits: bool = True,
                 dtype=jnp.float32):
    """`forward` under jax.jit with explicit shardings for params, batch and outputs.

    Returns f(params, tokens [b, s], valid [b, s]) -> dict like `forward`'s. Batch dims are
    sharded by the `batch` rule; the params by their logical axes.
    """
    p_sh = sharding.tree_shardings(param_axes(cfg), abstract_params(cfg, dtype), mesh, rules)
    bs = sharding.named_sharding(("batch", "seq"), None, mesh, rules)
    out_sh = {}
    if capture_layer is not None:
        out_sh["hidden"] = sharding.named_sharding(("batch", "seq", "act_embed"), None, mesh, rules)
    if logits:
        out_sh["logits"] = sharding.named_sharding(("batch", "seq", "act_vocab"), None, mesh, rules)

    def f(params, tokens, valid):
        with sharding.use_mesh(mesh, rules):
            return forward(params, tokens, cfg, valid=valid, capture_layer=capture_layer, logits=logits)

    return jax.jit(f, in_shardings=(p_sh, bs, bs), out_shardings=out_sh)
