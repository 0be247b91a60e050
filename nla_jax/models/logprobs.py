"""Per-token log-probabilities of chosen tokens, in float32, with a hand-written gradient.

`token_logprobs(logits, targets)` = log_softmax(logits)[targets] without materialising the
[b, s, V] log-softmax: the forward keeps only the log-normaliser, and the backward writes
d logits = g * (onehot - softmax) in one pass. Autodiff of log_softmax + take_along_axis makes
several full passes over the vocabulary-sized array plus a scatter; on CPU with V = 49k this
was a visible share of a training step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits: [..., V] (any float), targets: [...] int -> [...] float32."""
    return _fwd(logits, targets)[0]


def _fwd(logits, targets):
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)  # [...]
    picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return picked - lse, (logits, lse, targets)


def _bwd(res, g):
    logits, lse, targets = res
    x = logits.astype(jnp.float32)
    p = jnp.exp(x - lse[..., None])
    onehot = jnp.arange(x.shape[-1]) == targets[..., None]
    d = g[..., None] * (onehot.astype(jnp.float32) - p)
    return d.astype(logits.dtype), None


token_logprobs.defvjp(_fwd, _bwd)


def next_token_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy: logits [b, s, V] at position t predict tokens[:, t + 1].

    The last position is weighted out rather than sliced off: slicing [b, s-1, V] out of the
    logits is a full copy of the largest array in the step (and a pad in the backward).
    """
    targets = jnp.roll(tokens, -1, axis=1)
    lp = token_logprobs(logits, targets)  # [b, s]
    w = jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)
    if mask is not None:
        w = w * jnp.roll(mask, -1, axis=1).astype(jnp.float32)
    return -jnp.sum(lp * w) / jnp.maximum(jnp.sum(w), 1.0)
