"""Compiled sampler: jitted prefill plus a `lax.while_loop` decode over a KV cache.

Prompts of different lengths are left-padded; position ids restart at each row's first real
token and padding keys are masked, so a padded row computes exactly what it would alone.
The cache is [layers, batch, kv_heads, prompt + new, head_dim] and lives in the loop carry,
updated in place (one token per layer per step). Decoding stops when every row has emitted
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

from nla_jax.models import transformer as T
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
    """Pick one token per row from float32 logits [b, V]; returns (token [b], logprob [b])."""
    if sc.greedy:
        logp = jax.nn.log_softmax(logits, axis=-1)
        tok = jnp.argmax(logits, axis=-1)
        return tok.astype(jnp.int32), jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    scaled = logits / sc.temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    if sc.top_k > 0:
        vals, idx = jax.lax.top_k(scaled, sc.top_k)  # [b, k], descending
        if sc.top_p < 1.0:
            vals = _top_p_mask(vals, sc.top_p)
        choice = jax.random.categorical(key, vals, axis=-1)
        tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    elif sc.top_p < 1.0:
        order = jnp.argsort(-scaled, axis=-1)
        vals = _top_p_mask(jnp.take_along_axis(scaled, order, axis=-1), sc.top_p)
        choice = jax.random.categorical(key, vals, axis=-1)
        tok = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    else:
        tok = jax.random.categorical(key, scaled, axis=-1)
    tok = tok.astype(jnp.int32)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def _top_p_mask(sorted_vals: jax.Array, p: float) -> jax.Array:
    """Keep the smallest prefix of descending logits whose probability mass reaches p."""
    probs = jax.nn.softmax(sorted_vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each entry
    return jnp.where(before < p, sorted_vals, -jnp.inf)


def _layers_with_cache(cfg: ModelConfig, layers, x, cos, sin, mask, ck, cv, slot):
    """All blocks on x [b, s, d], writing this call's k/v into the cache at `slot`.

    The cache is scanned over (xs) and re-stacked (ys) rather than carried: XLA then writes each
    layer's slice once per call instead of copying the whole cache at every layer.
    """

    def body(h, xs):
        lp, ck_l, cv_l = xs  # ck_l: [b, KV, T, hd]

        def write(k, v):
            ck_new = jax.lax.dynamic_update_slice(ck_l, k.astype(ck_l.dtype), (0, 0, slot, 0))
            cv_new = jax.lax.dynamic_update_slice(cv_l, v.astype(cv_l.dtype), (0, 0, slot, 0))
            return ck_new, cv_new, (ck_new, cv_new)

        h, (ck_new, cv_new) = T.block(cfg, lp, h, cos, sin, mask, cache_write=write)
        return h, (ck_new, cv_new)

    x, (ck, cv) = jax.lax.scan(body, x, (layers, ck, cv))
    return x, ck, cv


def make_sampler(cfg: ModelConfig, sc: SampleConfig, mesh, rules, dtype=jnp.float32):
    """`sample` under jax.jit with explicit shardings: f(params, prompt, valid, key) -> SampleOutput."""
    from nla_jax import sharding
    p_sh = sharding.tree_shardings(T.param_axes(cfg), T.abstract_params(cfg, dtype), mesh, rules)
    bs = sharding.named_sharding(("batch", "seq"), None, mesh, rules)
    b1 = sharding.named_sharding(("batch",), None, mesh, rules)
    rep = sharding.named_sharding((), None, mesh, rules)

    def f(params, prompt, valid, key):
        with sharding.use_mesh(mesh, rules):
            return _sample(params, prompt, valid, key, cfg=cfg, sc=sc)

    return jax.jit(f, in_shardings=(p_sh, bs, bs, rep), out_shardings=SampleOutput(bs, bs, b1, b1))


@functools.partial(jax.jit, static_argnames=("cfg", "sc"))
def sample(params, prompt: jax.Array, valid: jax.Array, key: jax.Array, *, cfg: ModelConfig,
           sc: SampleConfig, override: T.Override | None = None) -> SampleOutput:
    """Generate up to sc.max_new_tokens for a left-padded batch (see `_sample`)."""
    return _sample(params, prompt, valid, key, cfg=cfg, sc=sc, override=override)


def _sample(params, prompt: jax.Array, valid: jax.Array, key: jax.Array, *, cfg: ModelConfig,
           sc: SampleConfig, override: T.Override | None = None) -> SampleOutput:
    """Generate up to sc.max_new_tokens for a left-padded batch.

    prompt, valid: [b, P] (int tokens, bool not-padding); override: vectors written in place of
    prompt embeddings (the verbalizer's injection).
    """
    b, P = prompt.shape
    N = sc.max_new_tokens
    Tn = P + N
    dtype = params["embed"].dtype
    ck = jnp.zeros((cfg.n_layers, b, cfg.n_kv_heads, Tn, cfg.head_dim), dtype)
    cv = jnp.zeros_like(ck)
    kv_valid = jnp.concatenate([valid, jnp.ones((b, N), bool)], axis=1)  # [b, T]
    prompt_len = valid.sum(axis=1).astype(jnp.int32)  # [b]
    slots = jnp.arange(Tn)
    eos = jnp.asarray(cfg.eos_ids if cfg.eos_ids else (-1,), jnp.int32)

    # -- prefill: the whole prompt in one pass, filling cache slots [0, P)
    x = T.embed(params, prompt, override)
    cos, sin = T.rope_tables(T.positions_from_mask(valid), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    mask = (slots[None, None, :] <= jnp.arange(P)[None, :, None]) & kv_valid[:, None, :]  # [b, P, T]
    x, ck, cv = _layers_with_cache(cfg, params["layers"], x, cos, sin, mask, ck, cv, 0)
    logits = T.unembed(cfg, params, x[:, -1:])[:, 0]  # [b, V]
    key, sub = jax.random.split(key)
    tok, lp = _choose(logits, sub, sc)
    done = jnp.isin(tok, eos) & sc.stop_at_eos
    out_tok = jnp.full((b, N), cfg.pad_id, jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((b, N), jnp.float32).at[:, 0].set(lp)

    # -- decode: feed token i at slot P + i, sample token i + 1
    def cond(state):
        i, _, _, _, _, _, done, _ = state
        return (i < N - 1) & ~jnp.all(done)

    def step(state):
        i, tok, ck, cv, out_tok, out_lp, done, key = state
        slot = P + i
        x = T.embed(params, tok[:, None])
        pos = (prompt_len + i)[:, None]
        cos, sin = T.rope_tables(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        mask = (slots[None, None, :] <= slot) & kv_valid[:, None, :]  # [b, 1, T]
        x, ck, cv = _layers_with_cache(cfg, params["layers"], x, cos, sin, mask, ck, cv, slot)
        logits = T.unembed(cfg, params, x)[:, 0]
        key, sub = jax.random.split(key)
        nxt, lp = _choose(logits, sub, sc)
        nxt = jnp.where(done, cfg.pad_id, nxt)
        lp = jnp.where(done, 0.0, lp)
        out_tok = jax.lax.dynamic_update_slice(out_tok, nxt[:, None], (0, i + 1))
        out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, i + 1))
        done = done | (jnp.isin(nxt, eos) & sc.stop_at_eos)
        return i + 1, nxt, ck, cv, out_tok, out_lp, done, key

    state = (jnp.int32(0), tok, ck, cv, out_tok, out_lp, done, key)
    state = jax.lax.while_loop(cond, step, state)
    _, _, _, _, out_tok, out_lp, done, _ = state
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
