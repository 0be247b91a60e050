"""What storing the target's predictions at extraction saves the warm start, side by side in one run.

    .venv/bin/python benchmarks/warm_start_cost.py [--config configs/smollm2_135m.py:quick] [--reps 2]

On the config's own corpus (the quickstart's: build it first, `bash launch/quickstart.sh` or
`python -m nla_jax.data.default_corpus --out runs/quick_corpus --variant quick`), each repetition runs,
interleaved, into fresh stores:
  second pass   extract with data.top_k=0, then summarize (teacher "predict": the target runs once more)
  stored        extract with data.top_k=5 (the blocks after K in the same pass), then summarize (tokenizer only)
and times each program's wall clock (process start and model load included: what a user waits for).
The warm-start texts of the two are compared row by row. Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from record import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(module: str, cfg: str, store: str, *extra: str) -> float:
    env = dict(os.environ, PYTHONPATH=REPO)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", module, "--config", cfg, f"--config.data.store={store}", *extra],
                   check=True, env=env, cwd=os.getcwd(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _texts(store: str) -> dict[int, str]:
    with open(os.path.join(store, "summaries.jsonl")) as f:
        return {r["row"]: r["text"] for r in map(json.loads, filter(str.strip, f))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "smollm2_135m.py") + ":quick")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "warm_start_cost.json"))
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="nla-warm-start-bench-")
    arms = {"second pass": 0, "stored": args.top_k}
    times = {a: {"extract": [], "summarize": []} for a in arms}
    same = None
    try:
        for rep in range(args.reps):
            stores = {}
            for arm, k in arms.items():
                store = os.path.join(tmp, f"{rep}-{k}")
                print(f"[rep {rep}] {arm}: extract (data.top_k={k}), summarize", file=sys.stderr, flush=True)
                times[arm]["extract"].append(_timed("nla_jax.extract", args.config, store, f"--config.data.top_k={k}"))
                times[arm]["summarize"].append(_timed("nla_jax.summarize", args.config, store))
                stores[arm] = store
            a, b = (_texts(stores[arm]) for arm in arms)
            same = {"rows": len(a), "equal_texts": sum(a[r] == b.get(r) for r in a)}
            for s in stores.values():
                shutil.rmtree(s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"benchmark": "warm_start_cost", "config": args.config, "reps": args.reps, "top_k": args.top_k,
           "texts": same, "seconds": times,
           "median": {a: {k: statistics.median(v) for k, v in t.items()} for a, t in times.items()}}
    for a in arms:
        res["median"][a]["total"] = res["median"][a]["extract"] + res["median"][a]["summarize"]
    res["saved_s"] = res["median"]["second pass"]["total"] - res["median"]["stored"]["total"]
    print(f"\n{'':14s} {'extract s':>10s} {'summarize s':>12s} {'total s':>9s}   (median of {args.reps})")
    for a in arms:
        m = res["median"][a]
        print(f"{a:14s} {m['extract']:10.1f} {m['summarize']:12.1f} {m['total']:9.1f}")
    print(f"saved {res['saved_s']:.1f} s; texts equal in {same['equal_texts']} of {same['rows']} rows")
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
