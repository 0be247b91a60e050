"""CLI: import an official NLA release's AV/AR pair as an nla_jax pair (a work directory).

    python -m nla_jax.import_official --av AV_DIR --ar AR_DIR --out WORKDIR \\
        [--config configs/official.py] [--store STORE] [--injection-scale X] [--config.KEY=VALUE ...]

Reads the two Hugging Face directories and their nla_meta.yaml sidecars (nla_jax/official.py) and
writes them as the work directory's warm-start pair: WORKDIR/sft_av/0 (the AV) and WORKDIR/sft_ar/0
(the AR), orbax checkpoints with the config and statistics in their meta as the trainer writes them,
both DONE. So `explain`, `evaluate` and `export` take WORKDIR like any trained pair, and the trainer
continues with RL from it (the imported AV is then also the KL reference):

    python -m nla_jax.train --config configs/official.py:WORKDIR --config.rl.steps=100 --stages rl,eval

(configs/official.py:WORKDIR is the config the import saved in WORKDIR/import_config.json; RL needs
the activation store the import was given with --store, whose path is part of that config). The release's conventions become config values: marker character + id + neighbour
ids, the AV prompt and AR wrapper templates, the injection scale, an AR head without input norm or
bias. Everything is checked before a weight is read: a missing sidecar, a marker that does not
tokenise to its one id with the stated neighbours on the AV's own tokenizer, an extraction layer that
disagrees with the AR's block count, shapes, each one line.

Statistics: the release ships none. With --store (activations of the same target and layer) they are
computed from it; otherwise the pair carries neutral ones (zero mean, Var(v_nrm) = 1, floor 0), so
its fve_nrm equals 1 - mse_nrm until evaluated against a store.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nla_jax import checkpoint as checkpoint_lib
from nla_jax import cli, configlib, fileio, official, sharding
from nla_jax.cli import cli_main
from nla_jax.data import store as store_lib
from nla_jax.errors import UserError
from nla_jax.nla import run as run_lib
from nla_jax.nla import state as state_lib
from nla_jax.nla import stats as stats_lib
from nla_jax.nla import workdir as workdir_lib

CONFIG_FILE = "import_config.json"   # the config the pair was imported with (configs/official.py:WORKDIR)
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "official.py")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nla_jax.import_official", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--av", required=True, metavar="AV_DIR", help="the release's verbalizer directory (role av)")
    p.add_argument("--ar", required=True, metavar="AR_DIR", help="the release's reconstructor directory (role ar)")
    p.add_argument("--out", required=True, metavar="WORKDIR", help="the nla_jax work directory to write (new or empty)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="settings besides the pair's own (mesh, sampling, eval)")
    p.add_argument("--store", default="", help="an activation store of the same target and layer (statistics)")
    p.add_argument("--injection-scale", type=float, default=None,
                   help="only when the AV sidecar leaves extraction.injection_scale unset")
    return p


def neutral_stats(d: int, inject_norm: float) -> stats_lib.ActStats:
    zeros = (0.0,) * d
    return stats_lib.ActStats(d=d, mean=zeros, mean_norm=inject_norm / 1.1, var_nrm=1.0, var_nrm_centered=1.0,
                              floor_fve=0.0, floor_fve_centered=0.0, rows=0, mean_nrm=zeros, mean_nrm_centered=zeros)


def import_pair(av_dir: str, ar_dir: str, out: str, cfg, store: str = "", injection_scale: float | None = None) -> str:
    """Check, convert and write; returns the work directory. Nothing is written before the checks pass."""
    out = os.path.abspath(out)
    if os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out}: exists and is not an empty directory")
    info = official.check_pair(av_dir, ar_dir, injection_scale)
    official.apply_to_config(cfg, info, av_dir)
    if cfg.model.get("arch"):  # a target config (configs/gemma3_12b.py:imported) must describe this AV
        run_lib.model_config_from_arch(cfg)
    with cfg.unlocked():
        cfg.train.workdir = out
        cfg.data.store = os.path.abspath(store) if store else ""
    if store:
        opened = store_lib.open_store(store)
        run_lib.check_store(cfg, opened.manifest, info["d"])
        stats = stats_lib.from_store(opened, cfg.nla.stats_splits, cfg.nla.stats_rows, cfg.nla.seed)
    else:
        stats = neutral_stats(info["d"], info["injection_scale"])
    # specs first (the marker and neighbour check on the AV's tokenizer), weights after. The conversion
    # runs on this machine's devices; the saved config keeps the config's own mesh (for the pod).
    here = ml_collections.ConfigDict(json.loads(cfg.to_json()))
    here.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1), "axes": sharding.MESH_AXES, "platform": "any"})
    run = run_lib.build(here, store=False, weights=False, stats=stats)
    with sharding.use_mesh(run.mesh, run.rules):
        layout = state_lib.sft_ar(run)
        target = run_lib.load_target(run)
        av = {"model": target, "extra": {}}
        ar_np = official.read_ar(ar_dir, info["ar_cfg"])
        ar = jax.tree.map(lambda a, s: jax.device_put(jnp.asarray(np.asarray(a), s.dtype), s.sharding),
                          ar_np, layout.params_abstract("ar"))
    meta = {"step": 0, "done": True, "data_step": 0, "config": json.loads(cfg.to_json()), "stats": stats.to_json(),
            "official": {"av_dir": os.path.abspath(av_dir), "ar_dir": os.path.abspath(ar_dir),
                         "av_meta": info["av_meta"], "ar_meta": info["ar_meta"], "stats": "store" if store else "neutral",
                         "dtype": official.release_dtype(av_dir)}}
    os.makedirs(out, exist_ok=True)
    meta = json.loads(json.dumps(meta, default=str))
    for stage, key, params in (("sft_av", "av", av), ("sft_ar", "ar", ar)):
        mgr = checkpoint_lib.Checkpointer(workdir_lib.stage_dir(out, stage), keep=None, async_save=False,
                                          fingerprint=workdir_lib.fingerprint(cfg, stage))
        try:
            mgr.save(0, {key: params}, {**meta, "stage": stage})
            mgr.wait()
        finally:
            mgr.close()
        workdir_lib.mark_done(out, stage, {"imported": True})
    fileio.write_atomic(os.path.join(out, CONFIG_FILE), cfg.to_json(indent=1))
    return out


@cli_main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = configlib.split_config_args(argv)
    args = build_parser().parse_args(rest)
    cfg = configlib.get(args.config, overrides)
    cli.enable_compilation_cache()
    out = import_pair(args.av, args.ar, args.out, cfg, args.store, args.injection_scale)
    print(f"imported {args.av} + {args.ar} -> {out} (block {cfg.model.layer}, injection scale {cfg.av.inject_norm:g}); "
          f"explain with: python -m nla_jax.explain --checkpoint {out} --text ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
