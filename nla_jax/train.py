"""Train an NLA: SFT warm start of the verbalizer (AV) and reconstructor (AR), then GRPO.

    python -m nla_jax.train --config configs/smollm2_135m.py:quick
    python -m nla_jax.train --config configs/tiny.py --config.train.workdir=/tmp/w --stages sft_av,sft_ar,rl
    # several processes (one per host): add --coordinator HOST:PORT --num-processes N --process-id I,
    # or --distributed-auto under SLURM / on a TPU pod (launch/slurm_gpu.sbatch, launch/tpu_vm.sh)

Stages run in order; each keeps its own orbax checkpoints under WORKDIR/<stage>/ and resumes from
its latest good one, so rerunning the same command after a crash continues where it stopped.
A finished stage is skipped. Reading order: 1 command line and config checks, 2 the stage loop
(checkpoints, metrics, progress, the non-finite guard), 3 SFT (one loop for both models),
4 GRPO, 5 the held-out evaluation, 6 main (config -> mesh -> run state -> stages).
Everything below the loops (run state, stage state and shardings, batches, steps) is library code
in nla_jax/nla/; nothing imports this file.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nla_jax import checkpoint as checkpoint_lib
from nla_jax import cli, distributed, faults, fileio, paths, sharding
from nla_jax import metrics as metrics_lib
from nla_jax.cli import cli_main
from nla_jax.data import store as store_lib
from nla_jax.errors import UserError
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import batches as batches_lib
from nla_jax.nla import evaluation
from nla_jax.nla import run as run_lib
from nla_jax.nla import state as state_lib
from nla_jax.nla import stats as stats_lib
from nla_jax.nla import steps
from nla_jax.nla import workdir as workdir_lib

STAGES = (*state_lib.STAGES, "eval")


# ============================================================================= 1. command line and checks

def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--stages", default=None, help="comma-separated subset of sft_av,sft_ar,rl,eval "
                   "(default: config train.stages)")
    return cli.add_distributed_flags(p)


def check_stages(cfg, stages: tuple[str, ...]) -> None:
    """RL warm-started from SFT needs both SFT stages finished, or run before it by this command."""
    if "rl" in stages and cfg.rl.init_from_sft:
        for need in ("sft_av", "sft_ar"):
            if need not in stages and not workdir_lib.finished(cfg.train.workdir, need):
                raise UserError(f"stage rl needs the finished {need} stage in {cfg.train.workdir} "
                                f"(run it first, or set --config.rl.init_from_sft=False)")


def check_run(cfg, stages: tuple[str, ...]) -> None:
    """Checks that need jax (after distributed start-up) but no compute, before the work directory is
    touched: the mesh fits the devices, each batch fits its split, and existing checkpoints of the
    stages this run will read were written under this config."""
    sharding.mesh_from_config(cfg.mesh)
    manifest = store_lib.open_store(cfg.data.store).manifest
    for stage, split in state_lib.SPLIT_OF_STAGE.items():
        rows = manifest.get("splits", {}).get(split, {}).get("rows", 0)
        if stage in stages and cfg[stage].steps > 0 and cfg[stage].batch > rows:
            raise UserError(f"config key {stage}.batch={cfg[stage].batch} is larger than split {split!r} "
                            f"of store {cfg.data.store} ({rows} rows)")
    reads = {s for s in stages if s in workdir_lib.STAGE_SECTIONS}
    if "rl" in stages and cfg.rl.init_from_sft:
        reads |= {"sft_av", "sft_ar"}
    workdir_lib.check_existing(cfg, sorted(reads))


# ============================================================================= 2. the stage loop's bookkeeping

_OPEN_STAGES: list["StageProgress"] = []


class StageProgress:
    """Checkpoints, metrics, progress bar and the non-finite guard of one running stage."""

    def __init__(self, run: run_lib.Run, writer: metrics_lib.MetricsWriter, layout: state_lib.StageState,
                 total: int):
        self.run, self.writer, self.layout, self.name, self.total = run, writer, layout, layout.name, total
        self.mgr = workdir_lib.checkpointer(run.cfg, self.name, async_save=run.cfg.train.async_checkpoint)
        self.bar = None
        self.streak = 0
        _OPEN_STAGES.append(self)

    def restore(self) -> tuple[dict | None, int]:
        """(state, step) of the newest good checkpoint, or (None, 0) for a fresh stage."""
        if self.mgr.latest_step() is None:
            if self.mgr.all_steps():  # never start over on top of steps that exist but do not read
                raise UserError(f"no checkpoint in {self.mgr.directory} reads (steps "
                                f"{', '.join(map(str, self.mgr.all_steps()))}); move that directory aside "
                                f"to start stage {self.name} over")
            return None, 0
        state, meta = self.mgr.restore(self.layout.abstract)
        return state, int(meta.get("step", 0))

    def save(self, state: dict, step: int, done: bool = False, extra: dict | None = None) -> None:
        if self.streak and not done:
            return  # inside a run of non-finite steps: the last checkpoint stays the last good one
        meta = {"stage": self.name, "step": step, "done": done, "data_step": step,
                "config": json.loads(self.run.cfg.to_json()), "stats": self.run.stats.to_json(), **(extra or {})}
        self.mgr.save(step, state, meta)
        faults.point(f"train.{self.name}.saving")

    def progress(self, start: int):
        self.bar = tqdm(total=self.total, initial=start, desc=self.name, unit="step",
                        disable=jax.process_index() != 0, dynamic_ncols=True)
        return self.bar

    def guard(self, state: dict, step: int) -> None:
        """Stop the run after train.max_nonfinite non-finite steps in a row (the step skips them)."""
        streak = self.streak = int(jax.device_get(state["streak"]))
        if streak >= self.run.cfg.train.max_nonfinite:
            self.mgr.wait()
            raise UserError(f"stage {self.name}: {streak} non-finite steps in a row up to step {step}; stopped. "
                            f"Last good checkpoint: step {self.mgr.latest_step()} in {self.mgr.directory}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.mgr.wait()
        self.mgr.close()
        if self in _OPEN_STAGES:
            _OPEN_STAGES.remove(self)

    def abort(self) -> None:
        """After an error: let an in-flight save of a good state finish, then stop orbax's threads,
        so nothing of theirs prints after the one-line error (best effort: the error that got us
        here is the one reported)."""
        if self in _OPEN_STAGES:
            _OPEN_STAGES.remove(self)
        if self.bar is not None:
            self.bar.close()
        for fn in (self.mgr.wait, self.mgr.close):
            try:
                fn()
            except Exception:  # noqa: BLE001
                pass


def start_stage(run, writer, name: str) -> tuple[StageProgress, dict, int]:
    """The stage's bookkeeping and its state: restored from the newest good checkpoint, else fresh."""
    layout = state_lib.for_stage(run, name)
    progress = StageProgress(run, writer, layout, run.cfg[name].steps)
    state, start = progress.restore()
    return progress, state, start


