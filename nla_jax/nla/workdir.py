"""A trainer's work directory: stage directories, DONE markers, fingerprints, and trained pairs read back.

Layout of WORKDIR (train.workdir):

    WORKDIR/sft_av/<step>/  sft_ar/<step>/  rl/<step>/    orbax checkpoints of each stage
    WORKDIR/<stage>/DONE        written (process 0) once the stage's final checkpoint is committed
    WORKDIR/stats.json          the dataset statistics the run trains with
    WORKDIR/metrics.jsonl       every logged value; eval.json after the eval stage

A checkpoint path names a trained (AV, AR) pair:

    WORKDIR            the run's final pair: after RL if the rl stage has checkpoints, else after SFT
    WORKDIR/rl         the RL pair (AV and AR from the same state), newest readable step
    WORKDIR/rl@STEP    the RL pair at a given step
    WORKDIR/sft_av     the SFT pair (sft_av's AV, sft_ar's AR); also WORKDIR/sft_ar
    WORKDIR/sft_av@STEP  the SFT pair with sft_av's AV at a given step (sft_ar's final AR): how the
                       warm start's length is judged (the AR learns from teacher text alone, so
                       it pairs with any of the AV's steps; keep them with train.keep_every)

Every checkpoint's meta carries the full training config and the dataset statistics, so a pair
loads without the original config file or store: the models, prompt specs and normalisation are
exactly those it was trained with. Reading a pair restores only the AV and AR parameters (no
optimizer state) and, unless asked for, not even the target's weights. The caller may swap the
mesh (evaluate on another device count) and nothing else that the parameters depend on.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Callable, Sequence

import jax
import ml_collections

from nla_jax import checkpoint as checkpoint_lib
from nla_jax import distributed, faults, fileio, paths, sharding
from nla_jax import weights as weights_lib
from nla_jax.errors import UserError
from nla_jax.nla import run as run_lib
from nla_jax.nla import state as state_lib
from nla_jax.nla import stats as stats_lib

STAGE_DIRS = state_lib.STAGES
DONE = "DONE"

# The config sections each stage's state depends on.
STAGE_SECTIONS = {"sft_av": ("av", "nla", "sft_av"), "sft_ar": ("ar", "nla", "sft_ar"),
                  "rl": ("av", "ar", "nla", "rl")}
# Keys of those sections that may change under existing checkpoints. `steps`: rerunning with a
# larger (or smaller) value is how a run is extended (or cut short), and the state so far does not
# depend on it (with a cosine schedule the decay follows the new length from the resumed step on,
# which is what extending means). `eval_every` / `val_rows` only change what is evaluated.
# `share_prompt`, model.remat, model.decode and model.attention change how a step is computed (rounding), not what it computes.
# Everything else (optimizer, batch, group size, sampling, seeds, model, store) defines the run:
# checkpoints written under other values are refused, naming the key.
FREE_KEYS = {"steps", "eval_every", "val_rows", "share_prompt"}
FREE_MODEL_KEYS = {"remat", "decode", "attention"}


def stage_dir(workdir: str, stage: str) -> str:
    return paths.join(workdir, stage)


def has_steps(directory: str) -> bool:
    """Whether a stage directory holds any checkpoint step (read or not)."""
    return paths.isdir(directory) and any(n.isdigit() for n in paths.listdir(directory))


def finished(workdir: str, stage: str) -> bool:
    return paths.exists(paths.join(workdir, stage, DONE))


def mark_done(workdir: str, stage: str, summary: dict) -> None:
    """Write the stage's DONE marker (its final evaluation) once every process got here."""
    faults.point(f"train.{stage}.before_done")
    if jax.process_index() == 0:
        fileio.write_atomic(paths.join(workdir, stage, DONE), fileio.json_text(summary))
    distributed.barrier(f"done-{stage}")


# ============================================================================= fingerprints

