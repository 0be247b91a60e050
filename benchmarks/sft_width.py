"""SFT steps on batches padded to their longest warm-start text (train.text_bucket, what the trainer
does) against the same batches padded to the explanation cap, on the real embedded target and a
real store's texts, interleaved in one process (the machine is shared and noisy: read the ratio).

    .venv/bin/python benchmarks/sft_width.py                                   # the default config
    .venv/bin/python benchmarks/sft_width.py --config configs/smollm2_135m.py:quick \\
        --config.data.store=runs/smollm2_135m_quick/acts --name quick

Per stage (sft_av, sft_ar): the split's first --batches batches in the trainer's order, each built
both ways; the jitted trainer step (state_lib.sft_step, one per width) compiled on each first, then
--reps rounds of (cap step, bucketed step) per batch. Also: the loss of one step from the same fresh
state both ways (the same maths: tests/test_sft_width.py), and the widths of every batch of one
epoch of the split in the trainer's order (how often each compiled width runs). Prints a table and
writes benchmarks/results/sft_width_NAME.json.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nla_jax import configlib, sharding  # noqa: E402
from nla_jax.data import loader as data_loader  # noqa: E402
from nla_jax.nla import batches as batches_lib  # noqa: E402
from nla_jax.nla import run as run_lib  # noqa: E402
from nla_jax.nla import state as state_lib  # noqa: E402
from record import write_result  # noqa: E402


def stage_timing(run, name: str, n_batches: int, reps: int) -> dict:
    sec = run.cfg[name]
    split = state_lib.SPLIT_OF_STAGE[name]
    make = batches_lib.av_batch if name == "sft_av" else batches_lib.ar_batch
    key = "targets" if name == "sft_av" else "expl"
    rows = run_lib.rows_with_summaries(run, split)
    width = batches_lib.text_widths(run, name, rows)
    if width is None:
        raise SystemExit("error: train.text_bucket is 0 in this config: nothing to compare")
    cap = int(run.ctx.av.max_len if name == "sft_av" else run.ctx.ar.max_len)
    take = lambda w: [b for _, (_, b) in zip(range(n_batches), batches_lib.stage_batches(
        run, split, sec.batch, 0, make, only=rows, width=w))]
    capped, bucketed = take(None), take(width)
    widths = [int(b[key].shape[1]) for b in bucketed]
    layout = state_lib.for_stage(run, name)
    # one epoch of the split in the trainer's order: which width each batch gets
    order = data_loader.SplitOrder(run.store, split, sec.batch, batches_lib.split_seed(run, split), rows)
    epoch = collections.Counter(width(order.global_rows(s)) for s in range(max(len(rows) // sec.batch, 1)))

    # the same fresh state, one step each way: the losses must agree
    losses = {}
    for label, w, batch in (("cap", None, capped[0]), ("bucketed", widths[0], bucketed[0])):
        state = state_lib.fresh(run, layout)
        _, m = state_lib.sft_step(run, layout, width=w)(state, batch, run.mean)
        losses[label] = float(m["loss"])
        del state
    fns = {None: state_lib.sft_step(run, layout)}
    for w in sorted(set(widths)):
        fns[w] = state_lib.sft_step(run, layout, width=w)
    state = state_lib.fresh(run, layout)
    t0 = time.perf_counter()
    for w, fn in fns.items():                                      # compile each width (a real batch of it)
        batch = capped[0] if w is None else bucketed[widths.index(w)]
        state, _ = jax.block_until_ready(fn(state, batch, run.mean))
    compile_s = time.perf_counter() - t0
    times = {"cap": [], "bucketed": []}
    for _ in range(reps):
        for c, b, w in zip(capped, bucketed, widths):
            for label, fn, batch in (("cap", fns[None], c), ("bucketed", fns[w], b)):
                t = time.perf_counter()
                state, _ = jax.block_until_ready(fn(state, batch, run.mean))
                times[label].append(time.perf_counter() - t)
    del state
    mean = {k: float(np.mean(v)) for k, v in times.items()}
    return {"batch": int(sec.batch), "cap": cap, "bucket": int(run.cfg.train.text_bucket), "batches": n_batches,
            "reps": reps, "widths_timed": widths, "epoch_widths": {str(k): v for k, v in sorted(epoch.items())},
            "epoch_mean_width": float(sum(k * v for k, v in epoch.items()) / sum(epoch.values())),
            "mean_step_s": mean, "speedup": mean["cap"] / mean["bucketed"], "compile_s_all_widths": compile_s,
            "first_step_loss": losses, "loss_rel_diff": abs(losses["cap"] - losses["bucketed"]) / abs(losses["cap"])}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2_135m.py")
    p.add_argument("--stages", default="sft_av,sft_ar")
    p.add_argument("--batches", type=int, default=6, help="batches timed per stage")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--name", default="default")
    p.add_argument("--out", default=None)
    rest, overrides = configlib.split_config_args(argv)
    args = p.parse_args(rest)
    cfg = configlib.get(args.config, overrides)
    run = run_lib.build(cfg)
    res = {"config": args.config, "overrides": overrides, "store": cfg.data.store, "stages": {}}
    with sharding.use_mesh(run.mesh, run.rules):
        for name in args.stages.split(","):
            res["stages"][name] = r = stage_timing(run, name, args.batches, args.reps)
            print(f"{name}: batch {r['batch']}, cap {r['cap']}, bucket {r['bucket']}; widths of one epoch "
                  f"{r['epoch_widths']} (mean {r['epoch_mean_width']:.1f}); timed {r['widths_timed']}", flush=True)
    print(f"\n{'stage':8s} {'cap s/step':>11s} {'bucketed':>9s} {'speedup':>8s} {'loss rel diff':>14s} "
          f"{'compile s':>10s}")
    for name, r in res["stages"].items():
        print(f"{name:8s} {r['mean_step_s']['cap']:11.3f} {r['mean_step_s']['bucketed']:9.3f} {r['speedup']:7.2f}x "
              f"{r['loss_rel_diff']:14.1e} {r['compile_s_all_widths']:10.0f}")
    write_result(args.out or os.path.join(REPO, "benchmarks", "results", f"sft_width_{args.name}.json"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
