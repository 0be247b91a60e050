"""Architecture hyper-parameters of a decoder-only transformer (Llama / SmolLM2 / Qwen2).

One implementation serves every family; the differences are switches here:
`qkv_bias` (Qwen2), `tie_embeddings` (SmolLM2, small Qwen2), `rope_theta`, `rms_eps`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from nla_jax.errors import UserError

FAMILIES = ("llama", "qwen2")


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

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserError(f"unsupported architecture {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for RoPE")

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
    if "eos_ids" in d:
        d["eos_ids"] = tuple(d["eos_ids"])
    return ModelConfig(**d)