def fingerprint_subset(cfg: dict, stage: str) -> dict:
    """The settings a stage's checkpoints depend on, from a plain (JSON) config dict: the current
    config's, or the one saved in a checkpoint's meta."""
    keep = {k: {kk: v for kk, v in cfg[k].items() if kk not in FREE_KEYS} for k in STAGE_SECTIONS[stage]}
    keep["model"] = {k: v for k, v in cfg["model"].items() if k not in FREE_MODEL_KEYS}
    keep["data"] = {"seed": cfg["data"]["seed"], "store": paths.absolute(cfg["data"]["store"])}
    return keep


def fingerprint(cfg, stage: str) -> str:
    """What must not change under a stage's checkpoints: model, store, data seed, the stage's own
    section and the sections its state depends on (so an AR ablation can reuse a finished sft_av
    stage); see FREE_KEYS for what may change."""
    return checkpoint_lib.fingerprint(fingerprint_subset(json.loads(cfg.to_json()), stage))


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": json.dumps(v)})
    return out


def describe_change(cfg, stage: str) -> Callable[[dict], str | None]:
    """For Checkpointer(describe=), called when a checkpoint's fingerprint differs: which fingerprinted
    keys differ between the config saved with the checkpoint and `cfg` (e.g. "sft_av.optim.lr is 5e-05
    there, 0.001 now"), or None when they all agree (a fingerprint from an older trainer: the saved
    config is the authority). Keys only one side has are not compared: a key added to the config
    later keeps the behaviour it had before it existed, by the convention for adding keys."""
    now = _flat(fingerprint_subset(json.loads(cfg.to_json()), stage))

    def describe(meta: dict) -> str | None:
        if "config" not in meta:
            return "no config saved with it"
        then = _flat(fingerprint_subset(meta["config"], stage))
        diff = [k for k in sorted(set(now) & set(then)) if now[k] != then[k]]
        if not diff:
            return None
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        return "; ".join(f"{k} is {then[k]} there, {now[k]} now" for k in diff[:3]) + more
    return describe


def checkpointer(cfg, stage: str, *, async_save: bool = False, read_only: bool = False) -> checkpoint_lib.Checkpointer:
    """The stage's checkpoint manager under the config's fingerprint (refuses another config's steps)."""
    return checkpoint_lib.Checkpointer(stage_dir(cfg.train.workdir, stage), keep=None if read_only else cfg.train.keep,
                                       keep_every=cfg.train.get("keep_every") or None,
                                       async_save=async_save, read_only=read_only,
                                       fingerprint=fingerprint(cfg, stage), describe=describe_change(cfg, stage))


def check_existing(cfg, stages: Sequence[str]) -> None:
    """Existing checkpoints of the stages a run will read were written under this config (one line
    naming the key otherwise), before the work directory is touched."""
    for stage in stages:
        if not has_steps(stage_dir(cfg.train.workdir, stage)):
            continue
        mgr = checkpointer(cfg, stage, read_only=True)
        try:
            mgr.latest_step()
        finally:
            mgr.close()


def load_final(run: run_lib.Run, stage: str, key: str) -> dict:
    """The `key` parameters ("av" / "ar") of a finished stage's final checkpoint, sharded on the
    run's mesh (RL starts from the SFT pair; the eval stage reads every finished pair)."""
    layout = state_lib.for_stage(run, stage)
    mgr = checkpointer(run.cfg, stage)
    try:
        restored, _ = mgr.restore({key: layout.params_abstract(key)}, partial=True)
    finally:
        mgr.close()
    return restored[key]


# ============================================================================= trained pairs

@dataclasses.dataclass
class Pair:
    """A trained (AV, AR) pair with the run state it was trained with."""
    label: str                  # short name for tables, e.g. "quick/rl@20"
    path: str                   # as given
    workdir: str
    kind: str                   # "rl" | "sft"
    step: int                   # the RL step, or the SFT AV's step
    cfg: ml_collections.ConfigDict
    run: run_lib.Run            # built from the saved config (store None unless asked for)
    av: dict
    ar: dict
    meta: dict = dataclasses.field(default_factory=dict)  # the checkpoint's saved meta (config, stats, ref_av, ...)


