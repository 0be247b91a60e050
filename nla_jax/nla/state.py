"""Per-stage training state: init, optimizers, logical axes, abstract state, shardings, jitted steps.

Each training stage (sft_av, sft_ar, rl) is described by one `StageState`, built the MaxText way:
the state's shapes come from `jax.eval_shape` of its init function (nothing is allocated), the
parameters' shardings from their logical axis names through the config's rules table, and the
optimizer state is sharded like the parameters it mirrors. The trainer, `aot` and the pair reader
all start from these objects, so what is compiled ahead of time, trained and restored is one
layout.

State layout (a dict pytree, what the checkpoints hold):
    sft_av: {"av": {"model", "extra"}, "opt", "step", "skipped", "streak"}
    sft_ar: {"ar": {"embed", "layers", "head"}, "opt", "step", "skipped", "streak"}
    rl:     {"av", "ar", "opt_av", "opt_ar", "step", "skipped", "streak"}
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from nla_jax import optim, sampling, sharding
from nla_jax.models import transformer
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import av as av_lib
from nla_jax.nla import steps
from nla_jax.nla.run import Run, with_shardings

STAGES = ("sft_av", "sft_ar", "rl")
SPLIT_OF_STAGE = {"sft_av": "av_sft", "sft_ar": "ar_sft", "rl": "rl"}
COUNTERS = ("step", "skipped", "streak")


@dataclasses.dataclass
class StageState:
    """How one stage's state is made, optimized and laid out on the mesh."""
    name: str                                  # sft_av | sft_ar | rl
    init: Callable[[dict], dict]               # target params -> a fresh state
    optimizers: dict[str, optax.GradientTransformation]   # optimizer-state key -> its transformation
    optimizes: dict[str, str]                  # optimizer-state key -> the params key it updates
    labels: dict[str, Any]                     # params key -> label tree (optim.labels)
    axes: dict[str, Any]                       # params key -> logical axis names
    shardings: dict                            # the state's NamedShardings
    abstract: dict                             # the state as ShapeDtypeStructs carrying `shardings`

    def params_abstract(self, key: str) -> dict:
        """One model's parameters ("av" / "ar") as sharded ShapeDtypeStructs (reading a pair for
        inference restores only these: no optimizer state)."""
        return self.abstract[key]


# ============================================================================= parameters

def av_axes(run: Run) -> dict:
    extra = {"proj": ("embed", None)} if run.cfg.av.input_proj else {}
    return {"model": transformer.param_axes(run.model_cfg), "extra": extra}


def ar_axes(run: Run) -> dict:
    return ar_lib.param_axes(run.model_cfg, bool(run.cfg.ar.get("head_bias", True)))


def init_av(run: Run, target: dict) -> dict:
    """The verbalizer starts as the target itself (plus an identity input projection if configured)."""
    return {"model": target, "extra": av_lib.init_extra(run.model_cfg.d_model, run.cfg.av.input_proj)}


def init_ar(run: Run, target: dict) -> dict:
    """The reconstructor starts as the target's blocks 0..K with an identity head."""
    return ar_lib.init_params(target, run.cfg.model.layer, run.model_cfg.d_model, bool(run.cfg.ar.get("head_bias", True)))


def frozen_reference(run: Run, av: dict) -> dict:
    """The RL stage's reference verbalizer as it is kept: never trained, so held in the compute
    dtype (half the bytes of float32 masters under bf16 compute), with the AV's shardings."""
    if run.ctx.compute_dtype is None:
        return av
    shardings = jax.tree.map(lambda a: a.sharding, av)
    return jax.jit(lambda p: steps.for_compute(p, run.ctx), out_shardings=shardings)(av)


def abstract_reference(run: Run) -> dict:
    """frozen_reference's result as sharded ShapeDtypeStructs (aot)."""
    shapes = jax.eval_shape(lambda t: steps.for_compute(init_av(run, t), run.ctx), run.target)
    return with_shardings(shapes, av_shardings(run))


def av_shardings(run: Run) -> dict:
    return sharding.tree_shardings(av_axes(run), jax.eval_shape(lambda t: init_av(run, t), run.target),
                                   run.mesh, run.rules)


def _counters() -> dict:
    return {k: jnp.int32(0) for k in COUNTERS}


# ============================================================================= shardings

def _dict_keys(path) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def like_params(opt_abstract, params_abstract, param_shardings, replicated):
    """Optimizer-state shardings: a leaf whose dict-key path ends with a parameter's path and has
    its shape (Adam's mu / nu) is sharded like that parameter; everything else (counts, empty
    states of frozen groups) is replicated. (optax.tree_map_params does not apply here: the
    optimizers are multi_transform over label groups, whose masked states do not mirror the
    parameter tree.)"""
    by_path = {}
    for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0],
                               jax.tree.leaves(param_shardings)):
        by_path[_dict_keys(path)] = (leaf.shape, s)

    def shard_of(path, leaf):
        keys = _dict_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated
    return jax.tree_util.tree_map_with_path(shard_of, opt_abstract)


