"""Measure the RL levers one at a time from one finished SFT pair, each judged by the fixed judge.

    .venv/bin/python benchmarks/rl_levers.py --sft runs/smollm2_135m_quick/train \\
        --variants "base;fail1=rl.fail_reward=-1.0;lr4x=rl.optim_av.lr=2e-5;arfrozen=rl.optim_ar.lr=0,rl.optim_ar.lr_head=0"

Every variant starts RL from the same SFT pair (its sft_av and sft_ar stages are copied into
ROOT/rl-<name>, so nothing of --sft is written) and runs `train --stages rl,eval` with
`configs/smollm2_135m.py:quick` plus its overrides (`name` alone is a config variant such as beta0
or g8; `name=key=value,key=value` sets config keys; "base" changes nothing). The store is the one
the SFT pair was trained on (its fingerprint names it). A variant whose eval.json is already there
is read, not rerun, so an interrupted sweep resumes.

Reported per variant from its eval stage (held-out rows, 95% CIs over documents, paired by row):
  after RL - floor, read by the live RL AR;
  after RL - after SFT, read by the live AR (the AR recalibrates to its AV) and by the fixed judge
    (the SFT AR, frozen: the verbalizer's own gain);
  the RL AV's KL to the SFT AV per token along its explanations, and its extraction failures.
Levers that change SFT-stage settings (av.max_len is part of the SFT fingerprint) cannot start from
another config's SFT pair; the trainer refuses them with one line, and so does this table.
Prints a table and writes benchmarks/results/levers-rl.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from record import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/smollm2_135m.py:quick"


def parse_variants(spec: str) -> list[tuple[str, str, list[str]]]:
    """"a;b=k=v,k2=v2" -> [(name, config variant or "", ["--config.k=v", ...])]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        name, _, sets = item.partition("=")
        if not sets:
            out.append((name, "" if name == "base" else name, []))
        else:
            out.append((name, "", [f"--config.{kv.strip()}" for kv in sets.split(",") if kv.strip()]))
    return out


def store_of(sft: str) -> str:
    """The store the SFT pair was trained on (the trainer's fingerprint includes it)."""
    meta_dirs = sorted(d for d in os.listdir(os.path.join(sft, "sft_av")) if d.isdigit())
    with open(os.path.join(sft, "sft_av", meta_dirs[-1], "meta", "metadata")) as f:
        meta = json.load(f)
    return meta["meta"]["config"]["data"]["store"]


def run_variant(name: str, variant: str, sets: list[str], sft: str, store: str, root: str, steps: int | None) -> dict:
    work = os.path.join(root, f"rl-{name}")
    ev_path = os.path.join(work, "eval.json")
    if not os.path.exists(ev_path):
        for stage in ("sft_av", "sft_ar"):
            if not os.path.isdir(os.path.join(work, stage)):
                shutil.copytree(os.path.join(sft, stage), os.path.join(work, stage))
        cmd = [sys.executable, "-m", "nla_jax.train", "--config", CONFIG + (f",{variant}" if variant else ""),
               "--stages", "rl,eval", f"--config.train.workdir={work}", f"--config.data.store={store}", *sets]
        if steps:
            cmd.append(f"--config.rl.steps={steps}")
        print(f"[rl_levers] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            return {"variant": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        with open(os.path.join(work, "seconds.txt"), "w") as f:
            f.write(f"{time.time() - t0:.1f}\n")
    with open(ev_path) as f:
        ev = json.load(f)
    secs = os.path.join(work, "seconds.txt")
    rl = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl")) if '"stage": "rl"' in line]
    rl = [r for r in rl if r.get("kind") is None and "fve_nrm" in r]
    return {"variant": name, "config_variant": variant, "overrides": sets, "workdir": work,
            "seconds": float(open(secs).read()) if os.path.exists(secs) else None,
            "rows": ev["rows"], "documents": ev["documents"], "floor": ev["floor"],
            "after_sft": ev["checkpoints"]["after_sft"], "after_rl": ev["checkpoints"]["after_rl"],
            "rl_minus_sft": ev.get("rl_minus_sft"),
            "train_fail_rate_last5": (sum(r.get("extract_fail", 0.0) for r in rl[-5:]) / max(len(rl[-5:]), 1)) if rl else None}


def fmt(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", required=True, help="a trainer work directory with sft_av and sft_ar finished")
    p.add_argument("--variants", default="base")
    p.add_argument("--store", default=None, help="the SFT pair's store, when its saved (relative) path does not "
                   "resolve from this repository")
    p.add_argument("--steps", type=int, default=None, help="rl.steps for every variant (default: the config's)")
    p.add_argument("--root", default=os.path.join(REPO, "runs", "levers"))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "levers-rl.json"))
    args = p.parse_args()
    for stage in ("sft_av", "sft_ar"):
        if not os.path.exists(os.path.join(args.sft, stage, "DONE")):
            print(f"error: --sft {args.sft}: stage {stage} is not finished (no {stage}/DONE)", file=sys.stderr)
            return 2
    store = os.path.abspath(args.store or os.path.join(REPO, store_of(args.sft)))
    if not os.path.isfile(os.path.join(store, "manifest.json")):
        print(f"error: store {store} (the SFT pair's) is not there; pass --store", file=sys.stderr)
        return 2
    res = [run_variant(n, v, s, args.sft, store, args.root, args.steps) for n, v, s in parse_variants(args.variants)]
    head = (f"{'variant':10s} {'fail':>5s} {'KL/tok':>7s} {'after RL - floor (own AR)':>27s} "
            f"{'RL - SFT (own AR)':>27s} {'RL - SFT (fixed judge)':>27s}")
    print("\n" + head)
    for r in res:
        if "error" in r:
            print(f"{r['variant']:10s} error: {r['error']}")
            continue
        c, d = r["after_rl"], r["rl_minus_sft"] or {}
        kl = (c.get("kl_to_ref_per_token") or {}).get("mean")
        print(f"{r['variant']:10s} {c['extract_fail']:>5.2f} {kl if kl is not None else float('nan'):>7.3f} "
              f"{fmt(c['real_minus_floor']):>27s} {fmt(d.get('own')):>27s} {fmt(d.get('judge')):>27s}")
    ok = [r for r in res if "error" not in r]
    if ok:
        print(f"\n{ok[0]['rows']} held-out rows from {ok[0]['documents']} documents; 95% cluster-robust t-intervals "
              f"over documents, paired by row; fail = extraction failures of greedy explanations after RL")
    write_result(args.out, {"sft": os.path.abspath(args.sft), "store": store, "results": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
