"""The training steps as pure functions of explicit state; train.py jits them with shardings.

State layout (a dict pytree, what checkpoints hold):
  sft_av: {"av": {"model", "extra"}, "opt": ..., "step", "skipped", "streak"}
  sft_ar: {"ar": {...}, "opt": ..., "step", "skipped", "streak"}
  rl:     {"av", "ar", "opt_av", "opt_ar", "step", "skipped", "streak"}
"skipped" counts non-finite steps (their updates are dropped inside the step), "streak" the
current run of them; the host loop stops the run after `max_nonfinite` in a row.

Mixed precision: parameters and optimizer state are held in `model.weight_dtype` (float32 master
weights); every forward pass first casts them to `Ctx.compute_dtype` (`model.dtype`, bfloat16 on
accelerators), so gradients flow back through the cast into float32 and an update far below
bf16's resolution (LR 1e-6 on weights of size ~0.1) still moves the masters. Log-probs, losses and
matmul accumulation stay float32 as before. compute_dtype None: the parameters' own dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from nla_jax import optim
from nla_jax import sampling
from nla_jax.models.config import ModelConfig
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import av as av_lib
from nla_jax.nla import stats as stats_lib
from nla_jax.rl import advantages as adv_lib
from nla_jax.rl import losses as rl_losses


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Static things every step closes over."""
    cfg: ModelConfig
    av: av_lib.AVSpec
    ar: ar_lib.ARSpec
    center: bool
    remat: str | bool        # remat policy by name (transformer.remat_name)
    var_nrm: float          # Var(v_nrm) of the targets (centred or not): fve's denominator
    compute_dtype: Any = None  # forward passes cast floating parameters to this (None: leave them)
    decode_scan: bool = False  # the sampler scans stacked layers (accelerators) instead of unrolling them


def for_compute(params: Any, ctx: Ctx) -> Any:
    """The parameters as the forward pass uses them: floating leaves cast to ctx.compute_dtype
    (a no-op, and no copy, when they already have it or compute_dtype is None)."""
    return cast_floating(params, ctx.compute_dtype)


def cast_floating(params: Any, dtype) -> Any:
    """Floating leaves cast to `dtype` (None, or leaves already in it: left as they are)."""
    if dtype is None:
        return params
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype
                        else a, params)


def _bookkeeping(state: dict, ok: jax.Array) -> dict:
    return {"step": state["step"] + 1,
            "skipped": state["skipped"] + (~ok).astype(jnp.int32),
            "streak": jnp.where(ok, 0, state["streak"] + 1).astype(jnp.int32)}


def _finite(*xs) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


# ----------------------------------------------------------------------------- SFT: verbalizer

