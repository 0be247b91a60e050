"""GRPO policy loss: PPO clipped surrogate, KL-to-reference penalty, and token aggregation.

Shapes: n sequences (completions) of t tokens; `mask` [n, t] marks the completion tokens that
count. All arithmetic is float32. Padding positions are replaced by zeros *before* any exp/log
(the "double where"), so -inf or garbage log-probs under the mask give neither NaN losses nor
NaN gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "drgrpo")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over mask (same shape), 0.0 when the mask is empty."""
    m = jnp.asarray(mask, bool)
    total = jnp.sum(jnp.where(m, _f32(x), 0.0))
    count = jnp.sum(m.astype(jnp.float32))
    return total / jnp.maximum(count, 1.0)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str,
               clamp: float = 10.0) -> jax.Array:
    """Per-token estimate of KL(policy || ref) from tokens sampled from the policy -> [n, t].

    With r = clip(ref_logp - logp, -clamp, clamp):
      "k1": -r               (unbiased, high variance, can be negative)
      "k2": 0.5 * r**2       (biased, low variance; its gradient is that of the true KL)
      "k3": exp(r) - r - 1   (Schulman: unbiased and >= 0, low variance)
    The clamp keeps exp(r) finite for tokens the reference finds wildly unlikely. Gradient
    flows through logp only; the reference is a constant.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")
    ref = jax.lax.stop_gradient(_f32(ref_logp))
    r = jnp.clip(ref - _f32(logp), -clamp, clamp)                          # [n, t]
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * r * r
    return jnp.exp(r) - r - 1.0


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *,
                      eps_low: float, eps_high: float) -> tuple[jax.Array, jax.Array]:
    """PPO clipped objective as a per-token loss -> (loss [n, t], clipped [n, t] bool).

    ratio = exp(logp - old_logp); loss = -min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A),
    with the sequence advantage A [n] broadcast over tokens. Asymmetric eps (eps_high > eps_low,
    "clip-higher") lets low-probability tokens with A > 0 grow further. `clipped` is True where
    the clipped branch is strictly the smaller one, i.e. the token gets no gradient; its masked
    mean is the clip fraction.
    """
    ratio = jnp.exp(_f32(logp) - jax.lax.stop_gradient(_f32(old_logp)))  # [n, t]
    a = _f32(advantages)[:, None]                                          # [n, 1]
    unclipped = ratio * a                                                  # [n, t]
    clipped_obj = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * a       # [n, t]
    loss = -jnp.minimum(unclipped, clipped_obj)
    return loss, clipped_obj < unclipped


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, *,
              max_len: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Reduce a per-token loss [n, t] to float32 scalars (total, count); loss = total / count.

    Returning the pair rather than the quotient lets data-parallel shards psum totals and counts
    separately, so the global loss does not depend on how the batch was split (for
    "token_mean" and "drgrpo" exactly; the per-sequence modes are sharding-invariant too as
    long as whole sequences stay on one shard).
      "token_mean":          total = sum of masked tokens;          count = number of masked tokens
      "seq_mean_token_mean": total = sum over sequences of the mean over its masked tokens
                             (empty sequences contribute 0);       count = sequences with >= 1 token
      "seq_mean_token_sum":  total = sum of masked tokens;          count = number of sequences
      "drgrpo":              total = sum of masked tokens;          count = n * max_len (a constant
                             normaliser, so long and short completions are not reweighted)
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")
    m = jnp.asarray(mask, bool)                                            # [n, t]
    x = jnp.where(m, _f32(per_token), 0.0)                                 # [n, t]
    n = x.shape[0]
    seq_sum = jnp.sum(x, axis=1)                                           # [n]
    seq_len = jnp.sum(m.astype(jnp.float32), axis=1)                       # [n]
    if mode == "token_mean":
        return jnp.sum(seq_sum), jnp.sum(seq_len)
    if mode == "seq_mean_token_mean":
        seq_mean = seq_sum / jnp.maximum(seq_len, 1.0)                     # [n]; empty rows -> 0
        return jnp.sum(seq_mean), jnp.sum((seq_len > 0).astype(jnp.float32))
    if mode == "seq_mean_token_sum":
        return jnp.sum(seq_sum), jnp.float32(n)
    if max_len is None:
        raise ValueError("aggregation mode 'drgrpo' needs max_len (the constant normaliser)")
    return jnp.sum(seq_sum), jnp.float32(n * max_len)


def policy_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                advantages: jax.Array, mask: jax.Array, *, eps_low: float, eps_high: float,
                beta: float, kl_kind: str, agg: str,
                max_len: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss: aggregate(clipped surrogate + beta * KL) -> (loss scalar, metrics).

    logp, old_logp, ref_logp, mask: [n, t]; advantages: [n]. The KL term is left out of the loss
    when beta is a Python 0 or ref_logp is None, but still measured for logging when ref_logp is
    given. Metrics (float32 scalars, token means over the mask): "loss", "kl" (0.0 without a
    reference), "clip_frac", "ratio_mean". The loss is total/count of `aggregate` (0 when count
    is 0); data-parallel callers wanting the exact global value should call `aggregate` instead.
    """
    m = jnp.asarray(mask, bool)                                            # [n, t]
    # Zero padding before exp so -inf there cannot leak NaN into values or gradients.
    logp = jnp.where(m, _f32(logp), 0.0)
    old_logp = jnp.where(m, _f32(old_logp), 0.0)
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages,
                                           eps_low=eps_low, eps_high=eps_high)  # [n, t]
    kl_metric = jnp.float32(0.0)
    if ref_logp is not None:
        ref_logp = jnp.where(m, _f32(ref_logp), 0.0)
        kl = kl_penalty(logp, ref_logp, kl_kind)                           # [n, t]
        kl_metric = masked_mean(jax.lax.stop_gradient(kl), m)
        if not (isinstance(beta, (int, float)) and beta == 0):
            per_token = per_token + jnp.float32(beta) * kl
    elif kl_kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kl_kind!r}; expected one of {KL_KINDS}")
    total, count = aggregate(per_token, m, agg, max_len=max_len)
    loss = total / jnp.maximum(count, 1.0)
    ratio = jax.lax.stop_gradient(jnp.exp(logp - old_logp))
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "kl": kl_metric,
        "clip_frac": masked_mean(clipped.astype(jnp.float32), m),
        "ratio_mean": masked_mean(ratio, m),
    }
    return loss, metrics
