"""Ahead-of-time compile check of every real-scale config: `python -m nla_jax.aot` on each one.

    .venv/bin/python benchmarks/aot_all.py                    # prints one table, writes JSON
    .venv/bin/python benchmarks/aot_all.py --steps rl --out /tmp/aot.json

A real-scale config is a configs/*.py whose get_config() has an `aot` section; each one runs with
its default variant plus every variant that names another machine (another mesh or `aot` section).
Each run is a fresh process: GPU targets on the config's number of fake CPU devices (XLA:CPU's
estimate), TPU variants (aot.topology) with the real TPU compiler in .venv-tpu (`bash launch/setup.sh
tpu-compile`; skipped and listed when it is absent), timed by its cost model unless --no-time (see
nla_jax/aot.py for what is compiled and what the numbers mean). Exits non-zero if any step of any
config does not fit its accelerator. Wall time on 2 cores: a few minutes for the GPU targets; the TPU
targets' loop-corrected times compile each step 2-4 more times (tens of minutes in all).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from record import write_result

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


TPU_PYTHON = os.path.join(REPO, ".venv-tpu", "bin", "python")


def is_tpu(spec: str) -> bool:
    """Whether a config spec targets a TPU slice (aot.topology): those compile with XLA:TPU."""
    path, _, variant = spec.partition(":")
    return bool(_module(os.path.join(REPO, path)).get_config(variant or None).aot.get("topology"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="sft_av,sft_ar,rl")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "aot.json"))
    p.add_argument("--only", default=None, help="comma-separated config specs instead of all")
    p.add_argument("--no-time", action="store_true", help="TPU targets: memory only (no loop-corrected time, MFU)")
    args = p.parse_args()
    specs = args.only.split(",") if args.only else targets()
    results, failed = [], []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(specs):
            js = os.path.join(tmp, f"{i}.json")
            py = sys.executable
            if is_tpu(spec):        # compiled by XLA:TPU: libtpu lives in .venv-tpu
                py = TPU_PYTHON if os.path.exists(TPU_PYTHON) else None
                if py is None:
                    print(f"[{i + 1}/{len(specs)}] {spec}: skipped (no {TPU_PYTHON}; bash launch/setup.sh tpu-compile)",
                          file=sys.stderr, flush=True)
                    skipped.append(spec)
                    continue
            print(f"[{i + 1}/{len(specs)}] {spec}", file=sys.stderr, flush=True)
            r = subprocess.run([py, "-m", "nla_jax.aot", "--config", spec, "--steps", args.steps,
                                "--json", js, *(["--no-time"] if args.no_time else [])],
                               cwd=REPO, env=env, capture_output=True, text=True)
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
            f"{'args GB':>9}{'temp GB':>9}{'total GB':>10}{'budget GB':>11}{'est s':>8}{'est MFU':>9}  fits  compiler")
    print(head)
    print("-" * len(head))
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for rep in results:
        t, m = rep["target"], rep["mesh"]
        mesh = f"{m['data']},{m['fsdp']},{m['tensor']}"
        for r in rep["steps"]:
            print(f"{rep['config'].removeprefix('configs/'):<30}{t['devices']:>8}  {t['accelerator']:<13}{mesh:>11}  "
                  f"{r['step']:<7}{r['compile_s']:>10.1f}{r['argument_gb']:>9.2f}{r['temp_gb']:>9.2f}"
                  f"{r['total_gb']:>10.2f}{rep['budget_gb']:>11.2f}{fmt(r.get('est_seconds'), '.3f'):>8}"
                  f"{fmt(r.get('est_mfu'), '.1%'):>9}  {'yes' if r['fits'] else 'NO ':<4}  "
                  f"{'XLA:TPU' if t.get('topology') else 'XLA:CPU (estimate)'}")
    for note in dict.fromkeys(rep["note"] for rep in results):
        print(f"note: {note}")
    write_result(args.out, {"configs": results, "failed": failed, "skipped": skipped}, quiet=True)
    print(f"wrote {args.out}", file=sys.stderr)
    if failed:
        print(f"error: did not compile or fit: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
