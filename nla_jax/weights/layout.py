"""The weight layouts shared by every reader and writer: Hugging Face names and shapes <-> nla_jax leaves.

Both file formats nla_jax reads (GGUF, Hugging Face safetensors) are first brought to the Hugging
Face layout (per layer, [out, in] matrices), and `leaf_reader` converts that one layout into
nla_jax's stacked leaves. The export (nla_jax/export.py) writes the same names with the inverse
conversion, so the mapping between the two naming schemes is written down once, here, and a
reader and the writer cannot disagree about it.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nla_jax.errors import UserError
from nla_jax.models import transformer
from nla_jax.models.config import ModelConfig

# (leaf path such as "layers/wq" or "embed", index into the leaf) -> that slice of the leaf.
LeafReader = Callable[[str, tuple[slice, ...]], np.ndarray]
# (nla_jax layer leaf, layer number) -> that layer's tensor in the Hugging Face layout.
LayerTensor = Callable[[str, int], np.ndarray]
# top-level leaf ("embed", "final_norm", "lm_head") -> its tensor in the Hugging Face layout.
TopTensor = Callable[[str], np.ndarray]

# nla_jax layer leaf -> transformers tensor name inside `model.layers.{i}.` (Llama, Qwen2, Mistral).
HF_LAYER = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight", "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
}
# Gemma's four norms per block: what Llama calls the post-attention norm is Gemma's pre-MLP norm.
HF_LAYER_SANDWICH = dict(HF_LAYER, mlp_norm="pre_feedforward_layernorm.weight",
                         post_attn_norm="post_attention_layernorm.weight",
                         post_mlp_norm="post_feedforward_layernorm.weight")
# nla_jax top-level leaf -> transformers tensor name.
HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def hf_layer_name(layer: int, leaf: str, cfg: ModelConfig | None = None, prefix: str = "model.") -> str:
    """The transformers name of layer `layer`'s tensor for the nla_jax leaf `leaf` (the family's
    norm names with `cfg`; `prefix` is where the decoder sits, e.g. "model.language_model." in a
    Gemma-3 multimodal checkpoint)."""
    table = HF_LAYER_SANDWICH if cfg is not None and cfg.sandwich_norms else HF_LAYER
    return f"{prefix}layers.{layer}.{table[leaf]}"


def hf_top_name(leaf: str, prefix: str = "model.") -> str:
    """The transformers name of a top-level leaf under the decoder prefix (lm_head sits outside it)."""
    return HF_TOP[leaf] if leaf == "lm_head" else prefix + HF_TOP[leaf][len("model."):]


def to_nla_layout(cfg: ModelConfig, leaf: str, w: np.ndarray) -> np.ndarray:
    """One layer's tensor: Hugging Face layout ([out, in], heads flattened) -> nla_jax's (input-major, heads split)."""
    D, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if leaf.endswith("norm"):
        return w
    if leaf == "wq":
        return w.T.reshape(D, H, hd)
    if leaf in ("wk", "wv"):
        return w.T.reshape(D, KV, hd)
    if leaf == "wo":
        return w.T.reshape(H, hd, D)
    if leaf in ("w_gate", "w_up", "w_down"):
        return w.T
    if leaf == "bq":
        return w.reshape(H, hd)
    if leaf in ("bk", "bv"):
        return w.reshape(KV, hd)
    raise KeyError(leaf)


def to_hf_layout(cfg: ModelConfig, leaf: str, w: np.ndarray) -> np.ndarray:
    """One layer's tensor: nla_jax layout -> Hugging Face's (the inverse of `to_nla_layout`)."""
    D, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if leaf.endswith("norm"):
        return w
    if leaf == "wq":
        return w.reshape(D, H * hd).T
    if leaf in ("wk", "wv"):
        return w.reshape(D, KV * hd).T
    if leaf == "wo":
        return w.reshape(H * hd, D).T
    if leaf in ("w_gate", "w_up", "w_down"):
        return w.T
    if leaf == "bq":
        return w.reshape(H * hd)
    if leaf in ("bk", "bv"):
        return w.reshape(KV * hd)
    raise KeyError(leaf)


def leaf_reader(cfg: ModelConfig, layer_tensor: LayerTensor, top_tensor: TopTensor) -> LeafReader:
    """A LeafReader over a source that hands out Hugging Face-layout tensors.

    Layer leaves are stacked over the layers the index selects (only those are read), so a
    process that holds a slice of the layer axis reads only its own layers."""

    def read(path: str, index: tuple[slice, ...]) -> np.ndarray:
        parts = path.split("/")
        if parts[0] == "layers":
            leaf = parts[1]
            layer_slice = index[0] if index else slice(None)
            rest = tuple(index[1:])
            return np.stack([to_nla_layout(cfg, leaf, layer_tensor(leaf, i))[rest]
                             for i in range(cfg.n_layers)[layer_slice]])
        w = top_tensor(parts[0])
        if parts[0] == "lm_head":
            w = w.T  # Hugging Face [V, D] -> nla_jax [D, V]
        return w[tuple(index)]

    return read


def assemble(cfg: ModelConfig, read: LeafReader, dtype=jnp.float32, shardings: Any = None) -> Any:
    """Build the params pytree; with shardings, each process reads only its own slices."""
    abstract = transformer.abstract_params(cfg, dtype)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    shard_flat = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat)
    leaves = []
    for (kp, a), sh in zip(flat, shard_flat):
        path = "/".join(str(getattr(k, "key", k)) for k in kp)
        if sh is None:
            arr = read(path, tuple(slice(None) for _ in a.shape))
            if arr.shape != a.shape:
                raise UserError(f"weight {path}: shape {arr.shape} does not match the config's {a.shape}")
            leaves.append(jnp.asarray(arr, dtype))
        else:
            leaves.append(jax.make_array_from_callback(
                a.shape, sh, lambda idx, path=path: np.asarray(read(path, idx), dtype)))
    return jax.tree.unflatten(treedef, leaves)
