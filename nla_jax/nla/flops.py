"""Model FLOPs of each compiled step: the numerator of MFU.

Model FLOPs count the work the method needs, not what the compiler schedules: rematerialised
forward passes and padding are not counted (XLA's own `cost_analysis()["flops"]` counts those:
that ratio is hardware utilisation, reported beside). Conventions (as MaxText and the PaLM paper):

- a forward pass over T tokens costs 2 FLOPs per matmul weight per token, plus causal attention
  4 * S * (heads * head_dim) per token and layer, S the average attended length;
- a training pass (forward + backward) costs 3 forward passes;
- the vocabulary projection is counted only where its logits are used: at every explanation
  token (SFT-AV targets, rollout tokens, log-probs for the update and KL), once per prompt at
  the end of a prefill; the AR has none (it reads block K and a d x d head).

The RL step (B activations, groups of G, R = B * G rollouts, prompt P, cap C, AR wrapper A tokens):
prefill (B prompts with share_prompt, else R) + decode (R x C tokens, attending P + C/2 on average)
+ AR reward forward (R x A) + AV update (training pass over R x (P + C), prompt part B x P with
share_prompt) + reference AV forward (same tokens; skipped when the KL weight is 0) + AR update
(training pass over R x A). Every figure is for one global step, all devices together.
"""
from __future__ import annotations

import dataclasses

from nla_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class StepFlops:
    total: float                # the step
    parts: dict                 # name -> FLOPs (sums to total)


def layer_weights(m: ModelConfig) -> int:
    """Matmul weights of one transformer block."""
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    return m.d_model * q + 2 * m.d_model * kv + q * m.d_model + 3 * m.d_model * m.d_ff


def forward(m: ModelConfig, tokens: float, attended: float, layers: int | None = None,
            logits_tokens: float = 0.0, head_rows: float = 0.0) -> float:
    """FLOPs of a forward pass over `tokens` tokens through `layers` blocks (default all), each
    attending `attended` tokens on average, with vocabulary logits at `logits_tokens` of them
    and the AR's d x d read-out head applied to `head_rows` rows."""
    L = m.n_layers if layers is None else layers
    blocks = 2.0 * tokens * L * layer_weights(m) + 4.0 * tokens * attended * L * m.n_heads * m.head_dim
    return blocks + 2.0 * logits_tokens * m.d_model * m.vocab_size + 2.0 * head_rows * m.d_model ** 2


def sft_av(m: ModelConfig, batch: int, prompt: int, cap: int) -> StepFlops:
    n = prompt + cap
    f = 3 * forward(m, batch * n, n / 2, logits_tokens=batch * cap)
    return StepFlops(f, {"av_update": f})


def sft_ar(m: ModelConfig, batch: int, ar_len: int, layer: int) -> StepFlops:
    f = 3 * forward(m, batch * ar_len, ar_len / 2, layers=layer + 1, head_rows=batch)
    return StepFlops(f, {"ar_update": f})


def decode(m: ModelConfig, rows: int, prompts: int, prompt: int, cap: int) -> StepFlops:
    """Sampling `rows` explanations of `cap` tokens after `prompts` prefilled prompts."""
    prefill = forward(m, prompts * prompt, prompt / 2, logits_tokens=prompts)
    steps = forward(m, rows * cap, prompt + cap / 2, logits_tokens=rows * cap)
    return StepFlops(prefill + steps, {"prefill": prefill, "decode": steps})


def rl(m: ModelConfig, batch: int, group: int, prompt: int, cap: int, ar_len: int, layer: int,
       share_prompt: bool, kl: bool) -> StepFlops:
    R = batch * group
    prompts = batch if share_prompt else R
    parts = dict(decode(m, R, prompts, prompt, cap).parts)
    ar_fwd = forward(m, R * ar_len, ar_len / 2, layers=layer + 1, head_rows=R)
    av_tokens = prompts * prompt + R * cap
    av_fwd = forward(m, av_tokens, (prompt + cap) / 2, logits_tokens=R * cap)
    parts.update(ar_reward=ar_fwd, av_update=3 * av_fwd, reference=av_fwd if kl else 0.0, ar_update=3 * ar_fwd)
    return StepFlops(sum(parts.values()), parts)
