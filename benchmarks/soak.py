"""Soak test: a long tiny-config training run, killed -9 from outside every few seconds and restarted.

    .venv/bin/python benchmarks/soak.py [--restarts 20] [--kill-every 6] [--jitter 0.5] [--seed 0]
                                        [--steps 1000,1000,2000] [--ckpt-every 10]

Builds a small activation store (tiny random model, 80 documents, "quote" teacher), runs
`python -m nla_jax.train` (stages sft_av, sft_ar, rl; async checkpoints every --ckpt-every steps)
once uninterrupted as the reference, then runs the same command again and SIGKILLs it after
kill-every x uniform(1 - jitter, 1 + jitter) seconds (seeded), --restarts times, restarting it after
each kill; the last start runs to the end. Kills land anywhere: start-up, compilation, a step, an
async checkpoint write, between stages.

Per restart it reports the stage running at the kill, the last step that life reached, the newest
committed checkpoint, the steps lost (reached - committed: the work redone after the restart) and
whether the next life resumed exactly at committed + 1. At the end the final state of every stage
(parameters, optimizer states, counters) and every metrics record are compared with the reference:
any difference is a divergence. Prints a table; writes JSON to --out
(benchmarks/results/soak.json).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from record import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TINY = os.path.join(REPO, "configs", "tiny.py")
STAGES = ("sft_av", "sft_ar", "rl")
WORDS = ("the a cat dog river mountain city night music paper window quietly ran said because "
         "under over green old new bright small ancient people letter garden").split()


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             NLA_COMPILE_CACHE=os.environ.get("NLA_COMPILE_CACHE", os.path.join(REPO, "build", "jax_cache")))
    for k in ("XLA_FLAGS", "NLA_FAULTS"):
        e.pop(k, None)
    return e


def build_store(tmp: str) -> str:
    rng = random.Random(0)
    corpus = os.path.join(tmp, "c.jsonl")
    with open(corpus, "w") as f:
        for i in range(80):
            f.write(json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))})
                    + "\n")
    store = os.path.join(tmp, "store")
    common = ["--config", TINY, f"--config.data.store={store}"]
    subprocess.run([sys.executable, "-m", "nla_jax.extract", *common,
                    f"--config.data.sources=[{{'kind':'jsonl','path':'{corpus}','name':'t'}}]",
                    "--config.data.max_len=128", "--config.data.min_position=16", "--config.data.k=4",
                    "--config.data.splits=(('av_sft',0.3),('ar_sft',0.3),('rl',0.25),('eval',0.15))"],
                   cwd=REPO, env=env(), check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "nla_jax.summarize", *common, "--config.summarize.teacher=quote"],
                   cwd=REPO, env=env(), check=True, capture_output=True)
    return store


def train_cmd(store: str, wd: str, steps: tuple[int, int, int], ckpt_every: int) -> list[str]:
    evals = max(1, max(steps) // 4)
    return [sys.executable, "-m", "nla_jax.train", "--config", TINY, f"--config.data.store={store}",
            f"--config.train.workdir={wd}", "--stages", ",".join(STAGES),
            f"--config.sft_av.steps={steps[0]}", f"--config.sft_ar.steps={steps[1]}", f"--config.rl.steps={steps[2]}",
            f"--config.sft_av.eval_every={evals}", f"--config.sft_ar.eval_every={evals}",
            f"--config.train.ckpt_every={ckpt_every}", "--config.train.async_checkpoint=True",
            # RL rollouts that differ within groups, so both models really update (tests/test_train.py RL_LIVE)
            "--config.av.closer=8", "--config.rl.temperature=0.5"]


# ----------------------------------------------------------------------------- reading a work directory

def metric_lines(wd: str) -> list[dict]:
    """Lines of metrics.jsonl; a torn last line (a kill mid-write) is left out."""
    try:
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    lines.pop()  # "" after the last newline, or a torn line
    return [json.loads(line) for line in lines]


def committed(wd: str, stage: str) -> int:
    d = os.path.join(wd, stage)
    return max((int(n) for n in os.listdir(d) if n.isdigit()), default=0) if os.path.isdir(d) else 0


def done(wd: str, stage: str) -> bool:
    return os.path.exists(os.path.join(wd, stage, "DONE"))


def train_steps(lines: list[dict], stage: str) -> list[int]:
    return [r["step"] for r in lines if r["stage"] == stage and r.get("kind") is None]


def final_state(wd: str, stage: str, step: int) -> dict:
    import logging

    from nla_jax.checkpoint import read_step_arrays
    logging.getLogger("absl").setLevel(logging.ERROR)  # plain orbax reads of a step's item warn about its layout
    return read_step_arrays(os.path.join(wd, stage, str(step)))


def divergence(ref: str, wd: str, steps: tuple[int, ...]) -> dict:
    import numpy as np
    out = {}
    for stage, n in zip(STAGES, steps):
        a, b = final_state(ref, stage, n), final_state(wd, stage, n)
        diff = [k for k in a if k not in b or a[k].tobytes() != b[k].tobytes()]
        max_abs = max((float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
                       for k in diff if k in b and a[k].shape == b[k].shape), default=0.0)
        out[stage] = {"leaves": len(a), "differing_leaves": len(diff) + len(set(b) - set(a)),
                      "max_abs_diff": max_abs}
    recs = lambda w: {(r["stage"], r["step"], r.get("kind")): json.dumps({k: v for k, v in r.items() if k != "time"},
                                                                           sort_keys=True)
                      for r in metric_lines(w)}
    ra, rb = recs(ref), recs(wd)
    out["metrics"] = {"records": len(ra), "missing": len(set(ra) - set(rb)), "extra": len(set(rb) - set(ra)),
                      "differing": sum(1 for k in ra if k in rb and ra[k] != rb[k])}
    return out


# ----------------------------------------------------------------------------- main

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--restarts", type=int, default=20, help="kill -9 + restart this many times (default 20)")
    p.add_argument("--kill-every", type=float, default=6.0, help="mean seconds between a start and its kill")
    p.add_argument("--jitter", type=float, default=0.5,
                   help="kill after kill-every x uniform(1-jitter, 1+jitter) seconds (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--steps", default="1000,1000,2000",
                   help="steps of sft_av,sft_ar,rl (default 1000,1000,2000: more than 20 restarts of work "
                        "at ~6 s each, spread over all stages)")
    p.add_argument("--ckpt-every", type=int, default=10, help="checkpoint every N steps (default 10)")
    p.add_argument("--life-timeout", type=float, default=1800.0,
                   help="seconds the last (unkilled) start may run before the soak reports a hang")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a fresh temporary one, removed)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "soak.json"))
    args = p.parse_args()
    steps = tuple(int(s) for s in args.steps.split(","))
    if len(steps) != 3 or min(steps) < 1:
        p.error("--steps needs three positive step counts: sft_av,sft_ar,rl")
    if args.restarts < 0 or args.kill_every <= 0 or not 0 <= args.jitter < 1:
        p.error("need --restarts >= 0, --kill-every > 0 and 0 <= --jitter < 1")
    tmp = args.workdir or tempfile.mkdtemp(prefix="nla-soak-")
    os.makedirs(tmp, exist_ok=True)
    try:
        return soak(args, steps, tmp)
    finally:
        if args.workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def soak(args, steps: tuple[int, int, int], tmp: str) -> int:
    print(f"[soak] building the store in {tmp}", file=sys.stderr, flush=True)
    store = build_store(tmp)
    ref, wd = os.path.join(tmp, "reference"), os.path.join(tmp, "soaked")
    print("[soak] uninterrupted reference run", file=sys.stderr, flush=True)
    t0 = time.time()
    r = subprocess.run(train_cmd(store, ref, steps, args.ckpt_every), cwd=REPO, env=env(), capture_output=True,
                       text=True)
    ref_s = time.time() - t0
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    rng = random.Random(args.seed)
    cmd = train_cmd(store, wd, steps, args.ckpt_every)
    rows, lives, failure = [], 0, None
    t_soak = time.time()
    while True:
        lives += 1
        kill = len(rows) < args.restarts
        n_before = len(metric_lines(wd))
        after = rng.uniform(1 - args.jitter, 1 + args.jitter) * args.kill_every if kill else None
        start = time.time()
        log_path = os.path.join(tmp, f"life-{lives}.log")  # a file, not a pipe: nobody reads while it runs
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=log)
        try:
            proc.wait(timeout=after if kill else args.life_timeout)
            ended_itself = True
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            ended_itself = False
            if not kill:
                failure = f"life {lives} (no kill planned) did not end within {args.life_timeout:.0f}s: hung?"
                break
        alive = time.time() - start
        with open(log_path) as f:
            err = f.read()
        lines = metric_lines(wd)
        new = lines[n_before:]
        for prev in rows:  # where did the run resume after earlier kills? (the first life that got that far)
            if "resumed_ok" in prev or prev["stage"] is None:
                continue
            redone = train_steps(lines[prev["lines_at_kill"]:], prev["stage"])
            if redone:
                prev["next_resumed_at"] = redone[0]
                prev["resumed_ok"] = redone[0] == prev["committed"] + 1
            elif done(wd, prev["stage"]):  # nothing redone: the kill came after the stage's last step
                prev["next_resumed_at"] = None
                prev["resumed_ok"] = prev["committed"] == steps[STAGES.index(prev["stage"])]
        if ended_itself:
            if proc.returncode != 0:
                failure = f"life {lives} exited {proc.returncode}: {err.strip().splitlines()[-1:]}"
            break
        stage = next((s for s in STAGES if not done(wd, s)), None)
        mine = train_steps(new, stage) if stage else []
        got = committed(wd, stage) if stage else 0
        reached = max(mine) if mine else None
        rows.append({"restart": len(rows) + 1, "alive_s": round(alive, 2), "stage": stage, "reached": reached,
                     "committed": got, "lost": (reached - got) if reached is not None else 0,
                     "lines_at_kill": len(lines)})
        print(f"[soak] kill {len(rows)}/{args.restarts} after {alive:.1f}s: {stage} reached {reached}, "
              f"committed {got}", file=sys.stderr, flush=True)
    soak_s = time.time() - t_soak
    for r in rows:
        r.pop("lines_at_kill")
    finished = failure is None and all(done(wd, s) for s in STAGES)
    div = divergence(ref, wd, steps) if finished else None
    # survived: the run went on from that kill to the end, resuming right after the committed step
    survived = sum(1 for r in rows if r.get("resumed_ok") is not False) if finished else None
    lost = [r["lost"] for r in rows]
    diverged = None if div is None else (any(v["differing_leaves"] for k, v in div.items() if k in STAGES)
                                         or any(div["metrics"][k] for k in ("missing", "extra", "differing")))
    summary = {"restarts": len(rows), "restarts_survived": survived, "finished": finished, "failure": failure,
               "steps_lost_total": sum(lost), "steps_lost_mean": round(statistics.mean(lost), 2) if lost else 0,
               "steps_lost_max": max(lost, default=0), "kills_before_any_step": sum(r["reached"] is None for r in rows),
               "resumed_at_committed_plus_1": sum(1 for r in rows if r.get("resumed_ok")),
               "diverged": diverged, "divergence": div, "reference_s": round(ref_s, 1), "soak_s": round(soak_s, 1)}
    result = {"config": {"restarts": args.restarts, "kill_every_s": args.kill_every, "jitter": args.jitter,
                         "seed": args.seed, "steps": dict(zip(STAGES, steps)), "ckpt_every": args.ckpt_every,
                         "async_checkpoint": True, "model": "configs/tiny.py"},
              "restarts": rows, "summary": summary}
    write_result(args.out, result)

    print(f"\n{'restart':>7} {'alive s':>8} {'stage':>7} {'reached':>8} {'committed':>9} {'lost':>5} {'next resumed at':>16}")
    for r in rows:
        nxt = r.get("next_resumed_at")
        ok = {True: "ok", False: "WRONG", None: ""}[r.get("resumed_ok")]
        print(f"{r['restart']:>7} {r['alive_s']:>8.1f} {str(r['stage']):>7} {str(r['reached'] if r['reached'] is not None else '-'):>8} "
              f"{r['committed']:>9} {r['lost']:>5} {(str(nxt) if nxt is not None else '-') + ' ' + ok:>16}")
    print()
    if failure:
        print(f"FAILED: {failure}")
    print(f"restarts survived: {survived}/{len(rows)} (finished: {finished}); steps lost per restart: mean "
          f"{summary['steps_lost_mean']}, max {summary['steps_lost_max']}, total {summary['steps_lost_total']} "
          f"(checkpoint every {args.ckpt_every}; {summary['kills_before_any_step']} kills came before the life's "
          f"first step)")
    if div is not None:
        for s in STAGES:
            print(f"  {s}: {div[s]['differing_leaves']} of {div[s]['leaves']} state leaves differ from the reference "
                  f"(max |diff| {div[s]['max_abs_diff']:.3g})")
        m = div["metrics"]
        print(f"  metrics: {m['records']} records, {m['missing']} missing, {m['extra']} extra, {m['differing']} differing")
        print(f"divergence against the uninterrupted run: {'YES' if diverged else 'none'}")
    print(f"wall: reference {ref_s:.0f}s, soaked run {soak_s:.0f}s; JSON: {args.out}")
    return 0 if finished and not diverged and survived == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
