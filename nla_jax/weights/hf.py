"""Hugging Face model directories: config.json -> ModelConfig, and a leaf reader over *.safetensors.

A directory holds either one model.safetensors or shards listed in model.safetensors.index.json.
Tensors are read one at a time through safetensors' memory-mapped handles, so a process that
holds a slice of the model reads only the tensors of that slice.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors import safe_open

from nla_jax.errors import UserError
from nla_jax.models.config import ModelConfig
from nla_jax.weights import layout

# transformers `model_type` -> nla_jax model family (Mistral without sliding windows is a Llama).
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}
# nla_jax model family -> transformers architecture classes (causal LM, base model without LM head).
# safetensors shard size of exported model directories (export writes above it as model-0000i-of-n
# plus an index, fetching one shard's tensors at a time: this is also its host-memory bound)
SHARD_BYTES = 4 << 30
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "LlamaModel"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Model")}


def model_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, the raw config.json) of a model directory; the tokenizer reads the raw one too."""
    cp = os.path.join(path, "config.json")
    if not os.path.isfile(cp):
        raise UserError(f"model directory {path!r} has no config.json")
    try:
        with open(cp) as f:
            c = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{cp!r} is not valid JSON: {e}") from e
    mt = c.get("model_type")
    if mt not in FAMILIES:
        raise UserError(f"unsupported architecture {mt!r} in {cp!r}; supported: {', '.join(FAMILIES)}")
    if c.get("use_sliding_window"):
        raise UserError(f"{cp!r}: sliding-window attention is not supported")
    # transformers >= 5 writes RoPE settings as `rope_parameters` (theta and type together) and
    # leaves rope_theta / rope_scaling out or null; older files use the two legacy keys.
    rp = c.get("rope_parameters") or {}
    theta = c.get("rope_theta") or rp.get("rope_theta") or 10000.0
    rs = c.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ("llama3", "default"):
            raise UserError(f"{cp!r}: rope_scaling type {kind!r} is not supported (llama3 only)")
        rs = None if kind == "default" else tuple(sorted((k, v) for k, v in rs.items()
                                                         if k not in ("type", "rope_theta")))
    h = c["num_attention_heads"]
    eos = c.get("eos_token_id")
    cfg = ModelConfig(
        family=FAMILIES[mt], n_layers=c["num_hidden_layers"], d_model=c["hidden_size"], n_heads=h,
        n_kv_heads=c.get("num_key_value_heads", h), head_dim=c.get("head_dim") or c["hidden_size"] // h,
        d_ff=c["intermediate_size"], vocab_size=c["vocab_size"], rope_theta=float(theta),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bool(c.get("attention_bias", mt == "qwen2")), max_seq_len=int(c.get("max_position_embeddings", 8192)),
        bos_id=c.get("bos_token_id"), eos_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
        pad_id=int(c.get("pad_token_id") or 0), rope_scaling=rs, name=os.path.basename(os.path.normpath(path)))
    return cfg, c


def safetensors_index(path: str) -> dict[str, str]:
    """{tensor name: the file holding it} for a model directory (sharded or a single file)."""
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in wm.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise UserError(f"model directory {path!r} has no model.safetensors or model.safetensors.index.json")
    try:
        with safe_open(single, "numpy") as f:
            return {k: single for k in f.keys()}
    except Exception as e:
        raise UserError(f"{single!r} is truncated or not a safetensors file: {e}") from e


def _holds_bf16(fn: str) -> bool:
    """numpy cannot hold bfloat16: files holding any are read through the flax (jax) backend."""
    with open(fn, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values())


def leaf_reader(path: str, cfg: ModelConfig) -> layout.LeafReader:
    """Read nla_jax leaves from a model directory's safetensors (float32 host arrays)."""
    where = safetensors_index(path)
    handles: dict[str, Any] = {}

    def raw(name: str) -> np.ndarray:
        if name not in where:
            raise UserError(f"{path!r} is missing tensor {name!r}")
        fn = where[name]
        if fn not in handles:
            if not os.path.isfile(fn):
                raise UserError(f"safetensors shard {fn!r} named in the index does not exist")
            try:
                handles[fn] = safe_open(fn, "flax" if _holds_bf16(fn) else "numpy")
            except Exception as e:
                raise UserError(f"{fn!r} is truncated or not a safetensors file: {e}") from e
        try:
            t = handles[fn].get_tensor(name)
        except Exception as e:
            raise UserError(f"cannot read tensor {name!r} from {fn!r} (truncated?): {e}") from e
        return np.asarray(t, dtype=np.float32)

    def layer_tensor(leaf: str, layer: int) -> np.ndarray:
        return raw(layout.hf_layer_name(layer, leaf))

    def top_tensor(leaf: str) -> np.ndarray:
        return raw(layout.HF_TOP[leaf])

    return layout.leaf_reader(cfg, layer_tensor, top_tensor)