def resolve(path: str) -> tuple[str, str, int | None]:
    """(workdir, kind, step or None) for a checkpoint path (see the module docstring)."""
    step = None
    head, sep, tail = path.rstrip("/").rpartition("@")
    if sep and os.sep not in tail:
        if not tail.isdigit():
            raise UserError(f"checkpoint {path!r}: expected DIR@STEP with an integer step, got {tail!r}")
        path, step = head, int(tail)
    path = paths.absolute(path.rstrip("/"))
    if not paths.isdir(path):
        raise UserError(f"checkpoint {path}: no such directory")
    base = paths.basename(path)
    if base in STAGE_DIRS:
        workdir, kind = paths.dirname(path), ("rl" if base == "rl" else "sft")
    else:
        workdir = path
        have = [s for s in STAGE_DIRS if has_steps(paths.join(path, s))]
        if not have:
            raise UserError(f"checkpoint {path}: not a trainer work directory (expected sft_av/, sft_ar/ or rl/ "
                            f"holding checkpoints)")
        kind = "rl" if "rl" in have else "sft"
    if step is not None and kind != "rl" and base != "sft_av":
        raise UserError(f"checkpoint {path}@{step}: a step can be chosen for the rl and sft_av stages only "
                        f"(an SFT pair's AR is sft_ar's final checkpoint)")
    for s in (("rl",) if kind == "rl" else ("sft_av", "sft_ar")):
        if not has_steps(paths.join(workdir, s)):
            raise UserError(f"checkpoint {path}: {paths.join(workdir, s)} holds no checkpoints")
    return workdir, kind, step


def _reader(directory: str) -> checkpoint_lib.Checkpointer:
    # read-only and without a fingerprint: the saved config is what the state is checked against
    # (shapes and dtypes), and a reader must not move anything a running trainer owns.
    return checkpoint_lib.Checkpointer(directory, keep=None, async_save=False, read_only=True)