def av_ce(av: dict, ctx: Ctx, acts, targets, mask, mean) -> tuple[jax.Array, jax.Array]:
    """Token-mean cross-entropy of targets given the injected activation; and per-row mean CE [b]."""
    av = for_compute(av, ctx)
    lp = av_lib.logprobs(av["model"], av["extra"], ctx.cfg, ctx.av, acts, targets, mean, remat=ctx.remat)
    m = mask.astype(jnp.float32)
    per_row = -(lp * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return -(lp * m).sum() / jnp.maximum(m.sum(), 1.0), per_row


def sft_av_step(state: dict, batch: dict, mean, *, ctx: Ctx, tx, labels, block_mask) -> tuple[dict, dict]:
    """batch: acts [b, d], targets [b, L], mask [b, L]."""
    def loss_fn(av):
        av = optim.stop_frozen(av, labels)
        return av_ce(av, ctx, batch["acts"], batch["targets"], batch["mask"], mean)[0]

    loss, grads = jax.value_and_grad(loss_fn)(state["av"])
    new_av, new_opt, gnorm = optim.apply(tx, grads, state["opt"], state["av"], block_mask)
    ok = _finite(loss, gnorm)
    out = {"av": optim.keep_if(ok, new_av, state["av"]), "opt": optim.keep_if(ok, new_opt, state["opt"]),
           **_bookkeeping(state, ok)}
    return out, {"loss": loss, "grad_norm": gnorm, "finite": ok}


def sft_av_eval(av: dict, batch: dict, mean, perm, *, ctx: Ctx) -> dict:
    """CE with the true activations and with activations shuffled across rows (per-row means)."""
    _, real = av_ce(av, ctx, batch["acts"], batch["targets"], batch["mask"], mean)
    _, shuf = av_ce(av, ctx, batch["acts"][perm], batch["targets"], batch["mask"], mean)
    return {"ce_real": real, "ce_shuffled": shuf}


# ----------------------------------------------------------------------------- SFT: reconstructor

def ar_mse(ar: dict, ctx: Ctx, expl, expl_len, acts, mean) -> jax.Array:
    """Per-row mse_nrm [b] of the AR's reconstruction from explanation ids."""
    pred = ar_lib.predict(for_compute(ar, ctx), ctx.cfg, ctx.ar, expl, expl_len, ctx.remat)
    target = stats_lib.normalise(acts, mean if ctx.center else None)
    return stats_lib.mse_nrm(pred, target)


def sft_ar_step(state: dict, batch: dict, mean, *, ctx: Ctx, tx, labels, block_mask) -> tuple[dict, dict]:
    """batch: acts [b, d], expl [b, M], expl_len [b]."""
    def loss_fn(ar):
        ar = optim.stop_frozen(ar, labels)
        return jnp.mean(ar_mse(ar, ctx, batch["expl"], batch["expl_len"], batch["acts"], mean))

    loss, grads = jax.value_and_grad(loss_fn)(state["ar"])
    new_ar, new_opt, gnorm = optim.apply(tx, grads, state["opt"], state["ar"], block_mask)
    ok = _finite(loss, gnorm)
    out = {"ar": optim.keep_if(ok, new_ar, state["ar"]), "opt": optim.keep_if(ok, new_opt, state["opt"]),
           **_bookkeeping(state, ok)}
    return out, {"loss": loss, "grad_norm": gnorm, "finite": ok}


def ar_eval(ar: dict, batch: dict, mean, *, ctx: Ctx) -> jax.Array:
    return ar_mse(ar, ctx, batch["expl"], batch["expl_len"], batch["acts"], mean)


def ar_features(ar: dict, batch: dict, *, ctx: Ctx) -> jax.Array:
    """Head inputs [b, d] (for the ridge initialisation of the head)."""
    tok, valid, read_at = ar_lib.assemble(ctx.ar, batch["expl"], batch["expl_len"])
    return ar_lib.features(for_compute(ar, ctx), ctx.cfg, ctx.ar, tok, valid, read_at)


# ----------------------------------------------------------------------------- explanations

def explain(av: dict, acts, mean, key, *, ctx: Ctx, sc: sampling.SampleConfig, group: int = 1) -> dict:
    """Sample `group` explanations per activation row [b, d] (rows b*G..b*G+G-1 of the outputs):
    tokens [b*G, N], lengths, expl_len, ok, logprobs. The injected prompt is prefilled once per row."""
    av = for_compute(av, ctx)
    b = acts.shape[0]
    P = len(ctx.av.prompt)
    prompt = jnp.broadcast_to(jnp.asarray(ctx.av.prompt, jnp.int32), (b, P))
    ov = av_lib.override(ctx.av, acts, av["extra"], mean)
    params = jax.lax.stop_gradient(av["model"])
    params = params if ctx.decode_scan else sampling.split_layers(params)
    out = sampling._sample(params, prompt, jnp.ones((b, P), bool), key, cfg=ctx.cfg, sc=sc, override=ov,
                           add_after=av_lib.add_after(ctx.av), group=group)
    expl_len, ok = av_lib.explanation_span(out.tokens, out.lengths, ctx.av)
    return {"tokens": out.tokens, "lengths": out.lengths, "expl_len": expl_len, "ok": ok,
            "logprobs": out.logprobs}


# ----------------------------------------------------------------------------- RL: one GRPO step

def rl_step(state: dict, ref_av: dict, batch: dict, mean, key, *, ctx: Ctx, rl, sc: sampling.SampleConfig,
            tx_av, tx_ar, labels_av, labels_ar, mask_av, mask_ar, share_prompt: bool = False) -> tuple[dict, dict]:
    """Sample G explanations per activation, reward them by the live AR, update AV and AR.

    batch: acts [B, d]. Everything (rollout, extraction, reward, both updates) is one function.
    share_prompt: the rollout's prefill and the AV's teacher-forced passes run each group's injected
    prompt once (same values and random draws as the unshared layout, up to float rounding).
    """
    roll = rl_rollout(state, batch, mean, key, ctx=ctx, rl=rl, sc=sc, share_prompt=share_prompt)
    return rl_update(state, ref_av, batch, roll, mean, ctx=ctx, rl=rl, sc=sc, tx_av=tx_av, tx_ar=tx_ar,
                     labels_av=labels_av, labels_ar=labels_ar, mask_av=mask_av, mask_ar=mask_ar,
                     share_prompt=share_prompt)


def rl_rollout(state: dict, batch: dict, mean, key, *, ctx: Ctx, rl, sc: sampling.SampleConfig,
               share_prompt: bool = False) -> dict:
    """The GRPO step's first half: G explanations per activation row from the current AV (`explain`'s
    outputs, rows b*G..b*G+G-1 for row b: tokens [N, cap], lengths, expl_len, ok, logprobs) and
    `widest`, the longest sampled length (replicated), from which the trainer picks the update's width."""
    G = rl.group_size
    roll = (explain(state["av"], batch["acts"], mean, key, ctx=ctx, sc=sc, group=G) if share_prompt
            else explain(state["av"], jnp.repeat(batch["acts"], G, axis=0), mean, key, ctx=ctx, sc=sc))
    return {**roll, "widest": jnp.max(roll["lengths"])}


def rl_update(state: dict, ref_av: dict, batch: dict, roll: dict, mean, *, ctx: Ctx, rl, sc: sampling.SampleConfig,
              tx_av, tx_ar, labels_av, labels_ar, mask_av, mask_ar, share_prompt: bool = False,
              width: int | None = None) -> tuple[dict, dict]:
    """The GRPO step's second half on a rollout (`rl_rollout`): reward by the live AR, update AV and AR.

    width: run the AV's teacher-forced passes and the AR on the first `width` sampled tokens only
    (at least every row's length: the trainer rounds `widest` up). Tokens past a row's length are
    padding that nothing before them can see (causal attention; the masks and the AR's read-out sit
    at real tokens), so the losses, gradients and metrics are those at the cap up to float summation
    order (tests/test_rl_width.py) for fewer FLOPs. The policy loss keeps the cap as its `max_len`."""
    if width is not None and width < roll["tokens"].shape[1]:
        roll = {**roll, "tokens": roll["tokens"][:, :width], "logprobs": roll["logprobs"][:, :width]}
        if width < ctx.ar.max_len:  # the AR's wrapper as wide as the texts it reads (expl_len <= width)
            ctx = dataclasses.replace(ctx, ar=dataclasses.replace(ctx.ar, max_len=int(width)))
    G = rl.group_size
    acts = jnp.repeat(batch["acts"], G, axis=0)                     # [N, d], N = B * G
    B, N = batch["acts"].shape[0], acts.shape[0]
    tokens, ok = roll["tokens"], roll["ok"]
    L = tokens.shape[1]
    tmask = jnp.arange(L)[None, :] < roll["lengths"][:, None]       # [N, L] the sampled action tokens

    # -- AR on the same rollouts: reward from the live AR, then its regression update
    def ar_loss(ar):
        ar = optim.stop_frozen(ar, labels_ar)
        mse = ar_mse(ar, ctx, tokens, roll["expl_len"], acts, mean)  # [N]
        w = ok.astype(jnp.float32)
        return (mse * w).sum() / jnp.maximum(w.sum(), 1.0), mse

    (ar_l, mse), g_ar = jax.value_and_grad(ar_loss, has_aux=True)(state["ar"])
    reward = jax.lax.stop_gradient(jnp.where(ok, -mse, rl.fail_reward))     # [N]
    adv = adv_lib.group_advantages(reward.reshape(B, G), rl.advantage, eps=rl.adv_eps, ddof=rl.adv_ddof).reshape(N)

    # -- AV policy update: clipped surrogate + beta * KL to the reference (SFT) verbalizer
    inject, group = (batch["acts"], G) if share_prompt else (acts, 1)
    ref_lp = None
    if rl.beta > 0:
        ref = for_compute(ref_av, ctx)
        ref_lp = jax.lax.stop_gradient(av_lib.logprobs(ref["model"], ref["extra"], ctx.cfg, ctx.av, inject,
                                                       tokens, mean, sc.temperature, ctx.remat, group=group))

    def av_loss(av):
        av = for_compute(optim.stop_frozen(av, labels_av), ctx)
        lp, ent = av_lib.logprobs(av["model"], av["extra"], ctx.cfg, ctx.av, inject, tokens, mean, sc.temperature,
                                  ctx.remat, entropy=True, group=group)
        loss, m = rl_losses.policy_loss(lp, jax.lax.stop_gradient(lp), ref_lp, adv, tmask, eps_low=rl.eps_low,
                                        eps_high=rl.eps_high, beta=rl.beta, kl_kind=rl.kl, agg=rl.agg,
                                        max_len=ctx.av.max_len)
        return loss, (m, lp, ent)

    (av_l, (m, lp, ent)), g_av = jax.value_and_grad(av_loss, has_aux=True)(state["av"])
    new_av, new_opt_av, gn_av = optim.apply(tx_av, g_av, state["opt_av"], state["av"], mask_av)
    new_ar, new_opt_ar, gn_ar = optim.apply(tx_ar, g_ar, state["opt_ar"], state["ar"], mask_ar)
    okf = _finite(av_l, ar_l, gn_av, gn_ar)
    out = {"av": optim.keep_if(okf, new_av, state["av"]), "ar": optim.keep_if(okf, new_ar, state["ar"]),
           "opt_av": optim.keep_if(okf, new_opt_av, state["opt_av"]),
           "opt_ar": optim.keep_if(okf, new_opt_ar, state["opt_ar"]), **_bookkeeping(state, okf)}

    f = tmask.astype(jnp.float32)
    okw = ok.astype(jnp.float32)
    metrics = {
        "reward_mean": reward.mean(), "reward_std": reward.std(),
        "nonzero_adv_groups": adv_lib.nonzero_group_fraction(reward.reshape(B, G)),
        "kl": m.get("kl", jnp.float32(0)), "clip_frac": m["clip_frac"], "entropy": (ent * f).sum() / f.sum(),
        "expl_len": jnp.where(ok, roll["expl_len"], 0).sum() / jnp.maximum(okw.sum(), 1.0),
        "sampled_len": roll["lengths"].astype(jnp.float32).mean(),
        # over all rollouts: a row without a closing tag is read up to its cap
        "extract_fail": 1.0 - okw.mean(), "mse_nrm": mse.mean(), "fve_nrm": 1.0 - mse.mean() / ctx.var_nrm,
        "av_loss": av_l, "ar_loss": ar_l, "grad_norm_av": gn_av, "grad_norm_ar": gn_ar,
        "logprob_gap": jnp.abs((roll["logprobs"] - lp) * f).sum() / f.sum(), "finite": okf,
    }
    return out, metrics