# ============================================================================= 3. SFT (both models)

def sft_validation(run, writer, name: str) -> Callable[[dict, int], dict]:
    """evaluate(state, step) -> the logged record, on a fixed batch of the *other* SFT split's rows
    (other documents than training). AV: cross-entropy with real vs shuffled activations; AR: fve_nrm
    with its CI over documents (cluster-robust t) beside the floor."""
    sec = run.cfg[name]
    if name == "sft_av":
        val, val_docs = batches_lib.fixed_rows(run, run_lib.rows_with_summaries(run, "ar_sft"), sec.val_rows,
                                               batches_lib.av_batch, f"{name}.val_rows")
        perm = jnp.asarray(np.random.default_rng(0).permutation(val["acts"].shape[0]))
        eval_fn = jax.jit(functools.partial(steps.sft_av_eval, ctx=run.ctx))

        def evaluate(state, step):
            ce = {k: distributed.host_array(v) for k, v in eval_fn(state["av"], val, run.mean, perm).items()}
            gap = stats_lib.cluster_t_ci(np.asarray(ce["ce_shuffled"] - ce["ce_real"]), val_docs)
            return writer.write(name, step, {"kind": "eval", "ce_real": float(ce["ce_real"].mean()),
                                             "ce_shuffled": float(ce["ce_shuffled"].mean()),
                                             "ce_gap": gap[0], "ce_gap_lo": gap[1], "ce_gap_hi": gap[2]})
        return evaluate
    val, val_docs = batches_lib.fixed_rows(run, run_lib.rows_with_summaries(run, "av_sft"), sec.val_rows,
                                           batches_lib.ar_batch, f"{name}.val_rows")
    eval_fn = jax.jit(functools.partial(steps.ar_eval, ctx=run.ctx))
    var, floor = run.stats.var(run.ctx.center), run.stats.floor(run.ctx.center)

    def evaluate(state, step):
        mse = distributed.host_array(eval_fn(state["ar"], val, run.mean))
        fve = stats_lib.cluster_t_ci(1 - mse / var, val_docs)
        return writer.write(name, step, {"kind": "eval", "fve_nrm": fve[0], "fve_lo": fve[1], "fve_hi": fve[2],
                                         "floor": floor})
    return evaluate


