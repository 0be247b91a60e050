"""Attention implementations, chosen by the config key `model.attention`.

  einsum   the reference: grouped-query scores in float32, a dense [b, s, t] mask, softmax, values.
           Every path (training, prefill, the sampler's KV-cache decode) can use it.
  xla      `jax.nn.dot_product_attention(implementation="xla")`: JAX's own composition; the CPU
           parity check of the library path.
  cudnn    the same call with implementation="cudnn": cuDNN's fused flash attention on NVIDIA GPUs
           (16-bit compute only, head_dim <= 128: cuDNN's limits). A dense mask goes in as a bias.
  splash   the TPU splash-attention Pallas kernel (jax.experimental.pallas.ops.tpu): never builds
           the [s, t] scores, causal (+ sliding window) masks as static block structure, left
           padding as segment ids. On CPU it runs in Pallas interpret mode (tests only: slow).

Where the kernel cannot express the mask, the call falls back to einsum, the same maths:
  - the sampler's decode (one query against a KV cache) and the grouped-GRPO completions (queries
    offset against a shared prompt's keys) pass a dense mask only, so splash falls back there;
    cudnn / xla take any dense mask and run everywhere.
Self-attention over a call's own keys (`run_blocks`: SFT, the AR, extraction, prefill, the RL
policy's prompt) passes `SelfAttn` so splash can run.

Padding-query rows: the reference gives a query with no visible key (a left-padding position)
uniform weights; the kernels see segment ids (splash) or the mask plus the diagonal (cudnn), so
those rows differ. Nothing reads them: no real query attends a padding key and the losses mask
padding out. Parity is checked at the real positions (tests/test_attention.py).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nla_jax import sharding
from nla_jax.models.config import ATTENTION_IMPLS

IMPLS = ATTENTION_IMPLS
SPLASH_BLOCK = 128     # splash's block sizes must be multiples of the TPU's 128 lanes


class SelfAttn(NamedTuple):
    """What a fused kernel needs instead of the dense mask: the keys are the queries' own slots."""
    valid: jax.Array       # [b, s] bool, False = left padding
    sliding: Any           # False / True, or a traced bool (scanned layers of mixed kinds)
    window: int | None     # the sliding layers' window (keys with q - k < window)


def check_impl(name: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"attention implementation {name!r}: expected one of {', '.join(IMPLS)}")
    return name


def accumulation_dtype(*arrays: jax.Array):
    """Accumulation dtype of a dot: float32 whenever an operand is narrower (the one definition;
    transformer.py uses it too).

    bf16 x bf16 -> f32 is what accelerators do natively, and on XLA:CPU it is the only bf16 dot
    that reaches the AMX units: a bf16-output dot is upcast to f32 copies of both operands and
    runs at the f32 rate (4096^3 on this 2-core CPU: ~280 GFLOP/s bf16-out vs ~1,080 f32-out).
    """
    return jnp.float32 if any(jnp.dtype(a.dtype).itemsize < 4 for a in arrays) else None


_acc = accumulation_dtype


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float | None = None) -> jax.Array:
    """Grouped-query attention in head-major layout (no transposes of the KV cache).

    q: [b, H, s, hd]   k, v: [b, KV, t, hd]   mask: [b, s, t] bool   ->   [b, H, s, hd]
    Query head i reads KV head i // (H // KV), as in Hugging Face. `scale` defaults to hd ** -0.5.
    """
    b, H, s, hd = q.shape
    KV = k.shape[1]
    qg = q.reshape(b, KV, H // KV, s, hd)
    scores = jnp.einsum("bkgsh,bkth->bkgst", qg, k, preferred_element_type=jnp.float32) * (
        hd ** -0.5 if scale is None else scale)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,bkth->bkgsh", probs, v, preferred_element_type=_acc(probs, v)).astype(v.dtype)
    return out.reshape(b, H, s, hd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None,
              impl: str = "einsum", self_attn: SelfAttn | None = None) -> jax.Array:
    """q: [b, H, s, hd]  k, v: [b, KV, t, hd]  mask: [b, s, t] bool  ->  [b, H, s, hd], by `impl`."""
    if impl == "einsum" or (impl == "splash" and self_attn is None):
        return einsum_attention(q, k, v, mask, scale)
    hd = q.shape[-1]
    scale = hd ** -0.5 if scale is None else scale
    if impl == "splash":
        return splash_attention(q, k, v, self_attn, scale)
    if impl in ("xla", "cudnn"):
        s, t = mask.shape[1], mask.shape[2]
        if s == t:  # a query with no visible key (left padding) sees itself: no all-masked row
            mask = mask | jnp.eye(s, dtype=bool)[None]
        out = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                           mask=mask[:, None], scale=scale, implementation=impl)  # [b, s, H, hd]
        return out.transpose(0, 2, 1, 3)
    raise ValueError(f"attention implementation {impl!r}: expected one of {', '.join(IMPLS)}")


