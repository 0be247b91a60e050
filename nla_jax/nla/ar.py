"""Activation reconstructor: blocks 0..K of the target, no final norm, a linear head.

The AR reads only an explanation inside a fixed wrapper, `prefix + explanation + suffix`, and
regresses the activation from block K's output at the wrapper's last token. The head is
Linear(d, d) initialised to the identity (or, with head_init="ridge", to the ridge solution on
the warm-start data), with a bias unless `ar.head_bias` is false (the official release's head has
none: its params are then {"w"} alone). `head_norm="rms"` scales the head's input to norm sqrt(d) first: raw block
outputs have norms in the hundreds with two huge dimensions, which an identity head trains on
badly (WORKSPACE.md, "The method in brief").

Inputs are right-padded (positions count from each row's first token), so the read-out index is
prefix + explanation length + suffix - 1, computed inside the compiled step.

Tokenisation of the wrapper (`ar.tokenize`): "pieces" (default) joins the ids of prefix, explanation
and suffix, which is what the compiled SFT and RL steps can do with sampled ids; "joint" tokenises
`prefix + text + suffix` as one string on the host (`host_wrapped`), as the official release does, so
a BPE merge across a boundary (Qwen: ">The", ".</") comes out as it was trained. explain and evaluate
honour it (`measure.reconstruct`); the compiled training steps always use pieces.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nla_jax.errors import UserError
from nla_jax.models import transformer
from nla_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ARSpec:
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    max_len: int            # explanation tokens the wrapper holds
    pad_id: int
    layer: int              # K: the AR runs blocks 0..K
    head_norm: str          # none | rms
    joint: bool = False     # host paths: tokenise prefix + text + suffix as one string
    prefix_text: str = ""
    suffix_text: str = ""

    @property
    def seq_len(self) -> int:
        return len(self.prefix) + self.max_len + len(self.suffix)


def build_spec(tok, mcfg: ModelConfig, ar, layer: int, max_len: int) -> ARSpec:
    if ar.head_norm not in ("none", "rms"):
        raise UserError(f"config key ar.head_norm={ar.head_norm!r}: expected 'none' or 'rms'")
    prefix = tuple(tok.bos(tok.encode(ar.prefix)))
    suffix = tuple(tok.encode(ar.suffix))
    if not suffix:
        raise UserError("config key ar.suffix must be non-empty (the AR reads at its last token)")
    mode = ar.get("tokenize", "pieces")
    if mode not in ("pieces", "joint"):
        raise UserError(f"config key ar.tokenize={mode!r}: expected 'pieces' or 'joint'")
    spec = ARSpec(prefix, suffix, int(max_len), tok.pad_id, int(layer), ar.head_norm, mode == "joint",
                  ar.prefix, ar.suffix)
    if spec.seq_len > mcfg.max_seq_len:
        raise UserError(f"AR wrapper of {spec.seq_len} tokens exceeds the model's context ({mcfg.max_seq_len})")
    return spec


# ----------------------------------------------------------------------------- parameters

def init_params(target: dict, layer: int, d: int, bias: bool = True) -> dict:
    """AR params from the target's: embed, blocks 0..K (copied), head = identity (+ zero bias)."""
    head = {"w": jnp.eye(d, dtype=jnp.float32)}
    if bias:
        head["b"] = jnp.zeros((d,), jnp.float32)
    return {"embed": target["embed"], "layers": jax.tree.map(lambda a: a[:layer + 1], target["layers"]), "head": head}


def param_axes(cfg: ModelConfig, bias: bool = True) -> dict:
    ax = transformer.param_axes(cfg)
    head = {"w": ("embed", None), "b": (None,)} if bias else {"w": ("embed", None)}
    return {"embed": ax["embed"], "layers": ax["layers"], "head": head}


def abstract_params(cfg: ModelConfig, layer: int, dtype, bias: bool = True) -> dict:
    a = transformer.abstract_params(cfg, dtype)
    layers = jax.tree.map(lambda s: jax.ShapeDtypeStruct((layer + 1,) + s.shape[1:], s.dtype), a["layers"])
    d = cfg.d_model
    head = {"w": jax.ShapeDtypeStruct((d, d), jnp.float32)}
    if bias:
        head["b"] = jax.ShapeDtypeStruct((d,), jnp.float32)
    return {"embed": a["embed"], "layers": layers, "head": head}


# ----------------------------------------------------------------------------- inputs

