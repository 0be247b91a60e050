"""A generic GRPO policy step for any reward function (the NLA step in nla/steps.py specialises it).

One compiled function: sample G completions per prompt from the current policy, score them with
`reward_fn(tokens [N, L], lengths [N]) -> [N]`, group-normalise, and update the policy with the
clipped surrogate + beta * KL to a reference. Used by the plain-GRPO benchmark against TRL and by
the toy-reward test.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from nla_jax import optim, sampling
from nla_jax.models import transformer
from nla_jax.models.config import ModelConfig
from nla_jax.models.logprobs import token_logprobs
from nla_jax.rl.advantages import group_advantages, nonzero_group_fraction
from nla_jax.rl.losses import policy_loss


def completion_logprobs(params, cfg: ModelConfig, prompt, valid, tokens, temperature: float = 1.0,
                        remat: bool = False) -> jax.Array:
    """Log-probs [N, L] of completions `tokens` [N, L] after left-padded prompts [N, P]."""
    P = prompt.shape[1]
    seq = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
    v = jnp.concatenate([valid, jnp.ones(tokens[:, :-1].shape, bool)], axis=1)
    logits = transformer.forward(params, seq, cfg, valid=v, remat=remat, logits_from=P - 1)["logits"]  # [N, L, V]
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, tokens)


def grouped_completion_logprobs(params, cfg: ModelConfig, prompt, valid, tokens, group: int,
                                temperature: float = 1.0, remat: bool = False, **inject) -> jax.Array:
    """`completion_logprobs` for G completions per prompt (prompt [B, P], tokens [B*G, L]) with each
    prompt run once (`transformer.forward_grouped`); `inject` passes override / add_after."""
    logits = transformer.forward_grouped(params, prompt, valid, tokens[:, :-1], cfg, group=group, remat=remat,
                               **inject)  # [N, L, V]
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, tokens)


def policy_step(state: dict, ref_params, prompt, valid, key, *, cfg: ModelConfig, sc: sampling.SampleConfig, rl,
                tx, labels, reward_fn: Callable, remat: bool = False) -> tuple[dict, dict]:
    """state: {"params", "opt", "step"}; prompt, valid: [B, P] left-padded. Returns (state, metrics)."""
    G = rl.group_size
    prompt_g, valid_g = jnp.repeat(prompt, G, axis=0), jnp.repeat(valid, G, axis=0)   # [N, P]
    B, N = prompt.shape[0], prompt_g.shape[0]
    params_s = sampling.split_layers(jax.lax.stop_gradient(state["params"]))
    if rl.share_prompt:  # prefill each prompt once, then G samples from its cache
        out = sampling._sample(params_s, prompt, valid, key, cfg=cfg, sc=sc, group=G)
    else:
        out = sampling._sample(params_s, prompt_g, valid_g, key, cfg=cfg, sc=sc)
    L = out.tokens.shape[1]
    mask = jnp.arange(L)[None, :] < out.lengths[:, None]
    reward = jax.lax.stop_gradient(reward_fn(out.tokens, out.lengths)).astype(jnp.float32)   # [N]
    adv = group_advantages(reward.reshape(B, G), rl.advantage, eps=rl.adv_eps, ddof=rl.adv_ddof).reshape(N)
    if rl.share_prompt:  # each prompt's blocks run once for its group (same values, fewer FLOPs)
        logprobs = lambda p: grouped_completion_logprobs(p, cfg, prompt, valid, out.tokens, G, sc.temperature, remat)
    else:
        logprobs = lambda p: completion_logprobs(p, cfg, prompt_g, valid_g, out.tokens, sc.temperature, remat)
    ref_lp = jax.lax.stop_gradient(logprobs(ref_params)) if rl.beta > 0 else None

    def loss_fn(p):
        p = optim.stop_frozen(p, labels)
        lp = logprobs(p)
        loss, m = policy_loss(lp, jax.lax.stop_gradient(lp), ref_lp, adv, mask, eps_low=rl.eps_low,
                              eps_high=rl.eps_high, beta=rl.beta, kl_kind=rl.kl, agg=rl.agg, max_len=L)
        return loss, (m, lp)

    (loss, (m, lp)), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    new_p, new_opt, gnorm = optim.apply(tx, g, state["opt"], state["params"])
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    f = mask.astype(jnp.float32)
    new_state = {"params": optim.keep_if(ok, new_p, state["params"]), "opt": optim.keep_if(ok, new_opt, state["opt"]),
                 "step": state["step"] + 1}
    metrics = {"loss": loss, "reward_mean": reward.mean(), "reward_std": reward.std(),
               "nonzero_adv_groups": nonzero_group_fraction(reward.reshape(B, G)), "kl": m["kl"],
               "clip_frac": m["clip_frac"], "grad_norm": gnorm, "length": out.lengths.astype(jnp.float32).mean(),
               "logprob_gap": jnp.abs((out.logprobs - lp) * f).sum() / f.sum(), "finite": ok}
    return new_state, metrics