def ridge_head(run, layout: state_lib.StageState, state: dict) -> dict:
    """Initialise the AR head by ridge regression from head inputs to normalised targets (every
    process solves the same problem on all processes' rows). The optimizer state was built for the
    identity head; Adam's moments are zero either way."""
    sec = run.cfg.sft_ar
    features_fn = jax.jit(functools.partial(steps.ar_features, ctx=run.ctx))
    feats, targets = [], []
    rows = run_lib.rows_with_summaries(run, "ar_sft")
    for i, batch in batches_lib.stage_batches(run, "ar_sft", sec.batch, 0, batches_lib.ar_batch, only=rows):
        if i * sec.batch >= min(sec.ridge_rows, len(rows)):
            break
        feats.append(distributed.host_array(features_fn(state["ar"], batch)))     # [b, d]
        targets.append(distributed.host_array(batch["acts"]))                    # [b, d]
    targets_nrm = stats_lib.normalise_np(np.concatenate(targets),
                                         run.stats.mean_array() if run.ctx.center else None)
    w, b = ar_lib.ridge(np.concatenate(feats), targets_nrm, sec.ridge_lambda)
    head_sh = layout.shardings["ar"]["head"]
    head = {"w": jax.device_put(w, head_sh["w"])}
    if "b" in head_sh:  # ar.head_bias=false: the ridge fit's intercept is dropped
        head["b"] = jax.device_put(b, head_sh["b"])
    ar = {**state["ar"], "head": head}
    return {**state, "ar": ar}


def run_sft(run, writer, name: str) -> None:
    """One SFT stage: step, guard, log, validate, checkpoint; then the final validation, the final
    checkpoint and the DONE marker."""
    sec = run.cfg[name]
    split = state_lib.SPLIT_OF_STAGE[name]
    make = batches_lib.av_batch if name == "sft_av" else batches_lib.ar_batch
    progress, state, start = start_stage(run, writer, name)
    layout = progress.layout
    if state is None:
        state = state_lib.fresh(run, layout)
        if name == "sft_ar" and run.cfg.ar.head_init == "ridge":
            state = ridge_head(run, layout, state)
    evaluate = sft_validation(run, writer, name)
    if name == "sft_ar":
        var = run.stats.var(run.ctx.center)
        shown = lambda m: {"fve_nrm": 1 - float(m["loss"]) / var}   # logged, and shown instead of the loss
        if start == 0:
            evaluate(state, 0)
    else:
        shown = lambda m: {}
    bar = progress.progress(start)
    rows = run_lib.rows_with_summaries(run, split)
    # each batch padded to its longest text (train.text_bucket), not the cap: one compiled step per width
    width = batches_lib.text_widths(run, name, rows)
    text_key = "targets" if name == "sft_av" else "expl"
    step_fns: dict[int | None, Callable] = {}
    for step, batch in batches_lib.stage_batches(run, split, sec.batch, start, make, only=rows, stage=name,
                                                 width=width):
        if step >= sec.steps:
            break
        w = None if width is None else int(batch[text_key].shape[1])
        if w not in step_fns:
            step_fns[w] = state_lib.sft_step(run, layout, width=w)
        state, m = step_fns[w](state, batch, run.mean)
        m = jax.device_get(m)
        more = shown(m)
        if (step + 1) % run.cfg.train.log_every == 0:
            writer.write(name, step + 1, {"loss": m["loss"], **more, "grad_norm": m["grad_norm"],
                                          "skipped": state["skipped"], **({"text_width": w} if w else {})})
        progress.guard(state, step + 1)  # after the log line: the step that stops the run is logged too
        bar.update(1)
        bar.set_postfix({k: f"{float(v):.3f}" for k, v in (more or {"loss": m["loss"]}).items()})
        faults.point(f"train.{name}.step")
        if (step + 1) % sec.eval_every == 0 and step + 1 < sec.steps:
            evaluate(state, step + 1)
        if (step + 1) % run.cfg.train.ckpt_every == 0 and step + 1 < sec.steps:
            progress.save(state, step + 1)
    final = evaluate(state, sec.steps)
    progress.save(state, sec.steps, done=True)
    progress.close()
    workdir_lib.mark_done(run.workdir, name, final)


# ============================================================================= 4. GRPO