def saved_meta(directory: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of a stage directory's newest readable step (or `step`); reads no arrays."""
    mgr = _reader(directory)
    try:
        return mgr.meta(step)
    finally:
        mgr.close()


def config_from_meta(meta: dict, where: str) -> ml_collections.ConfigDict:
    if "config" not in meta or "stats" not in meta:
        raise UserError(f"checkpoint {where} has no saved config/statistics (written by an older nla_jax?)")
    return ml_collections.ConfigDict(meta["config"])


def _restore_params(directory: str, step: int | None, wanted: dict) -> dict:
    mgr = _reader(directory)
    try:
        restored, _ = mgr.restore(wanted, step=step, partial=True)
    finally:
        mgr.close()
    return restored


def load_pair(path: str, mesh_cfg=None, rules=None, label: str | None = None, open_store: bool = False,
              with_target: bool = True, dtype: str = "compute") -> Pair:
    """Restore the pair `path` names onto `mesh_cfg` (default: the mesh it was trained with).

    The run is built from the saved config and statistics; `open_store=True` also opens the
    training store; `with_target=False` leaves the target's weights unread (export needs only the
    pair's own parameters).

    `dtype`: what the parameters are held in. "compute" (inference: evaluate, explain): the
    config's model.dtype, cast while restoring, so a bf16-compute pair trained with float32
    masters takes half the memory and computes exactly as the trainer's forward passes did (they
    cast the masters to model.dtype too). "weight": the masters as saved (export, continued
    training). Or a dtype name. Parts the trainer keeps in float32 whatever model.dtype is (the
    AV's input projection, the AR head) stay float32."""
    workdir, kind, step = resolve(path)
    first = paths.join(workdir, "rl" if kind == "rl" else "sft_av")
    step, meta = saved_meta(first, step)
    cfg = config_from_meta(meta, first)
    with cfg.unlocked():
        if mesh_cfg is not None:
            cfg.mesh = mesh_cfg
        if rules is not None:
            cfg.rules = rules
        cfg.train.workdir = workdir
    stats = stats_lib.ActStats.from_json(meta["stats"])
    if open_store and not paths.isdir(cfg.data.store):
        raise UserError(f"checkpoint {path}: its training store {cfg.data.store} is not there "
                        f"(pass --config.data.store=... pointing at a store of the same target and layer)")
    run = run_lib.build(cfg, store=open_store, weights=with_target, stats=stats, weight_dtype=_held_dtype(cfg, dtype))
    with sharding.use_mesh(run.mesh, run.rules):
        if kind == "rl":
            layout = state_lib.rl(run)
            got = _restore_params(first, step, {"av": layout.params_abstract("av"), "ar": layout.params_abstract("ar")})
            av, ar = got["av"], got["ar"]
        else:
            av = _restore_params(first, step, {"av": state_lib.sft_av(run).params_abstract("av")})["av"]
            ar = _restore_params(paths.join(workdir, "sft_ar"), None,
                                 {"ar": state_lib.sft_ar(run).params_abstract("ar")})["ar"]
    name = label or f"{paths.basename(workdir)}/{kind}@{step}"
    return Pair(name, path, workdir, kind, step, cfg, run, av, ar, meta)


def _held_dtype(cfg, dtype: str):
    name = {"compute": cfg.model.dtype, "weight": weights_lib.weight_dtype_name(cfg.model)}.get(dtype, dtype)
    if name not in weights_lib.DTYPES:
        raise UserError(f"dtype {dtype!r}: expected 'compute', 'weight' or one of {', '.join(weights_lib.DTYPES)}")
    return weights_lib.dtype_of(name)


def mesh_fits(shape: Sequence[int], devices: int) -> bool:
    """Whether a saved mesh shape (one -1 allowed) can be built from this many devices."""
    known = math.prod(s for s in shape if s != -1)
    return devices % known == 0 if -1 in shape else known == devices


def load_pair_here(path: str, with_target: bool = True, dtype: str = "compute") -> Pair:
    """load_pair on this machine: the mesh the pair was trained with when it fits the local devices,
    else every local device on the data axis (a pair trained on a pod, read on a laptop)."""
    workdir, kind, step = resolve(path)
    _, meta = saved_meta(paths.join(workdir, "rl" if kind == "rl" else "sft_av"), step)
    shape = tuple((meta.get("config") or {}).get("mesh", {}).get("shape", (-1, 1, 1)))
    n = len(jax.devices())
    mesh = None
    if not mesh_fits(shape, n):
        print(f"note: the pair was trained on a {shape} mesh; using this machine's {n} device(s) as (-1, 1, 1)",
              file=sys.stderr)
        mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1), "axes": sharding.MESH_AXES})
    return load_pair(path, mesh_cfg=mesh, with_target=with_target, dtype=dtype)


def reference_av(pair: Pair) -> tuple[str, dict]:
    """(where, params) of the verbalizer a pair's AV is compared with by KL.

    RL pair: the reference of its KL penalty, as its meta records it ("ref_av": the sft_av stage
    directory, or "target:SOURCE" without a warm start). The recorded directory is looked up next to
    the pair first (WORKDIR/sft_av), so a moved work directory still finds its own reference.
    SFT pair: the target-initialised verbalizer (the target's weights, the same prompt and injection,
    input projection at identity), i.e. the point SFT started from: the KL then says how far the
    warm start moved the verbalizer along its own explanations."""
    run = pair.run
    ref = pair.meta.get("ref_av") if pair.kind == "rl" else None
    if ref is None or str(ref).startswith("target:"):
        with sharding.use_mesh(run.mesh, run.rules):
            target = run_lib.load_target(run)
            av = jax.jit(lambda t: state_lib.init_av(run, t), out_shardings=state_lib.av_shardings(run))(target)
        return f"target:{run.cfg.model.source}", av
    here = paths.join(pair.workdir, "sft_av")
    d = here if paths.basename(str(ref).rstrip("/")) == "sft_av" and has_steps(here) else str(ref)
    if not has_steps(d):
        raise UserError(f"checkpoint {pair.path}: its reference verbalizer {ref} holds no checkpoints")
    with sharding.use_mesh(run.mesh, run.rules):
        return d, _restore_params(d, None, {"av": state_lib.sft_av(run).params_abstract("av")})["av"]