def _stage(run: Run, name: str, init: Callable, optimizers: dict, optimizes: dict, labels: dict,
           axes: dict) -> StageState:
    shapes = jax.eval_shape(init, run.target)
    rep = run.replicated
    shardings = {k: sharding.tree_shardings(axes[k], shapes[k], run.mesh, run.rules) for k in axes}
    for opt_key, params_key in optimizes.items():
        shardings[opt_key] = like_params(shapes[opt_key], shapes[params_key], shardings[params_key], rep)
    for k in COUNTERS:
        shardings[k] = rep
    return StageState(name, init, optimizers, optimizes, labels, axes, shardings, with_shardings(shapes, shardings))


# ============================================================================= the three stages

def _sft(run: Run, stage: str, model: str, init_model, model_axes) -> StageState:
    """An SFT stage: one model (`model` = "av" or "ar") and its AdamW state."""
    sec = run.cfg[stage]
    shapes = jax.eval_shape(lambda t: init_model(run, t), run.target)
    tx = optim.make(sec.optim, max(sec.steps, 1), shapes)
    init = lambda t: {model: init_model(run, t), "opt": tx.init(init_model(run, t)), **_counters()}
    return _stage(run, stage, init, {"opt": tx}, {"opt": model},
                  {model: optim.labels(shapes, sec.optim.train_embed)}, {model: model_axes(run)})


def sft_av(run: Run) -> StageState:
    return _sft(run, "sft_av", "av", init_av, av_axes)


def sft_ar(run: Run) -> StageState:
    return _sft(run, "sft_ar", "ar", init_ar, ar_axes)


def rl(run: Run) -> StageState:
    sec = run.cfg.rl
    av_shapes = jax.eval_shape(lambda t: init_av(run, t), run.target)
    ar_shapes = jax.eval_shape(lambda t: init_ar(run, t), run.target)
    tx_av = optim.make(sec.optim_av, max(sec.steps, 1), av_shapes)
    tx_ar = optim.make(sec.optim_ar, max(sec.steps, 1), ar_shapes)
    init = lambda t: {"av": init_av(run, t), "ar": init_ar(run, t), "opt_av": tx_av.init(init_av(run, t)),
                      "opt_ar": tx_ar.init(init_ar(run, t)), **_counters()}
    return _stage(run, "rl", init, {"opt_av": tx_av, "opt_ar": tx_ar}, {"opt_av": "av", "opt_ar": "ar"},
                  {"av": optim.labels(av_shapes, sec.optim_av.train_embed),
                   "ar": optim.labels(ar_shapes, sec.optim_ar.train_embed)},
                  {"av": av_axes(run), "ar": ar_axes(run)})


BUILDERS: dict[str, Callable[[Run], StageState]] = {"sft_av": sft_av, "sft_ar": sft_ar, "rl": rl}


def for_stage(run: Run, name: str) -> StageState:
    return BUILDERS[name](run)


def fresh(run: Run, stage: StageState) -> dict:
    """A newly initialised state on the mesh (from the run's target weights)."""
    return jax.jit(stage.init, out_shardings=stage.shardings)(run.target)


# ============================================================================= compiled steps

def share_prompt(run: Run) -> bool:
    """Whether the RL step shares each injected prompt across its group: it runs the B prompts at
    batch B, so only when B splits evenly over the batch shards (sharding.BatchLayout; the same
    predicate whether the trainer or aot asks, on any number of processes)."""
    return bool(run.cfg.rl.share_prompt) and run.cfg.rl.batch % run.batch_layout.shards == 0


def rl_sample_config(run: Run) -> sampling.SampleConfig:
    sec = run.cfg.rl
    return sampling.SampleConfig(max_new_tokens=run.ctx.av.max_len, temperature=sec.temperature, top_k=sec.top_k,
                                 top_p=sec.top_p)


def sft_step(run: Run, stage: StageState, batch_shardings=None, width: int | None = None):
    """The jitted SFT step of `stage` (sft_av | sft_ar): explicit shardings, the state donated.
    Called as step(state, batch, mean) -> (state, metrics). width: the batch's text width when it is
    narrower than the cap (batches.text_widths); the AR's wrapper is then built for that many tokens."""
    sec = run.cfg[stage.name]
    key = "av" if stage.name == "sft_av" else "ar"
    step, n_blocks = ((steps.sft_av_step, run.model_cfg.n_layers) if stage.name == "sft_av"
                      else (steps.sft_ar_step, run.cfg.model.layer + 1))
    ctx = run.ctx
    if width is not None and stage.name == "sft_ar":
        ctx = dataclasses.replace(ctx, ar=dataclasses.replace(ctx.ar, max_len=int(width)))
    fn = functools.partial(step, ctx=ctx, tx=stage.optimizers["opt"], labels=stage.labels[key],
                           block_mask=optim.block_mask(n_blocks, sec.optim.train_blocks))
    rep = run.replicated
    return jax.jit(fn, in_shardings=(stage.shardings, batch_shardings, rep), out_shardings=(stage.shardings, rep),
                   donate_argnums=(0,))


