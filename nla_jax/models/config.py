"""Architecture hyper-parameters of a decoder-only transformer (Llama / SmolLM2 / Qwen2 / Qwen3 / Gemma-3).

One implementation serves every family; the differences are data here, not subclasses:
`qkv_bias` (Qwen2), `tie_embeddings` (SmolLM2, small Qwen2, Gemma-3), `rope_theta`, `rms_eps`, and
the switches a family turns on by default (`FAMILY_DEFAULTS`, filled in when left None):

  qk_norm         RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma-3)
  norm_plus_one   RMSNorm scales by (1 + w) instead of w (Gemma: weights stored as offsets from 1)
  sandwich_norms  a second norm on each sub-layer's output before the residual add (Gemma-3)
  activation      "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
  embed_scale     looked-up embeddings are multiplied by sqrt(d) (Gemma). An injected vector
                  replaces the row *after* that multiply: it is in residual-stream units already.

plus Gemma-3's per-layer attention data: `layer_types` ("full" / "sliding" per block; empty = all
full), `sliding_window`, `rope_local_theta` (the sliding layers' RoPE base, no scaling there) and
`attn_scale` (query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from nla_jax.errors import UserError

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
# Switches each family turns on; a ModelConfig field left None takes its family's value.
FAMILY_DEFAULTS = {
    "llama": dict(qk_norm=False, norm_plus_one=False, sandwich_norms=False, activation="silu", embed_scale=False),
    "qwen2": dict(qk_norm=False, norm_plus_one=False, sandwich_norms=False, activation="silu", embed_scale=False),
    "qwen3": dict(qk_norm=True, norm_plus_one=False, sandwich_norms=False, activation="silu", embed_scale=False),
    "gemma3": dict(qk_norm=True, norm_plus_one=True, sandwich_norms=True, activation="gelu_tanh", embed_scale=True),
}
ACTIVATIONS = ("silu", "gelu_tanh")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "splash")   # models/attention.py


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # Llama-3 long-context frequencies
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_seq_len: int = 8192
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    add_bos: bool = False
    name: str = "model"
    qk_norm: bool | None = None
    norm_plus_one: bool | None = None
    sandwich_norms: bool | None = None
    activation: str | None = None
    embed_scale: bool | None = None
    attn_scale: float | None = None          # None: head_dim ** -0.5
    layer_types: tuple[str, ...] = ()        # per block: "full" | "sliding"; () = all full
    sliding_window: int | None = None
    rope_local_theta: float = 10000.0        # RoPE base of the sliding layers
    attention: str = "einsum"                # implementation (models/attention.py): how, not what

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserError(f"unsupported architecture {self.family!r}; supported: {', '.join(FAMILIES)}")
        for k, v in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        object.__setattr__(self, "layer_types", tuple(self.layer_types or ()))
        if self.activation not in ACTIVATIONS:
            raise UserError(f"model activation {self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        if self.layer_types:
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - {"full", "sliding"}:
                raise UserError(f"model layer_types must list 'full' or 'sliding' for each of the {self.n_layers} "
                                f"blocks, got {list(self.layer_types)}")
            if "sliding" in self.layer_types and not self.sliding_window:
                raise UserError("model layer_types has sliding layers but sliding_window is not set")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.attention not in ATTENTION_IMPLS:
            raise UserError(f"model attention={self.attention!r}: expected one of {', '.join(ATTENTION_IMPLS)}")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per block: whether it attends within the sliding window (all False for most families)."""
        return tuple(t == "sliding" for t in self.layer_types) if self.layer_types else (False,) * self.n_layers

    @property
    def has_sliding(self) -> bool:
        return any(self.sliding_layers)

    @property
    def embed_multiplier(self) -> float:
        """What looked-up embedding rows are multiplied by: sqrt(d) for Gemma, else 1."""
        return self.d_model ** 0.5 if self.embed_scale else 1.0

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def matmul_flops_per_token(self) -> int:
        """Forward FLOPs per token in the weight matmuls (attention scores excluded)."""
        d, h, kv, hd, ff = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * ff
        return 2 * (self.n_layers * per_layer + d * self.vocab_size)

    def attention_flops_per_token(self, context: int) -> int:
        """Forward FLOPs per token for QK^T and AV at a mean context length."""
        return 2 * 2 * self.n_layers * self.n_heads * self.head_dim * context


def from_dict(d: dict[str, Any]) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - fields
    if unknown:
        raise UserError(f"unknown model config keys: {', '.join(sorted(unknown))}")
    d = dict(d)
    for k in ("eos_ids", "layer_types"):
        if k in d and d[k] is not None:
            d[k] = tuple(d[k])
    return ModelConfig(**d)
