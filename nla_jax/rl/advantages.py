"""Group-relative advantages for GRPO-style RL.

Each prompt gets g sampled completions; a completion's advantage is its reward relative to its
own group, so no learned value function is needed. All arithmetic is float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards: jax.Array, estimator: str, *, eps: float = 1e-4,
                     ddof: int = 1) -> jax.Array:
    """Per-completion advantages from rewards [b, g] (b groups of g completions) -> [b, g].

    "grpo":   (r - mean_g) / (std_g(ddof) + eps)   (scale-free; eps keeps equal-reward groups at 0)
    "drgrpo": r - mean_g                           (Dr. GRPO: no std division, which otherwise
                                                    up-weights near-uniform groups)
    "rloo":   r_i - mean of the other g-1 rewards  (leave-one-out baseline, unbiased since the
                                                    baseline is independent of sample i;
                                                    = g/(g-1) * (r_i - mean_g))
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ESTIMATORS}")
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [b, g], got shape {r.shape}")
    g = r.shape[1]
    if g < 2:
        raise ValueError(f"group size g={g} < 2: group-relative advantages need at least 2 "
                         f"completions per group")
    mean = jnp.mean(r, axis=1, keepdims=True)                              # [b, 1]
    centred = r - mean                                                     # [b, g]
    if estimator == "grpo":
        if g - ddof <= 0:
            raise ValueError(f"ddof={ddof} needs group size > ddof, got g={g}")
        std = jnp.sqrt(jnp.sum(centred ** 2, axis=1, keepdims=True) / (g - ddof))  # [b, 1]
        return centred / (std + jnp.float32(eps))
    if estimator == "drgrpo":
        return centred
    # rloo: r_i - (sum - r_i) / (g - 1)
    others = (jnp.sum(r, axis=1, keepdims=True) - r) / jnp.float32(g - 1)  # [b, g]
    return r - others


def nonzero_group_fraction(rewards: jax.Array, tol: float = 1e-6) -> jax.Array:
    """Fraction of groups [b, g] whose rewards are not all equal (within tol), as a float32 scalar.

    Groups with identical rewards have zero advantage under every estimator and so give no
    gradient signal; this is the fraction of the batch that actually teaches anything.
    """
    r = jnp.asarray(rewards, jnp.float32)                                  # [b, g]
    spread = jnp.max(r, axis=1) - jnp.min(r, axis=1)                       # [b]
    return jnp.mean((spread > tol).astype(jnp.float32))