def _rl_update_args(run: Run, stage: StageState) -> dict:
    sec = run.cfg.rl
    return dict(ctx=run.ctx, rl=sec, sc=rl_sample_config(run), tx_av=stage.optimizers["opt_av"],
                tx_ar=stage.optimizers["opt_ar"], share_prompt=share_prompt(run), labels_av=stage.labels["av"],
                labels_ar=stage.labels["ar"],
                mask_av=optim.block_mask(run.model_cfg.n_layers, sec.optim_av.train_blocks),
                mask_ar=optim.block_mask(run.cfg.model.layer + 1, sec.optim_ar.train_blocks))


def rl_step(run: Run, stage: StageState, ref_shardings, batch_shardings=None):
    """The jitted GRPO step, rollout and update in one function (at the cap; what `aot` compiles, the
    widest the trainer runs): explicit shardings, the state donated.
    Called as step(state, ref_av, batch, mean, key) -> (state, metrics)."""
    fn = functools.partial(steps.rl_step, **_rl_update_args(run, stage))
    rep = run.replicated
    return jax.jit(fn, in_shardings=(stage.shardings, ref_shardings, batch_shardings, rep, rep),
                   out_shardings=(stage.shardings, rep), donate_argnums=(0,))


def rollout_shardings(run: Run) -> dict:
    """A rollout's arrays (steps.rl_rollout) laid out along the batch like the rows they explain."""
    rows = lambda nd: sharding.named_sharding(("batch",) + (None,) * (nd - 1), None, run.mesh, run.rules)
    return {"tokens": rows(2), "logprobs": rows(2), "lengths": rows(1), "expl_len": rows(1), "ok": rows(1),
            "widest": run.replicated}


def rl_rollout(run: Run, stage: StageState, batch_shardings=None):
    """The GRPO step's rollout alone, jitted (the state is read, not donated).
    Called as rollout(state, batch, mean, key) -> roll (rollout_shardings; roll["widest"] replicated)."""
    sec = run.cfg.rl
    fn = functools.partial(steps.rl_rollout, ctx=run.ctx, rl=sec, sc=rl_sample_config(run),
                           share_prompt=share_prompt(run))
    rep = run.replicated
    return jax.jit(fn, in_shardings=(stage.shardings, batch_shardings, rep, rep), out_shardings=rollout_shardings(run))


def rl_update(run: Run, stage: StageState, ref_shardings, width: int, batch_shardings=None):
    """The GRPO step's update on a rollout, at `width` sampled tokens (steps.rl_update), jitted once per
    width with the state donated. Called as update(state, ref_av, batch, roll, mean) -> (state, metrics)."""
    fn = functools.partial(steps.rl_update, width=int(width), **_rl_update_args(run, stage))
    rep = run.replicated
    return jax.jit(fn, in_shardings=(stage.shardings, ref_shardings, batch_shardings, rollout_shardings(run), rep),
                   out_shardings=(stage.shardings, rep), donate_argnums=(0,))


def rl_step_by_width(run: Run, stage: StageState, ref_shardings) -> Callable:
    """The trainer's GRPO step: with train.text_bucket > 0, the rollout (`rl_rollout`), then the update
    (`rl_update`) on its longest sampled length rounded up to the bucket (never past the cap), one
    compiled update per width, metrics with the `text_width` used; with 0, `rl_step` (one function at
    the cap). Called as step(state, ref_av, batch, mean, key) -> (state, metrics) either way.

    Why: an SFT'd verbalizer's explanations end well before the cap that leaves RL room (the default
    config samples ~33 of 64 tokens), and the update's teacher-forced AV passes (policy and reference)
    and the AR ran every row to the cap. Reading `widest` is the one host sync this adds; it is a
    replicated value, so every process picks the same width."""
    bucket, cap = int(run.cfg.train.text_bucket), int(run.ctx.av.max_len)
    if bucket <= 0:
        return rl_step(run, stage, ref_shardings)
    rollout, updates = rl_rollout(run, stage), {}

    def step(state, ref_av, batch, mean, key):
        roll = rollout(state, batch, mean, key)
        width = min(cap, -(-int(roll["widest"]) // bucket) * bucket)
        if width not in updates:
            updates[width] = rl_update(run, stage, ref_shardings, width)
        state, metrics = updates[width](state, ref_av, batch, roll, mean)
        return state, {**metrics, "text_width": width}
    return step
