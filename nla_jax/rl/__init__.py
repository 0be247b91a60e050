"""Pure GRPO math: group-relative advantages, clipped surrogate, KL penalty, loss aggregation.

Model-free functions over jax arrays (float32), so the trainer, tests and any other RL recipe
can share them.
"""
from nla_jax.rl.advantages import group_advantages, nonzero_group_fraction
from nla_jax.rl.losses import (aggregate, clipped_surrogate, kl_penalty, masked_mean,
                               policy_loss)

__all__ = ["group_advantages", "nonzero_group_fraction", "aggregate", "clipped_surrogate",
           "kl_penalty", "masked_mean", "policy_loss"]