# ----------------------------------------------------------------------------- splash (TPU)

def _splash_module():
    """The Pallas TPU ops (imported on first use: the einsum path must not need Pallas)."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    except ImportError as e:  # pragma: no cover - jax ships them on every platform
        raise RuntimeError(f"model.attention=splash needs jax's Pallas TPU ops: {e}") from None
    return kernel, masks


def _block(n: int) -> int:
    """The largest of 512 / 256 / 128 dividing n (n a multiple of 128)."""
    return next(b for b in (512, 256, SPLASH_BLOCK) if n % b == 0)


def _splash_local(q, k, v, segments, window: int | None, interpret: bool):
    """One shard's splash call. q: [b, H, S, hd] (already scaled), k, v: [b, KV, S, hd],
    segments: [b, S] int32 (1 = real token, 0 = padding) -> [b, H, S, hd]."""
    kernel_lib, masks = _splash_module()
    H, S = q.shape[1], q.shape[2]
    one = (masks.CausalMask((S, S)) if window is None
           else masks.LocalMask((S, S), window_size=(window - 1, 0), offset=0))
    bq = _block(S)
    sizes = kernel_lib.BlockSizes(block_q=bq, block_kv=bq, block_kv_compute=bq, block_q_dkv=bq, block_kv_dkv=bq,
                                  block_kv_dkv_compute=bq, block_q_dq=bq, block_kv_dq=bq)
    kernel = kernel_lib.make_splash_mha(masks.MultiHeadMask([one] * H), block_sizes=sizes, head_shards=1,
                                        q_seq_shards=1, interpret=interpret)
    return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=kernel_lib.SegmentIds(q=s1, kv=s1)))(
        q, k, v, segments)


def _sharded(fn, q, k, v, segments):
    """Run `fn` per shard under the active mesh: batch over the batch axes, heads over the tensor
    axis when both H and KV divide by it (a query head and its KV head then sit on one shard)."""
    mesh, rules = sharding._ACTIVE["mesh"], sharding._ACTIVE["rules"]
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, segments)
    P = jax.sharding.PartitionSpec
    batch = sharding.spec_for(("batch",), (q.shape[0],), mesh, rules)[0]
    heads = sharding.spec_for(("act_heads",), (q.shape[1],), mesh, rules)[0]
    kv_heads = sharding.spec_for(("act_heads",), (k.shape[1],), mesh, rules)[0]
    if heads != kv_heads:
        heads = kv_heads = None
    qs, ks = P(batch, heads, None, None), P(batch, kv_heads, None, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qs, ks, ks, P(batch, None)), out_specs=qs, check_vma=False)(
        q, k, v, segments)


def _interpret() -> bool:
    """Interpret mode (Pallas on CPU) unless the devices are TPUs (also aot's TPU topologies)."""
    mesh = sharding._ACTIVE["mesh"]
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return platform != "tpu"


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, sa: SelfAttn, scale: float) -> jax.Array:
    """Self-attention with the splash kernel. q: [b, H, s, hd], k, v: [b, KV, s, hd] -> [b, H, s, hd].

    The sequence is padded at the end to a multiple of 128 (segment 0, like the left padding);
    splash takes no scale, so q is scaled first (rounding: one multiply in q's dtype)."""
    b, H, s, hd = q.shape
    S = -(-s // SPLASH_BLOCK) * SPLASH_BLOCK
    pad = [(0, 0), (0, 0), (0, S - s), (0, 0)]
    qp = jnp.pad((q.astype(jnp.float32) * scale).astype(q.dtype), pad)
    kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)
    seg = jnp.pad(sa.valid.astype(jnp.int32), [(0, 0), (0, S - s)])               # [b, S]
    interpret = _interpret()

    def run(window):
        return _sharded(lambda q_, k_, v_, s_: _splash_local(q_, k_, v_, s_, window, interpret), qp, kp, vp, seg)

    if sa.sliding is False or sa.window is None:
        out = run(None)
    elif sa.sliding is True:
        out = run(sa.window)
    else:  # scanned layers of both kinds: both kernels compiled, the layer's flag picks one
        out = jax.lax.cond(sa.sliding, lambda: run(sa.window), lambda: run(None))
    return out[:, :, :s]
