"""GGUF files (llama.cpp's format): metadata -> ModelConfig, and a leaf reader that dequantises tensors.

A GGUF tensor is brought to the Hugging Face layout first (the GGUF tensor-name table below, then
for Llama models the inverse of llama.cpp's Q/K row permutation), so the conversion into nla_jax's
leaves is the one Hugging Face checkpoints use as well (layout.leaf_reader).
"""
from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

from nla_jax.errors import UserError
from nla_jax.models.config import ModelConfig
from nla_jax.weights import layout

# nla_jax layer leaf -> GGUF tensor name inside `blk.{i}.`.
GGUF_LAYER = {
    "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
    "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight", "wo": "attn_output.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
}
# nla_jax top-level leaf -> GGUF tensor name (already in the Hugging Face layout: [V, D] for both matrices).
GGUF_TOP = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}


def open_file(path: str) -> gguf.GGUFReader:
    """A GGUFReader, or a one-line UserError for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise UserError(f"model file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise UserError(f"model file {path!r} is truncated or not a GGUF file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The file's key/value metadata as Python values (fields the gguf package cannot decode are left out)."""
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:
            continue
    return out


def tensor_names(reader: gguf.GGUFReader) -> set[str]:
    return {t.name for t in reader.tensors}


def model_config(fields: dict[str, Any], names: set[str], name: str) -> ModelConfig:
    """The ModelConfig of a GGUF file from its metadata and tensor names (`name` is used in messages)."""
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise UserError(f"unsupported architecture {arch!r} in GGUF {name!r}; supported: llama, qwen2")

    def g(key, default=None):
        v = fields.get(f"{arch}.{key}", default)
        if v is None:
            raise UserError(f"GGUF {name!r} lacks metadata key {arch}.{key}")
        return v

    if "rope_freqs.weight" in names:
        raise UserError(f"GGUF {name!r} carries rope_freqs (Llama-3.1-style RoPE scaling), which the GGUF "
                        f"loader does not apply; load the model's Hugging Face directory instead")
    d, h = int(g("embedding_length")), int(g("attention.head_count"))
    vocab = fields.get(f"{arch}.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        family="qwen2" if arch == "qwen2" else "llama", n_layers=int(g("block_count")), d_model=d,
        n_heads=h, n_kv_heads=int(g("attention.head_count_kv", h)),
        head_dim=int(fields.get(f"{arch}.attention.key_length", d // h)), d_ff=int(g("feed_forward_length")),
        vocab_size=int(vocab), rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_eps=float(g("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
        max_seq_len=int(g("context_length", 8192)), bos_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_ids=(int(eos),) if eos is not None else (), pad_id=int(fields.get("tokenizer.ggml.padding_token_id", 0)),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        name=str(fields.get("general.name", os.path.basename(name))))


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half layout).

    llama.cpp's converter reorders the rows of Llama's q and k projections so that its RoPE can
    rotate adjacent pairs; transformers and nla_jax rotate the two halves of each head instead."""
    out_dim = w.shape[0]
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def leaf_reader(reader: gguf.GGUFReader, cfg: ModelConfig) -> layout.LeafReader:
    """Read nla_jax leaves from an open GGUF file, dequantised to float32 tensor by tensor."""
    tensors = {t.name: t for t in reader.tensors}
    permuted = cfg.family == "llama"  # llama.cpp permutes Llama's q/k rows only (not Qwen2's)

    def raw(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"GGUF is missing tensor {name!r}")
        t = tensors[name]
        try:
            return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except Exception as e:
            raise UserError(f"GGUF tensor {name!r} of type {t.tensor_type.name} cannot be dequantised: {e}") from e

    def layer_tensor(leaf: str, layer: int) -> np.ndarray:
        w = raw(f"blk.{layer}.{GGUF_LAYER[leaf]}")
        if permuted and leaf in ("wq", "bq"):
            w = unpermute_rope_rows(w, cfg.n_heads)
        elif permuted and leaf in ("wk", "bk"):
            w = unpermute_rope_rows(w, cfg.n_kv_heads)
        return w

    def top_tensor(leaf: str) -> np.ndarray:
        return raw(GGUF_TOP[leaf])

    return layout.leaf_reader(cfg, layer_tensor, top_tensor)