def assemble(spec: ARSpec, expl: jax.Array, expl_len: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Wrapper tokens for explanations. expl: [b, >=max_len] ids, expl_len: [b].

    Returns (tokens [b, S], valid [b, S], read_at [b]); explanations longer than max_len are cut.
    """
    b = expl.shape[0]
    P, Q, M = len(spec.prefix), len(spec.suffix), spec.max_len
    n = jnp.clip(expl_len, 0, M)[:, None]                   # [b, 1]
    i = jnp.arange(spec.seq_len)[None, :]                   # [1, S]
    pre = jnp.asarray(spec.prefix, jnp.int32)
    suf = jnp.asarray(spec.suffix, jnp.int32)
    e = expl[:, :M].astype(jnp.int32)
    e = jnp.pad(e, ((0, 0), (0, max(0, M - e.shape[1]))), constant_values=spec.pad_id)
    in_pre = i < P
    in_expl = (i >= P) & (i < P + n)
    in_suf = (i >= P + n) & (i < P + n + Q)
    tok = jnp.full((b, spec.seq_len), spec.pad_id, jnp.int32)
    tok = jnp.where(in_pre, pre[jnp.clip(i, 0, P - 1)], tok)
    tok = jnp.where(in_expl, jnp.take_along_axis(e, jnp.clip(i - P, 0, M - 1).repeat(b, 0), axis=1), tok)
    tok = jnp.where(in_suf, suf[jnp.clip(i - P - n, 0, Q - 1)], tok)
    valid = in_pre | in_expl | in_suf
    return tok, valid, (P + n[:, 0] + Q - 1).astype(jnp.int32)


def host_explanations(tok, texts: Sequence[str], spec: ARSpec) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> explanation ids [b, max_len] and lengths [b] (cut at max_len)."""
    ids = np.full((len(texts), spec.max_len), spec.pad_id, np.int32)
    lens = np.zeros(len(texts), np.int32)
    for i, t in enumerate(texts):
        row = explanation_ids(tok, t, spec.max_len)
        ids[i, :len(row)] = row
        lens[i] = len(row)
    return ids, lens


def explanation_ids(tok, text: str, max_len: int) -> list[int]:
    """One explanation's ids as the AR reads it: the text (whitespace collapsed) cut at max_len."""
    return tok.encode(" ".join(text.split()))[:max_len]


def host_wrapped(tok, texts: Sequence[str], spec: ARSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ar.tokenize="joint": each text (stripped) inside the wrapper tokenised as one string, BOS by the
    tokenizer's policy. Returns (tokens [b, S], valid [b, S], read_at [b]) right-padded, S = spec.seq_len.
    A row longer than S (an explanation past the cap) falls back to the pieces, its text cut to max_len."""
    S = spec.seq_len
    toks = np.full((len(texts), S), spec.pad_id, np.int32)
    valid = np.zeros((len(texts), S), bool)
    read_at = np.zeros(len(texts), np.int32)
    for i, t in enumerate(texts):
        row = tok.bos(tok.encode(spec.prefix_text + t.strip() + spec.suffix_text))
        if len(row) > S:
            row = list(spec.prefix) + tok.encode(t.strip())[:spec.max_len] + list(spec.suffix)
        toks[i, :len(row)] = row
        valid[i, :len(row)] = True
        read_at[i] = len(row) - 1
    return toks, valid, read_at


# ----------------------------------------------------------------------------- forward

def features(params: dict, cfg: ModelConfig, spec: ARSpec, tokens: jax.Array, valid: jax.Array,
             read_at: jax.Array, remat: bool = False) -> jax.Array:
    """Block K's output at the read-out token, optionally RMS-normalised: [b, d] float32."""
    positions = transformer.positions_from_mask(valid)
    x = transformer.embed(params, tokens, cfg=cfg)
    x = transformer.run_blocks(cfg, params["layers"], x, positions, transformer.causal_mask(valid), 0, spec.layer + 1,
                               remat, valid)
    h = jnp.take_along_axis(x, read_at[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # [b, d]
    if spec.head_norm == "rms":
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
    return h


def head(params: dict, h: jax.Array) -> jax.Array:
    y = h @ params["head"]["w"]
    return y + params["head"]["b"] if "b" in params["head"] else y


def predict(params: dict, cfg: ModelConfig, spec: ARSpec, expl: jax.Array, expl_len: jax.Array,
            remat: bool = False) -> jax.Array:
    """Explanation ids -> predicted activation [b, d] (compare after normalising)."""
    tok, valid, read_at = assemble(spec, expl, expl_len)
    return head(params, features(params, cfg, spec, tok, valid, read_at, remat))


def ridge(feats: np.ndarray, targets: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Head (w [d, d], b [d]) minimising |X w + b - Y|^2 + lam * n * |w|^2 (features centred)."""
    X = feats.astype(np.float64)
    Y = targets.astype(np.float64)
    xm, ym = X.mean(0), Y.mean(0)
    Xc, Yc = X - xm, Y - ym
    d = X.shape[1]
    w = np.linalg.solve(Xc.T @ Xc + lam * len(X) * np.eye(d), Xc.T @ Yc)
    return w.astype(np.float32), (ym - xm @ w).astype(np.float32)