def run_rl(run, writer) -> None:
    """GRPO of the AV against the live AR (trained on the same rollouts), leashed by KL to the
    reference AV: the SFT AV (or the target itself without a warm start)."""
    sec = run.cfg.rl
    if sec.init_from_sft:  # before the Checkpointer exists (its threads must not outlive a refusal)
        for need in ("sft_av", "sft_ar"):
            if not workdir_lib.finished(run.workdir, need):
                raise UserError(f"stage rl needs the finished {need} stage in {run.workdir} "
                                f"(run it first, or set --config.rl.init_from_sft=False)")
    progress, state, start = start_stage(run, writer, "rl")
    # Where the reference AV comes from is recorded in every RL checkpoint's meta.
    if sec.init_from_sft:
        ref = workdir_lib.load_final(run, "sft_av", "av")
        ref_where = workdir_lib.stage_dir(run.workdir, "sft_av")
    else:
        ref = state_lib.init_av(run, run.target)
        ref_where = f"target:{run.cfg.model.source}"
    if state is None:
        state = state_lib.fresh(run, progress.layout)
        if sec.init_from_sft:
            state = {**state, "av": jax.tree.map(jnp.copy, ref), "ar": workdir_lib.load_final(run, "sft_ar", "ar")}
    ref = state_lib.frozen_reference(run, ref)   # after the AV copied it: masters stay in weight_dtype
    # one function at the cap, or (train.text_bucket > 0) a rollout, then an update as wide as its texts
    step_fn = state_lib.rl_step_by_width(run, progress.layout, jax.tree.map(lambda a: a.sharding, ref))
    bar = progress.progress(start)
    key0 = jax.random.key(sec.seed)
    for step, batch in batches_lib.stage_batches(run, "rl", sec.batch, start, None, stage="rl"):
        if step >= sec.steps:
            break
        state, m = step_fn(state, ref, batch, run.mean, jax.random.fold_in(key0, step))
        m = jax.device_get(m)
        writer.write("rl", step + 1, {**{k: float(v) for k, v in m.items()}, "skipped": state["skipped"]})
        progress.guard(state, step + 1)
        bar.update(1)
        bar.set_postfix(reward=f"{float(m['reward_mean']):.3f}", fve=f"{float(m['fve_nrm']):.3f}",
                        fail=f"{float(m['extract_fail']):.2f}")
        faults.point("train.rl.step")
        if (step + 1) % run.cfg.train.ckpt_every == 0 and step + 1 < sec.steps:
            progress.save(state, step + 1, extra={"ref_av": ref_where})
    progress.save(state, sec.steps, done=True, extra={"ref_av": ref_where})
    progress.close()
    workdir_lib.mark_done(run.workdir, "rl", {"steps": sec.steps, "skipped": int(state["skipped"])})


# ============================================================================= 5. held-out evaluation

def run_eval(run, writer) -> None:
    """Every finished pair (after SFT, after RL) on held-out documents; writes WORKDIR/eval.json."""
    pairs, judge, ref = [], None, None
    if workdir_lib.finished(run.workdir, "sft_av") and workdir_lib.finished(run.workdir, "sft_ar"):
        ref, sft_ar = workdir_lib.load_final(run, "sft_av", "av"), workdir_lib.load_final(run, "sft_ar", "ar")
        pairs.append(("after_sft", ref, sft_ar))
        judge = ("sft_ar", sft_ar)      # the fixed judge: trained on teacher text only, never on an AV's output
    if workdir_lib.finished(run.workdir, "rl"):
        pairs.append(("after_rl", workdir_lib.load_final(run, "rl", "av"), workdir_lib.load_final(run, "rl", "ar")))
    evaluation.heldout_stage(run, pairs, run.workdir, writer, judge=judge, ref_av=ref)


# ============================================================================= 6. main

@cli_main
def main(argv=None) -> int:
    args, cfg = cli.parse(build_parser(), argv)
    run_lib.check_config(cfg)
    stages = tuple(s for s in (args.stages or ",".join(cfg.train.stages)).split(",") if s)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise UserError(f"--stages: unknown stage {bad[0]!r} (expected some of {', '.join(STAGES)})")
    run_lib.check_store(cfg)
    check_stages(cfg, stages)
    cli.start_distributed(args)
    cli.enable_compilation_cache()
    check_run(cfg, stages)
    paths.makedirs(cfg.train.workdir)
    with checkpoint_lib.WorkdirLock(cfg.train.workdir, jax.process_index()):
        run = run_lib.build(cfg)
        writer = metrics_lib.MetricsWriter(run.workdir, enabled=jax.process_index() == 0)
        if jax.process_index() == 0:
            fileio.write_atomic(paths.join(run.workdir, "stats.json"), json.dumps(run.stats.to_json()))
        t0 = time.time()
        runners = {"sft_av": lambda: run_sft(run, writer, "sft_av"), "sft_ar": lambda: run_sft(run, writer, "sft_ar"),
                   "rl": lambda: run_rl(run, writer), "eval": lambda: run_eval(run, writer)}
        with sharding.use_mesh(run.mesh, run.rules):
            for name in STAGES:
                if name not in stages:
                    continue
                if name != "eval" and workdir_lib.finished(run.workdir, name):
                    print(f"{name}: finished earlier, skipped", file=sys.stderr)
                    continue
                try:
                    runners[name]()
                except BaseException:
                    for progress in list(_OPEN_STAGES):
                        progress.abort()
                    writer.close()
                    raise
        writer.close()
        print(f"done in {time.time() - t0:.0f}s; work directory {run.workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
