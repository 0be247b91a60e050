"""The GRPO step with its update only as wide as the rollouts (train.text_bucket: a rollout, then an
update per width, what the trainer does) against the one-function step at the explanation cap, on
the real embedded target with a real store's activations, interleaved in one process (the machine
is shared and noisy: read the ratio).

    .venv/bin/python benchmarks/rl_width.py                    # the default config, its SFT AV
    .venv/bin/python benchmarks/rl_width.py --config configs/smollm2_135m.py:quick --name quick

The AV is the work directory's final sft_av checkpoint (--workdir, default the config's
train.workdir): an SFT'd verbalizer ends its explanations where its warm start taught it to, which
is what decides the widths (a target-initialised one rambles to the cap, and there is nothing to
trim). The AR is sft_ar's final one where it exists, else the target-initialised AR (its values do
not change the work). Per batch of the rl split in the trainer's order: the fused step (compiled
first) and the split step (rollout + the update at each width it needs, compiled on first use),
--reps rounds, each from the state the previous step left. Also: the rollout alone (the sampler's
share of a step), and the metrics of one step from the same state and key both ways (the same
maths: tests/test_rl_width.py). Prints a table and writes benchmarks/results/rl_width_NAME.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nla_jax import configlib, sharding  # noqa: E402
from nla_jax.nla import batches as batches_lib  # noqa: E402
from nla_jax.nla import run as run_lib  # noqa: E402
from nla_jax.nla import state as state_lib  # noqa: E402
from nla_jax.nla import workdir as workdir_lib  # noqa: E402
from record import write_result  # noqa: E402

COMPARED = ("av_loss", "ar_loss", "reward_mean", "kl", "entropy", "grad_norm_av", "grad_norm_ar", "sampled_len")


def start_state(run, layout) -> tuple[dict, dict, dict]:
    """(state, ref, where): the RL state from the finished SFT stages where they exist."""
    state = state_lib.fresh(run, layout)
    where = {"av": "target", "ar": "target"}
    for stage, part in (("sft_av", "av"), ("sft_ar", "ar")):
        if workdir_lib.finished(run.workdir, stage):
            state = {**state, part: workdir_lib.load_final(run, stage, part)}
            where[part] = workdir_lib.stage_dir(run.workdir, stage)
    if where["av"] == "target":
        print(f"warning: no finished sft_av in {run.workdir}: a target-initialised AV samples to the cap",
              file=sys.stderr)
    ref = state_lib.frozen_reference(run, jax.tree.map(jnp.copy, state["av"]))
    return state, ref, where


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2_135m.py")
    p.add_argument("--workdir", default=None, help="where the SFT checkpoints are (default: train.workdir)")
    p.add_argument("--batches", type=int, default=3, help="rl batches timed per round")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--name", default="default")
    p.add_argument("--out", default=None)
    rest, overrides = configlib.split_config_args(argv)
    args = p.parse_args(rest)
    cfg = configlib.get(args.config, overrides)
    if args.workdir:
        with cfg.unlocked():
            cfg.train.workdir = args.workdir
    if int(cfg.train.text_bucket) <= 0:
        raise SystemExit("error: train.text_bucket is 0 in this config: nothing to compare")
    run = run_lib.build(cfg)
    with sharding.use_mesh(run.mesh, run.rules):
        layout = state_lib.rl(run)
        state, ref, where = start_state(run, layout)
        ref_sh = jax.tree.map(lambda a: a.sharding, ref)
        fused = state_lib.rl_step(run, layout, ref_sh)
        split = state_lib.rl_step_by_width(run, layout, ref_sh)
        rollout = state_lib.rl_rollout(run, layout)
        batches = [b for _, (_, b) in zip(range(args.batches), batches_lib.stage_batches(run, "rl", cfg.rl.batch, 0, None))]
        key = lambda i: jax.random.fold_in(jax.random.key(cfg.rl.seed), i)

        # one step from the same state and key both ways: the same metrics (compiles both)
        t0 = time.perf_counter()
        s1, m_fused = fused(jax.tree.map(jnp.copy, state), ref, batches[0], run.mean, key(0))
        m_fused = jax.device_get(m_fused)
        fused_compile_s = time.perf_counter() - t0
        del s1
        t0 = time.perf_counter()
        state, m_split = split(state, ref, batches[0], run.mean, key(0))
        m_split = jax.device_get(m_split)
        split_compile_s = time.perf_counter() - t0
        same = {k: {"fused": float(m_fused[k]), "split": float(m_split[k])} for k in COMPARED}

        jax.block_until_ready(rollout(state, batches[0], run.mean, key(0)))      # compile the timed rollout
        times = {"fused": [], "split": [], "rollout": []}
        widths = []
        for rep in range(args.reps):
            for i, batch in enumerate(batches):
                k = key(1 + rep * len(batches) + i)
                t = time.perf_counter()
                jax.block_until_ready(rollout(state, batch, run.mean, k))
                times["rollout"].append(time.perf_counter() - t)
                for label, fn in (("fused", fused), ("split", split)):
                    t = time.perf_counter()
                    state, m = jax.block_until_ready(fn(state, ref, batch, run.mean, k))
                    m = jax.device_get(m)
                    times[label].append(time.perf_counter() - t)
                    if label == "split":
                        widths.append(int(m["text_width"]))
    mean = {k: float(np.mean(v)) for k, v in times.items()}
    res = {"config": args.config, "overrides": overrides, "store": cfg.data.store, "init": where,
           "rollouts_per_step": int(cfg.rl.batch * cfg.rl.group_size), "cap": int(cfg.av.max_len),
           "bucket": int(cfg.train.text_bucket), "batches": args.batches, "reps": args.reps,
           "widths_timed": widths, "mean_step_s": mean, "speedup": mean["fused"] / mean["split"],
           "rollout_share_of_fused": mean["rollout"] / mean["fused"],
           "first_step_compile_s": {"fused": fused_compile_s, "split": split_compile_s},
           "first_step_metrics": same}
    print(f"init {where}; {res['rollouts_per_step']} rollouts per step, cap {res['cap']}, bucket {res['bucket']}; "
          f"update widths timed {widths}")
    print(f"\n{'step':10s} {'s/step':>8s}")
    for k in ("fused", "split", "rollout"):
        print(f"{k:10s} {mean[k]:8.2f}")
    print(f"speedup split vs fused {res['speedup']:.2f}x; the rollout alone is {res['rollout_share_of_fused']:.0%} "
          f"of the fused step")
    print("first step, same state and key:", ", ".join(f"{k} {v['fused']:.5g}/{v['split']:.5g}" for k, v in same.items()))
    write_result(args.out or os.path.join(REPO, "benchmarks", "results", f"rl_width_{args.name}.json"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
