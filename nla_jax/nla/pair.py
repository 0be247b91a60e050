"""A trained (AV, AR) pair read back from a trainer's work directory, with the config it was trained with.

`evaluate`, `explain` and `export` all start here. A checkpoint path names a pair:

    WORKDIR            the run's final pair: after RL if the rl stage has checkpoints, else after SFT
    WORKDIR/rl         the RL pair (AV and AR from the same state), newest readable step
    WORKDIR/rl@STEP    the RL pair at a given step
    WORKDIR/sft_av     the SFT pair (sft_av's AV, sft_ar's AR); also WORKDIR/sft_ar

Every checkpoint's meta carries the full training config and the dataset statistics, so a pair
loads without the original config file or store: the models, prompt specs and normalisation are
exactly those it was trained with. The caller may swap the mesh (evaluate on another device count)
and nothing else that the parameters depend on.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from nla_jax import checkpoint as ckpt_lib
from nla_jax.errors import UserError
from nla_jax.nla import stats as stats_lib

STAGE_DIRS = ("sft_av", "sft_ar", "rl")


@dataclasses.dataclass
class Pair:
    label: str                  # short name for tables, e.g. "quick/rl@20"
    path: str                   # as given
    workdir: str
    kind: str                   # "rl" | "sft"
    step: int                   # the RL step, or the SFT AV's step
    cfg: ml_collections.ConfigDict
    S: Any                      # train.Setup built from the saved config (store may be None)
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
    path = os.path.abspath(path.rstrip("/"))
    if not os.path.isdir(path):
        raise UserError(f"checkpoint {path}: no such directory")
    base = os.path.basename(path)
    if base in STAGE_DIRS:
        workdir, kind = os.path.dirname(path), ("rl" if base == "rl" else "sft")
    else:
        workdir = path
        have = [s for s in STAGE_DIRS if _has_steps(os.path.join(path, s))]
        if not have:
            raise UserError(f"checkpoint {path}: not a trainer work directory (expected sft_av/, sft_ar/ or rl/ "
                            f"holding checkpoints)")
        kind = "rl" if "rl" in have else "sft"
    if step is not None and kind != "rl":
        raise UserError(f"checkpoint {path}@{step}: a step can be chosen for the rl stage only "
                        f"(the SFT pair is the final sft_av and sft_ar checkpoints)")
    for s in (("rl",) if kind == "rl" else ("sft_av", "sft_ar")):
        if not _has_steps(os.path.join(workdir, s)):
            raise UserError(f"checkpoint {path}: {os.path.join(workdir, s)} holds no checkpoints")
    return workdir, kind, step


def _has_steps(d: str) -> bool:
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _manager(d: str) -> ckpt_lib.Checkpointer:
    # read-only and without a fingerprint: the saved config is what the state is checked against
    # (shapes and dtypes), and a reader must not move anything a running trainer owns.
    return ckpt_lib.Checkpointer(d, keep=None, async_save=False, read_only=True)


def saved_meta(stage_dir: str, step: int | None = None) -> tuple[int, dict]:
    mgr = _manager(stage_dir)
    try:
        return mgr.meta(step)
    finally:
        mgr.close()


def config_from_meta(meta: dict, where: str) -> ml_collections.ConfigDict:
    if "config" not in meta or "stats" not in meta:
        raise UserError(f"checkpoint {where} has no saved config/statistics (written by an older nla_jax?)")
    return ml_collections.ConfigDict(meta["config"])


def load(path: str, mesh_cfg=None, rules=None, label: str | None = None, open_store: bool = False) -> Pair:
    """Restore the pair `path` names onto `mesh_cfg` (default: the mesh it was trained with).

    The Setup is built from the saved config; `open_store=True` also opens the training store
    (evaluate needs its splits; explain does not)."""
    from nla_jax import sharding, train  # the trainer owns state layouts and shardings
    workdir, kind, step = resolve(path)
    first = os.path.join(workdir, "rl" if kind == "rl" else "sft_av")
    step, meta = saved_meta(first, step)
    cfg = config_from_meta(meta, first)
    with cfg.unlocked():
        if mesh_cfg is not None:
            cfg.mesh = mesh_cfg
        if rules is not None:
            cfg.rules = rules
        cfg.train.workdir = workdir
    stats = stats_lib.ActStats.from_json(meta["stats"])
    if open_store and not os.path.isdir(cfg.data.store):
        raise UserError(f"checkpoint {path}: its training store {cfg.data.store} is not there "
                        f"(pass --config.data.store=... pointing at a store of the same target and layer)")
    S = train.setup(cfg, writer_enabled=False, stats=stats, open_store=open_store)
    with sharding.use_mesh(S.mesh, S.rules):
        if kind == "rl":
            *_, init, txs, axes = train.rl_parts(S)
            state = _restore(S, first, step, init, txs, axes)
            av, ar = state["av"], state["ar"]
        else:
            *_, i_av, t_av, a_av = train.sft_av_parts(S)
            *_, i_ar, t_ar, a_ar = train.sft_ar_parts(S)
            av = _restore(S, first, None, i_av, t_av, a_av)["av"]
            ar = _restore(S, os.path.join(workdir, "sft_ar"), None, i_ar, t_ar, a_ar)["ar"]
    name = label or f"{os.path.basename(workdir)}/{kind}@{step}"
    return Pair(name, path, workdir, kind, step, cfg, S, av, ar, meta)


def reference_av(p: Pair) -> tuple[str, dict]:
    """(where, params) of the verbalizer a pair's AV is compared with by KL.

    RL pair: the reference of its KL penalty, as its meta records it ("ref_av": the sft_av stage
    directory, or "target:SOURCE" without a warm start). The recorded directory is looked up next to
    the pair first (WORKDIR/sft_av), so a moved work directory still finds its own reference.
    SFT pair: the target-initialised verbalizer (the target's weights, the same prompt and injection,
    input projection at identity), i.e. the point SFT started from: the KL then says how far the
    warm start moved the verbalizer along its own explanations."""
    from nla_jax import sharding, train
    S = p.S
    ref = p.meta.get("ref_av") if p.kind == "rl" else None
    if ref is None or str(ref).startswith("target:"):
        with sharding.use_mesh(S.mesh, S.rules):
            *_, init, txs, axes = train.sft_av_parts(S)
            sh = train.state_shardings(S, jax.eval_shape(init, S.target), txs, axes)["av"]
            av = jax.jit(lambda t: train.init_av(S, t), out_shardings=sh)(S.target)
        return f"target:{S.cfg.model.source}", av
    here = os.path.join(p.workdir, "sft_av")
    d = here if os.path.basename(str(ref).rstrip("/")) == "sft_av" and _has_steps(here) else str(ref)
    if not _has_steps(d):
        raise UserError(f"checkpoint {p.path}: its reference verbalizer {ref} holds no checkpoints")
    with sharding.use_mesh(S.mesh, S.rules):
        *_, init, txs, axes = train.sft_av_parts(S)
        return d, _restore(S, d, None, init, txs, axes)["av"]


def _restore(S, d: str, step: int | None, init, txs, axes) -> dict:
    from nla_jax import train
    state0 = jax.eval_shape(init, S.target)
    sh = train.state_shardings(S, state0, txs, axes)
    mgr = _manager(d)
    try:
        state, _ = mgr.restore(train.abstract_with(state0, sh), step=step)
    finally:
        mgr.close()
    return state
