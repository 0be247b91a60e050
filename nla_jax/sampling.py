"""Compiled sampler: jitted prefill plus a `lax.while_loop` decode over a KV cache.

Prompts of different lengths are left-padded; position ids restart at each row's first real
token and padding keys are masked, so a padded row computes exactly what it would alone.
The cache is one [batch, kv_heads, prompt + new, head_dim] pair per layer and lives in the
loop carry, updated in place (one slot per layer per step). Decoding stops when every row has emitted
an EOS or `max_new_tokens` is reached.

Returned log-probs are of the chosen token under the temperature-scaled full-vocabulary
distribution (before top-k/top-p truncation): what a policy-gradient trainer recomputes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nla_jax import sharding
from nla_jax.models import transformer
from nla_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1.0 = off
    greedy: bool = False
    stop_at_eos: bool = True


class SampleOutput(NamedTuple):
    tokens: jax.Array     # [b, N] int32; pad_id after a row's EOS
    logprobs: jax.Array   # [b, N] float32; 0 after a row's EOS
    lengths: jax.Array    # [b] int32: generated tokens including the EOS
    finished: jax.Array   # [b] bool: the row emitted an EOS


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
                multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to one length (rounded up to `multiple` to limit recompiles)."""
    n = max(len(p) for p in prompts)
    if length is None:
        length = -(-n // multiple) * multiple
    if n > length:
        raise ValueError(f"prompt of {n} tokens exceeds padded length {length}")
    toks = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        if len(p):
            toks[i, length - len(p):] = p
            valid[i, length - len(p):] = True
    return toks, valid


def _choose(logits: jax.Array, key: jax.Array, sc: SampleConfig) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row from float32 logits [b, V]; returns (token [b], logprob [b]).

    The log-prob is logit - logsumexp, read at the chosen id only: a full [b, V] log_softmax
    would add a pass and a write over the vocabulary every decode step (~9% of one at b=32).
    """
    scaled = logits if sc.greedy else logits / sc.temperature
    lse = jax.nn.logsumexp(scaled, axis=-1)  # [b]
    if sc.greedy:
        tok = jnp.argmax(logits, axis=-1)
    elif sc.top_k > 0:
        vals, idx = jax.lax.top_k(scaled, sc.top_k)  # [b, k], descending
        if sc.top_p < 1.0:
            vals = _top_p_mask(vals, sc.top_p)
        choice = categorical(key, vals)
        tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    elif sc.top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        vals = _top_p_mask(jnp.take_along_axis(scaled, order, axis=-1), sc.top_p)
        choice = categorical(key, vals)
        tok = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    else:
        tok = categorical(key, scaled)
    tok = tok.astype(jnp.int32)
    return tok, jnp.take_along_axis(scaled, tok[:, None], axis=-1)[:, 0] - lse


def categorical(key: jax.Array, logits: jax.Array, block: int = 1024) -> jax.Array:
    """One draw per row from softmax(logits) [b, V] (float32; -inf allowed) -> [b] int32.

    Inverse-CDF sampling with one uniform per row, in two levels (which block of `block` ids, then
    which id in it) so each cumulative sum is short. `jax.random.categorical` draws b*V Gumbel
    variates instead: at b=32, V=49k that was ~100 ms of a ~200 ms decode step on a 2-core CPU;
    this takes ~5 ms. Same distribution, a different random stream.
    """
    b, V = logits.shape
    nb = -(-V // block)
    x = logits.astype(jnp.float32)
    p = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))                      # [b, V] unnormalised
    p = jnp.pad(p, ((0, 0), (0, nb * block - V))).reshape(b, nb, block)     # [b, nb, block]
    mass = p.sum(-1)                                                         # [b, nb]
    upto = jnp.cumsum(mass, axis=-1)                                         # [b, nb]
    u = jax.random.uniform(key, (b, 1), jnp.float32) * upto[:, -1:]          # [b, 1] in [0, total)
    blk = jnp.minimum(jnp.sum(upto <= u, axis=-1), nb - 1)                   # [b] first block past u
    rest = u[:, 0] - jnp.take_along_axis(upto - mass, blk[:, None], axis=-1)[:, 0]
    row = jnp.take_along_axis(p, blk[:, None, None], axis=1)[:, 0]           # [b, block]
    idx = jnp.minimum(jnp.sum(jnp.cumsum(row, axis=-1) <= rest[:, None], axis=-1), block - 1)
    tok = jnp.minimum(blk * block + idx, V - 1)
    # rounding can land on a zero-probability id at a block's end: step back to the last live one
    live = jnp.take_along_axis(x, tok[:, None], axis=-1)[:, 0] > -jnp.inf
    fallback = jnp.argmax(x, axis=-1)
    return jnp.where(live, tok, fallback).astype(jnp.int32)


def _top_p_mask(sorted_vals: jax.Array, p: float) -> jax.Array:
    """Keep the smallest prefix of descending logits whose probability mass reaches p."""
    probs = jax.nn.softmax(sorted_vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each entry
    return jnp.where(before < p, sorted_vals, -jnp.inf)


def _layers_with_cache(cfg: ModelConfig, layers: Sequence[dict], x, tables, cache, slot, hook=None):
    """All blocks on x [b, s, d], writing this call's k/v into the cache at `slot`.

    `layers` is a sequence of per-layer parameter dicts and `cache` a tuple of per-layer
    (k, v) arrays [b, KV, T, hd]. Unrolled on purpose: a `scan` over stacked weights makes
    XLA:CPU copy every layer's weights out of the stack at every decode step (measured 1.3-1.9x
    slower at batch 8-32); with separate arrays each step reads the weights once and the cache
    update is an in-place write of one slot. `hook=(j, f)` applies x = f(x) after block j.
    `tables`: `transformer.attn_tables` (full and sliding-window blocks), picked per block.
    """
    new_cache = []
    for li, (lp, (ck, cv)) in enumerate(zip(layers, cache)):
        def write(k, v, ck=ck, cv=cv):
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, slot, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, slot, 0))
            return ck, cv, (ck, cv)

        t = transformer.pick(tables, cfg.sliding_layers[li])
        x, kv = transformer.block(cfg, lp, x, t.cos, t.sin, t.mask, cache_write=write)
        if hook is not None and hook[0] == li:
            x = hook[1](x)
        new_cache.append(kv)
    return x, tuple(new_cache)


def _layers_with_cache_scanned(cfg: ModelConfig, layers: dict, x, tables, cache, slot, hook=None):
    """`_layers_with_cache` as a scan over the stacked layers, `cache` a stacked (k, v) pair
    [L, b, KV, T, hd]. On sharded meshes this keeps the decode loop's weight all-gathers inside
    the loop, one layer at a time: with separate per-layer arrays every gather is loop-invariant
    and XLA hoists all of them out of the decode while_loop, holding the whole gathered model at
    once (1/tensor of it per device). Accelerators decode this way; XLA:CPU keeps the unrolled form.
    Sliding-window blocks (Gemma-3) pick their tables by a per-block flag scanned with the weights."""
    n = jax.tree.leaves(layers)[0].shape[0]
    kinds = jnp.asarray(cfg.sliding_layers)                     # [L] bool

    def body(x, xs):
        lp, ck, cv, li, sliding = xs
        t = transformer.pick(tables, sliding)

        def write(k, v):
            ck2 = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, slot, 0))
            cv2 = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, slot, 0))
            return ck2, cv2, (ck2, cv2)

        x, kv = transformer.block(cfg, lp, x, t.cos, t.sin, t.mask, cache_write=write)
        if hook is not None:
            x = jnp.where(li == hook[0], hook[1](x), x)
        return x, kv

    x, (ks, vs) = jax.lax.scan(body, x, (layers, cache[0], cache[1], jnp.arange(n), kinds))
    return x, (ks, vs)


@jax.jit
def split_layers(params):
    """Stacked params -> the same dict with "layers" as a tuple of per-layer dicts (one copy)."""
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    out = dict(params)
    out["layers"] = tuple(jax.tree.map(lambda a: a[i], params["layers"]) for i in range(n))
    return out


def _split_shardings(cfg: ModelConfig, mesh, rules, dtype):
    """Shardings of `split_layers(params)`: each layer like the stack minus its leading axis."""
    axes, shapes = transformer.param_axes(cfg), transformer.abstract_params(cfg, dtype)
    stacked = sharding.tree_shardings(axes, shapes, mesh, rules)
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    layer_axes = jax.tree.map(lambda a: a[1:], axes["layers"], is_leaf=is_axes)
    layer_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), shapes["layers"])
    one = sharding.tree_shardings(layer_axes, layer_shapes, mesh, rules)
    out = dict(stacked)
    out["layers"] = tuple(one for _ in range(cfg.n_layers))
    return stacked, out


def make_sampler(cfg: ModelConfig, sc: SampleConfig, mesh, rules, dtype=jnp.float32):
    """`sample` under jax.jit with explicit shardings: f(params, prompt, valid, key) -> SampleOutput.

    `params` may be stacked (they are split once per call) or already `split_layers`-ed.
    """
    stacked_sh, split_sh = _split_shardings(cfg, mesh, rules, dtype)
    bs = sharding.named_sharding(("batch", "seq"), None, mesh, rules)
    b1 = sharding.named_sharding(("batch",), None, mesh, rules)
    rep = sharding.named_sharding((), None, mesh, rules)
    split = jax.jit(split_layers.__wrapped__, in_shardings=(stacked_sh,), out_shardings=split_sh)

    def f(params, prompt, valid, key):
        with sharding.use_mesh(mesh, rules):
            return _sample(params, prompt, valid, key, cfg=cfg, sc=sc)

    run = jax.jit(f, in_shardings=(split_sh, bs, bs, rep), out_shardings=SampleOutput(bs, bs, b1, b1))

    def call(params, prompt, valid, key):
        if isinstance(params["layers"], dict):
            params = split(params)
        return run(params, prompt, valid, key)

    call.split = split   # split once, reuse across calls (the layers are re-split otherwise)
    return call


def sample(params, prompt: jax.Array, valid: jax.Array, key: jax.Array, *, cfg: ModelConfig,
           sc: SampleConfig, override: transformer.Override | None = None, add_after: int | None = None) -> SampleOutput:
    """Generate up to sc.max_new_tokens for a left-padded batch (see `_sample`).

    `params` may be stacked (split once per call) or already `split_layers`-ed (reuse the
    split when sampling repeatedly from the same weights).
    """
    if isinstance(params["layers"], dict):
        params = split_layers(params)
    return _sample_jit(params, prompt, valid, key, cfg=cfg, sc=sc, override=override, add_after=add_after)


@functools.partial(jax.jit, static_argnames=("cfg", "sc", "add_after"))
def _sample_jit(params, prompt, valid, key, *, cfg, sc, override=None, add_after=None):
    return _sample(params, prompt, valid, key, cfg=cfg, sc=sc, override=override, add_after=add_after)


# Decode steps run before the while_loop instead of in it (0: none). Only `aot` sets it: XLA's cost
# analysis counts a loop body once, so compiling with 1 and 0 peeled steps measures one step's cost.
# A peeled step computes exactly what the loop's first iteration would (rows already done stay pad).
DECODE_PEEL = 0


def _sample(params, prompt: jax.Array, valid: jax.Array, key: jax.Array, *, cfg: ModelConfig,
            sc: SampleConfig, override: transformer.Override | None = None, add_after: int | None = None,
            group: int = 1) -> SampleOutput:
    """Generate up to sc.max_new_tokens for a left-padded batch.

    params: with "layers" split per layer (`split_layers`: unrolled decode, XLA:CPU's fastest) or
    stacked (a scan over layers: accelerators; see _layers_with_cache_scanned); prompt, valid: [b, P] (int tokens, bool
    not-padding); override: vectors written in place of prompt embeddings (the verbalizer's
    injection); with add_after=j they are added, norm-matched, after block j instead.
    group=G: G samples per prompt, rows b*G..b*G+G-1 of the output continuing prompt b; the
    prompt is prefilled once and its KV cache repeated (GRPO's groups share their prompt).
    """
    b, P = prompt.shape
    N = sc.max_new_tokens
    Tn = P + N
    dtype = params["embed"].dtype
    layers = params["layers"]
    scanned = isinstance(layers, dict)          # stacked layers: decode scans them (see above)
    run_layers = _layers_with_cache_scanned if scanned else _layers_with_cache
    shape = (b, cfg.n_kv_heads, Tn, cfg.head_dim)
    if scanned:
        cache = (jnp.zeros((cfg.n_layers,) + shape, dtype), jnp.zeros((cfg.n_layers,) + shape, dtype))
    else:
        cache = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in layers)
    kv_valid = jnp.concatenate([valid, jnp.ones((b, N), bool)], axis=1)  # [b, T]
    slots = jnp.arange(Tn)
    eos = jnp.asarray(cfg.eos_ids if cfg.eos_ids else (-1,), jnp.int32)

    # -- prefill: the whole prompt in one pass, filling cache slots [0, P)
    hook = None
    if add_after is not None:
        hook = (add_after, lambda h: transformer.add_at(h, override))
        x = transformer.embed(params, prompt, cfg=cfg)
    else:
        x = transformer.embed(params, prompt, override, cfg)
    mask = (slots[None, None, :] <= jnp.arange(P)[None, :, None]) & kv_valid[:, None, :]  # [b, P, T]
    tables = transformer.attn_tables(cfg, transformer.positions_from_mask(valid), mask, jnp.arange(P), slots)
    x, cache = run_layers(cfg, layers, x, tables, cache, 0, hook)
    logits = transformer.unembed(cfg, params, x[:, -1:])[:, 0]  # [b, V]
    if group > 1:  # from here on every row is one sample: [b * G, ...]
        rep = lambda a, axis=0: jnp.repeat(a, group, axis=axis)
        cache = jax.tree.map(lambda a: rep(a, 1 if scanned else 0), cache)     # the batch axis
        logits, kv_valid, valid = rep(logits), rep(kv_valid), rep(valid)
        b = b * group
    prompt_len = valid.sum(axis=1).astype(jnp.int32)  # [b]
    key, sub = jax.random.split(key)
    tok, lp = _choose(logits, sub, sc)
    done = jnp.isin(tok, eos) & sc.stop_at_eos
    out_tok = jnp.full((b, N), cfg.pad_id, jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((b, N), jnp.float32).at[:, 0].set(lp)

    # -- decode: feed token i at slot P + i, sample token i + 1
    def cond(state):
        i, _, _, _, _, done, _ = state
        return (i < N - 1) & ~jnp.all(done)

    def step(state):
        i, tok, cache, out_tok, out_lp, done, key = state
        slot = P + i
        x = transformer.embed(params, tok[:, None], cfg=cfg)
        pos = (prompt_len + i)[:, None]
        mask = (slots[None, None, :] <= slot) & kv_valid[:, None, :]  # [b, 1, T]
        tables = transformer.attn_tables(cfg, pos, mask, slot[None], slots)
        x, cache = run_layers(cfg, layers, x, tables, cache, slot)
        logits = transformer.unembed(cfg, params, x)[:, 0]
        key, sub = jax.random.split(key)
        nxt, lp = _choose(logits, sub, sc)
        nxt = jnp.where(done, cfg.pad_id, nxt)
        lp = jnp.where(done, 0.0, lp)
        out_tok = jax.lax.dynamic_update_slice(out_tok, nxt[:, None], (0, i + 1))
        out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, i + 1))
        done = done | (jnp.isin(nxt, eos) & sc.stop_at_eos)
        return i + 1, nxt, cache, out_tok, out_lp, done, key

    state = (jnp.int32(0), tok, cache, out_tok, out_lp, done, key)
    for _ in range(min(DECODE_PEEL, N - 1)):   # aot's cost probe only: the same steps, outside the loop
        state = step(state)
    _, _, _, out_tok, out_lp, done, _ = jax.lax.while_loop(cond, step, state)
    is_eos = jnp.isin(out_tok, eos)
    first_eos = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, N)
    lengths = jnp.where(done, first_eos, N).astype(jnp.int32)
    return SampleOutput(out_tok, out_lp, lengths, done)


def generate_text(params, cfg: ModelConfig, tok, prompts: Sequence[str], sc: SampleConfig, seed: int = 0,
                  chat: bool = True) -> list[str]:
    """Convenience: chat prompts in, decoded replies out."""
    ids = [tok.encode_chat(p) if chat else tok.bos(tok.encode(p)) for p in prompts]
    toks, valid = pad_prompts(ids, cfg.pad_id)
    out = sample(params, jnp.asarray(toks), jnp.asarray(valid), jax.random.key(seed), cfg=cfg, sc=sc)
    res = []
    for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths)):
        res.append(tok.decode(row[:n].tolist(), skip_special=True))
    return res
