"""An independent float64 NumPy implementation of the decoder, for checking nla_jax.models.

Written from the architecture's definition (Llama / SmolLM2 / Qwen2 as in Hugging Face
transformers), deliberately sharing no code with nla_jax.models: it reads the parameter pytree
(any array type; converted to float64 here) and a ModelConfig-like object, and loops over
layers, heads and positions in the most literal way that is still fast enough for tests.

    out = reference_forward(params, tokens, cfg)           # tokens: [s] ints, one sequence
    out["logits"]  [s, V]                                  # float64
    out["hidden"]  list of n_layers arrays [s, d]          # residual stream after block k
                                                           # (= HF hidden_states[k + 1])

Parameter layout it expects (ours): embed [V, D]; layers/* stacked on a leading layer axis:
wq [L, D, H, hd], wk/wv [L, D, KV, hd], wo [L, H, hd, D], w_gate/w_up [L, D, F],
w_down [L, F, D], attn_norm/mlp_norm [L, D], optional bq [L, H, hd], bk/bv [L, KV, hd];
final_norm [D]; lm_head [D, V] unless the embeddings are tied.
Llama-3 rope_scaling is not implemented (the test models don't use it).
"""
from __future__ import annotations

import numpy as np


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_cos_sin(n_pos: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [n_pos, head_dim] in the HF layout: frequencies repeated for both halves."""
    inv = np.array([theta ** (-(2.0 * i) / head_dim) for i in range(head_dim // 2)])
    ang = np.outer(np.arange(n_pos, dtype=np.float64), inv)  # [s, hd/2]
    ang = np.concatenate([ang, ang], axis=-1)  # [s, hd]
    return np.cos(ang), np.sin(ang)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [s, hd] for one head."""
    return x * cos + rotate_half(x) * sin


def softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def attention_layer(x: np.ndarray, lp: dict, layer: int, cfg, cos, sin) -> np.ndarray:
    """Causal multi-head attention with grouped K/V heads. x: [s, D] (already normed)."""
    s, D = x.shape
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    group = H // KV
    Wq = _f64(lp["wq"][layer]).reshape(D, H * hd)
    Wk = _f64(lp["wk"][layer]).reshape(D, KV * hd)
    Wv = _f64(lp["wv"][layer]).reshape(D, KV * hd)
    Wo = _f64(lp["wo"][layer]).reshape(H * hd, D)
    q = x @ Wq
    k = x @ Wk
    v = x @ Wv
    if cfg.qkv_bias:
        q = q + _f64(lp["bq"][layer]).reshape(H * hd)
        k = k + _f64(lp["bk"][layer]).reshape(KV * hd)
        v = v + _f64(lp["bv"][layer]).reshape(KV * hd)
    future = np.triu(np.ones((s, s), dtype=bool), k=1)
    heads_out = []
    for h in range(H):
        kvh = h // group  # query head h reads key/value head h // group
        qh = apply_rotary(q[:, h * hd:(h + 1) * hd], cos, sin)
        kh = apply_rotary(k[:, kvh * hd:(kvh + 1) * hd], cos, sin)
        vh = v[:, kvh * hd:(kvh + 1) * hd]
        scores = (qh @ kh.T) / np.sqrt(hd)
        scores = np.where(future, -np.inf, scores)
        heads_out.append(softmax(scores) @ vh)
    return np.concatenate(heads_out, axis=-1) @ Wo


def mlp_layer(x: np.ndarray, lp: dict, layer: int) -> np.ndarray:
    gate = x @ _f64(lp["w_gate"][layer])
    up = x @ _f64(lp["w_up"][layer])
    return (silu(gate) * up) @ _f64(lp["w_down"][layer])


def reference_forward(params: dict, tokens, cfg, override: dict | None = None) -> dict:
    """Logits and per-block residual streams of one unpadded sequence.

    override: optional {position: vector} written in place of those token embeddings.
    """
    tokens = np.asarray(tokens).reshape(-1)
    s = tokens.shape[0]
    emb = np.asarray(params["embed"])
    x = _f64(emb[tokens])
    for pos, vec in (override or {}).items():
        x[pos] = _f64(vec)
    cos, sin = rope_cos_sin(s, cfg.head_dim, cfg.rope_theta)
    lp = params["layers"]
    hidden = []
    for layer in range(cfg.n_layers):
        h = rmsnorm(x, _f64(lp["attn_norm"][layer]), cfg.rms_eps)
        x = x + attention_layer(h, lp, layer, cfg, cos, sin)
        h = rmsnorm(x, _f64(lp["mlp_norm"][layer]), cfg.rms_eps)
        x = x + mlp_layer(h, lp, layer)
        hidden.append(x.copy())
    h = rmsnorm(x, _f64(params["final_norm"]), cfg.rms_eps)
    if cfg.tie_embeddings:
        logits = h @ _f64(emb).T
    else:
        logits = h @ _f64(params["lm_head"])
    return {"logits": logits, "hidden": hidden}


def rel_err(a, b) -> float:
    """max |a - b| / max |b|   (b is the reference)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
