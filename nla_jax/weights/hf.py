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

# transformers `model_type` -> nla_jax model family (Mistral without sliding windows is a Llama;
# "gemma3" is the multimodal Gemma-3 checkpoint, whose text model nla_jax reads).
FAMILIES = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama", "qwen3": "qwen3", "gemma3_text": "gemma3",
            "gemma3": "gemma3"}
# nla_jax model family -> transformers architecture classes (causal LM, base model without LM head).
# safetensors shard size of exported model directories (export writes above it as model-0000i-of-n
# plus an index, fetching one shard's tensors at a time: this is also its host-memory bound)
SHARD_BYTES = 4 << 30
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "LlamaModel"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Model"),
                 "qwen3": ("Qwen3ForCausalLM", "Qwen3Model"), "gemma3": ("Gemma3ForCausalLM", "Gemma3TextModel")}
# nla_jax family -> the model_type its exported config.json carries
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
# Where the decoder's tensors sit: a causal LM ("model."), or a Gemma-3 multimodal checkpoint as
# transformers >= 5 writes it / as the Hub's files (written by transformers 4.x) hold it.
DECODER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")


def _rope(c: dict, cp: str, kind: str | None = None) -> tuple[float | None, tuple | None]:
    """(theta, scaling) of one attention kind. transformers >= 5 writes `rope_parameters` (per layer
    kind for Gemma-3: {"full_attention": {...}, "sliding_attention": {...}}); older files use
    rope_theta / rope_scaling (/ rope_local_base_freq)."""
    rp = c.get("rope_parameters") or {}
    if kind is not None and kind in rp:  # per layer kind: that entry alone says theta and scaling
        rp = rp[kind] or {}
        theta, rs = rp.get("rope_theta"), (rp if rp.get("rope_type", "default") != "default" else None)
    elif kind == "sliding_attention":  # legacy Gemma-3: local base, never scaled
        return c.get("rope_local_base_freq"), None
    else:
        theta = rp.get("rope_theta") or c.get("rope_theta")
        rs = c.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if rs is None:
        return theta, None
    kind_ = rs.get("rope_type", rs.get("type"))
    if kind_ not in ("llama3", "linear", "default"):
        raise UserError(f"{cp!r}: rope_scaling type {kind_!r} is not supported (llama3, linear)")
    if kind_ == "default":
        return theta, None
    return theta, tuple(sorted((k, v) for k, v in rs.items() if k not in ("type", "rope_theta")))


def model_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, the raw config.json) of a model directory; the tokenizer reads the raw one too."""
    cp = os.path.join(path, "config.json")
    if not os.path.isfile(cp):
        raise UserError(f"model directory {path!r} has no config.json")
    try:
        with open(cp) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{cp!r} is not valid JSON: {e}") from e
    mt = raw.get("model_type")
    if mt not in FAMILIES:
        raise UserError(f"unsupported architecture {mt!r} in {cp!r}; supported: {', '.join(FAMILIES)}")
    c = raw
    if mt == "gemma3":  # multimodal: the text model's settings, ids from the outer config when absent
        c = dict(raw.get("text_config") or {})
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
            if k not in c and k in raw:
                c[k] = raw[k]
    family = FAMILIES[mt]
    extra: dict[str, Any] = {}
    if family == "gemma3":
        for k in ("final_logit_softcapping", "attn_logit_softcapping"):
            if c.get(k) is not None:
                raise UserError(f"{cp!r}: {k}={c[k]} is not supported (Gemma-3 has none)")
        n = c["num_hidden_layers"]
        # a truncated model (the official AR: K+1 blocks) may keep the full model's list: its first n
        types = (c.get("layer_types") or [])[:n] or [
            "sliding_attention" if (i + 1) % int(c.get("sliding_window_pattern", 6)) else "full_attention"
            for i in range(n)]
        local_theta, _ = _rope(c, cp, "sliding_attention")
        extra = dict(layer_types=tuple("sliding" if t == "sliding_attention" else "full" for t in types),
                     sliding_window=int(c.get("sliding_window") or 4096),
                     rope_local_theta=float(local_theta or 10000.0),
                     attn_scale=float(c.get("query_pre_attn_scalar", 256)) ** -0.5)
        theta, rs = _rope(c, cp, "full_attention")
        theta = theta or 1_000_000.0
    else:
        if c.get("use_sliding_window"):
            raise UserError(f"{cp!r}: sliding-window attention is not supported for {mt}")
        theta, rs = _rope(c, cp)
    h = c["num_attention_heads"]
    eos = c.get("eos_token_id")
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
    if act not in ("silu", "gelu_pytorch_tanh", "gelu_tanh"):
        raise UserError(f"{cp!r}: activation {act!r} is not supported (silu, gelu_pytorch_tanh)")
    cfg = ModelConfig(
        family=family, n_layers=c["num_hidden_layers"], d_model=c["hidden_size"], n_heads=h,
        n_kv_heads=c.get("num_key_value_heads", h), head_dim=c.get("head_dim") or c["hidden_size"] // h,
        d_ff=c["intermediate_size"], vocab_size=c["vocab_size"], rope_theta=float(theta or 10000.0),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", family == "gemma3")),
        qkv_bias=bool(c.get("attention_bias", mt == "qwen2")), max_seq_len=int(c.get("max_position_embeddings", 8192)),
        bos_id=c.get("bos_token_id"), eos_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
        pad_id=int(c.get("pad_token_id") or 0), rope_scaling=rs, name=os.path.basename(os.path.normpath(path)),
        activation="gelu_tanh" if act.startswith("gelu") else "silu", **extra)
    return cfg, raw


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


def decoder_prefix(names, path: str) -> str:
    """Where the decoder's tensors sit in a checkpoint (DECODER_PREFIXES), from its tensor names."""
    for p in DECODER_PREFIXES:
        if p + "embed_tokens.weight" in names:
            return p
    raise UserError(f"{path!r} holds no embedding tensor (looked for "
                    f"{', '.join(p + 'embed_tokens.weight' for p in DECODER_PREFIXES)})")


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

    prefix = decoder_prefix(where, path)

    def layer_tensor(leaf: str, layer: int) -> np.ndarray:
        return raw(layout.hf_layer_name(layer, leaf, cfg, prefix))

    def top_tensor(leaf: str) -> np.ndarray:
        return raw(layout.hf_top_name(leaf, prefix))

    return layout.leaf_reader(cfg, layer_tensor, top_tensor)
