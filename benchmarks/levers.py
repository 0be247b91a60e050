"""Measure the small-scale levers (WORKSPACE.md, "The method in brief") one at a time on the embedded default, with CIs.

    .venv/bin/python benchmarks/levers.py --stage sft_ar --variants base,idhead,rawhead,center --steps 100
    .venv/bin/python benchmarks/levers.py --stage sft_av --variants base,scale80,proj,add --steps 50

Each variant is a `configs/smollm2_135m.py:quick,<variant>` run of one stage in its own work
directory (runs/levers/<stage>-<variant>), sharing the quick store (run the quickstart first).
Reported, from the stage's final held-out evaluation:
  sft_ar  fve_nrm of the AR reading warm-start texts of other documents, 95% CI over documents,
          beside the renormalised-mean floor;
  sft_av  cross-entropy of the warm-start text given the real activation vs a shuffled one, and
          the gap's 95% CI over documents (> 0: the verbalizer uses the activation).
Prints a table and writes benchmarks/results/levers-<stage>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from record import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_variant(stage: str, variant: str, steps: int, root: str, extra: list[str]) -> dict:
    spec = "configs/smollm2_135m.py:quick" + ("" if variant == "base" else "," + variant)
    work = os.path.join(root, f"{stage}-{variant}")
    cmd = [sys.executable, "-m", "nla_jax.train", "--config", spec, "--stages", stage,
           f"--config.train.workdir={work}", f"--config.{stage}.steps={steps}",
           f"--config.{stage}.eval_every={max(steps, 1)}", *extra]
    t0 = time.time()
    print(f"[levers] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    evals = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))
             if '"kind": "eval"' in line and f'"stage": "{stage}"' in line]
    first, last = evals[0], evals[-1]
    return {"variant": variant, "seconds": round(time.time() - t0, 1), "first": first, "final": last}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["sft_av", "sft_ar"], required=True)
    p.add_argument("--variants", default="base")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--root", default=os.path.join(REPO, "runs", "levers"))
    p.add_argument("--out", default=None)
    args, extra = p.parse_known_args()
    res = [run_variant(args.stage, v, args.steps, args.root, extra) for v in args.variants.split(",")]
    if args.stage == "sft_ar":
        print(f"\n{'variant':12s} {'fve_nrm at step 0':>18s} {'fve_nrm final [95% CI]':>30s} {'floor':>8s}")
        for r in res:
            if "error" in r:
                print(f"{r['variant']:12s} error: {r['error']}")
                continue
            f, l = r["first"], r["final"]
            print(f"{r['variant']:12s} {f['fve_nrm']:>18.3f} {l['fve_nrm']:>+10.3f} [{l['fve_lo']:+.3f}, {l['fve_hi']:+.3f}]"
                  f"{'':>5s} {l['floor']:>+8.3f}")
    else:
        print(f"\n{'variant':12s} {'CE real':>9s} {'CE shuffled':>12s} {'gap [95% CI over documents]':>32s}")
        for r in res:
            if "error" in r:
                print(f"{r['variant']:12s} error: {r['error']}")
                continue
            l = r["final"]
            print(f"{r['variant']:12s} {l['ce_real']:>9.3f} {l['ce_shuffled']:>12.3f} "
                  f"{l['ce_gap']:>+12.3f} [{l['ce_gap_lo']:+.3f}, {l['ce_gap_hi']:+.3f}]")
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"levers-{args.stage}.json")
    write_result(out, {"stage": args.stage, "steps": args.steps, "results": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
