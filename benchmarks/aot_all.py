"""Ahead-of-time compile check of every real-scale config: `python -m nla_jax.aot` on each one.

    .venv/bin/python benchmarks/aot_all.py                    # prints one table, writes JSON
    .venv/bin/python benchmarks/aot_all.py --steps rl --out /tmp/aot.json

A real-scale config is a configs/*.py whose get_config() has an `aot` section; each one runs with
its default variant plus every variant that names another machine (another mesh or `aot` section).
Each run is a fresh process with the config's number of fake CPU devices (see nla_jax/aot.py for
what is compiled and what the memory numbers mean). Exits non-zero if any step of any config does
not fit its accelerator. Wall time: a few minutes on 2 cores (the 70B GRPO step compiles in ~30-45 s).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _module(path: str):
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def targets() -> list[str]:
    """Config specs (path[:variant]) to compile: defaults plus variants that change the machine."""
    out = []
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if not name.endswith(".py"):
            continue
        path = os.path.join("configs", name)
        mod = _module(os.path.join(REPO, path))
        if not hasattr(mod, "get_config"):   # configs/common.py and the package marker are not configs
            continue
        base = mod.get_config(None)
        if "aot" not in base:
            continue
        out.append(path)
        machine = lambda c: (tuple(c.mesh.shape), json.dumps(c.aot.to_dict(), sort_keys=True))
        for v in getattr(mod, "VARIANTS", ()):
            if machine(mod.get_config(v)) != machine(base):
                out.append(f"{path}:{v}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="sft_av,sft_ar,rl")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "aot.json"))
    p.add_argument("--only", default=None, help="comma-separated config specs instead of all")
    args = p.parse_args()
    specs = args.only.split(",") if args.only else targets()
    results, failed = [], []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(specs):
            js = os.path.join(tmp, f"{i}.json")
            print(f"[{i + 1}/{len(specs)}] {spec}", file=sys.stderr, flush=True)
            r = subprocess.run([sys.executable, "-m", "nla_jax.aot", "--config", spec, "--steps", args.steps,
                                "--json", js], cwd=REPO, env=env, capture_output=True, text=True)
            if not os.path.exists(js):
                print(r.stdout + r.stderr, file=sys.stderr)
                failed.append(spec)
                continue
            with open(js) as f:
                rep = json.load(f)
            rep["config"] = spec
            results.append(rep)
            if r.returncode:
                failed.append(spec)
    head = (f"{'config':<30}{'devices':>8}  {'accelerator':<13}{'mesh d,f,t':>11}  {'step':<7}{'compile s':>10}"
            f"{'args GB':>9}{'temp GB':>9}{'total GB':>10}{'budget GB':>11}  fits")
    print(head)
    print("-" * len(head))
    for rep in results:
        t, m = rep["target"], rep["mesh"]
        mesh = f"{m['data']},{m['fsdp']},{m['tensor']}"
        for r in rep["steps"]:
            print(f"{rep['config'].removeprefix('configs/'):<30}{t['devices']:>8}  {t['accelerator']:<13}{mesh:>11}  "
                  f"{r['step']:<7}{r['compile_s']:>10.1f}{r['argument_gb']:>9.2f}{r['temp_gb']:>9.2f}"
                  f"{r['total_gb']:>10.2f}{rep['budget_gb']:>11.2f}  {'yes' if r['fits'] else 'NO'}")
    if results:
        print(f"note: {results[0]['note']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                   "configs": results, "failed": failed}, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    if failed:
        print(f"error: did not compile or fit: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
