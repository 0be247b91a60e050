"""Extraction throughput next to the plain jitted forward on the same batches (one run).

    .venv/bin/python benchmarks/extract_speed.py [--docs 96] [--max-len 256]

Runs `python -m nla_jax.extract` on a synthetic corpus of --docs documents (real SmolLM2,
block 20, k=8), timing its loop after the first (compiling) batch, then times the bare
forward (capture at block K, no logits) over exactly the same padded batches in-process.
Goal: extraction >= 0.9x the bare forward (store writes overlap compute). Extraction runs with
data.top_k=0 here (activations only, as the bare forward); what storing the target's predictions
costs and saves is benchmarks/warm_start_cost.py.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from record import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
WORDS = ("the a of river city music because said night window garden letter people quietly ancient "
         "bright small green walked wrote under over between after before").split()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=96)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "extract_speed.json"))
    args = p.parse_args()
    from nla_jax import hostmem
    hostmem.tune_malloc()  # as the extract CLI it runs does (NLA_HOST_MALLOC=system to compare)
    tmp = tempfile.mkdtemp(prefix="nla-extract-bench-")
    rng = random.Random(0)
    corpus = os.path.join(tmp, "c.jsonl")
    with open(corpus, "w") as f:
        for i in range(args.docs):
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(120, 260)))}) + "\n")
    overrides = [f"--config.data.store={tmp}/store", f"--config.data.max_len={args.max_len}",
                 f"--config.data.sources=[{{'kind':'jsonl','path':'{corpus}','name':'b'}}]",
                 f"--config.data.batch={args.batch}", "--config.data.top_k=0"]
    timing_file = os.path.join(tmp, "timing.json")
    env = dict(os.environ, PYTHONPATH=REPO)
    print("[extract] running nla_jax.extract", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "nla_jax.extract", "--config", os.path.join(REPO, "configs", "smollm2_135m.py"),
                    *overrides, "--timing-out", timing_file], check=True, env=env, cwd=REPO,
                   stderr=subprocess.DEVNULL)
    ext = json.load(open(timing_file))

    import jax
    import jax.numpy as jnp

    from nla_jax import configlib
    from nla_jax import weights
    from nla_jax.data import corpus as corpus_lib, plan as plan_lib
    from nla_jax.models import transformer as T
    cfg = configlib.get(os.path.join(REPO, "configs", "smollm2_135m.py"), [o[len("--config."):] for o in overrides])
    mcfg, params, tok = weights.load_from_config(cfg.model)
    docs, stats = corpus_lib.load_corpus([dict(s) for s in cfg.data.sources])
    plan = plan_lib.plan_documents(docs, tok, seed=cfg.data.seed, k=cfg.data.k, min_position=cfg.data.min_position,
                                   max_len=cfg.data.max_len, splits=list(cfg.data.splits), stats=stats)
    K = cfg.model.layer
    fwd = jax.jit(lambda p, t, v, pos: jnp.take_along_axis(
        T.forward(p, t, mcfg, valid=v, capture_layer=K, logits=False)["hidden"], pos[..., None], axis=1))
    batches = [plan_lib.pad_batch(c, args.batch, cfg.data.seq_multiple, cfg.data.k)
               for c in (plan_lib.step_docs(plan, i, args.batch)
                         for i in range(plan_lib.num_steps(len(plan), args.batch)))]
    jax.block_until_ready(fwd(params, *[jnp.asarray(x) for x in batches[0][:3]]))
    print("[forward] bare jitted forward on the same batches", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    for toks, valid, pos, _ in batches[1:]:
        jax.block_until_ready(fwd(params, jnp.asarray(toks), jnp.asarray(valid), jnp.asarray(pos)))
    fwd_s = time.perf_counter() - t0
    rows = sum(int(b[3].sum()) for b in batches[1:])
    tokens = sum(int(b[1].sum()) for b in batches[1:])
    res = {"benchmark": "extract_speed", "docs": args.docs, "max_len": args.max_len, "batch": args.batch,
           "extract": {**ext, "rows_s": ext["rows"] / ext["seconds"], "tokens_s": ext["tokens"] / ext["seconds"]},
           "forward": {"rows": rows, "tokens": tokens, "seconds": fwd_s, "rows_s": rows / fwd_s,
                       "tokens_s": tokens / fwd_s}}
    res["ratio"] = res["extract"]["rows_s"] / res["forward"]["rows_s"]
    print(f"\n{'':22s} {'rows/s':>9s} {'tokens/s':>10s}")
    print(f"{'nla_jax.extract':22s} {res['extract']['rows_s']:9.1f} {res['extract']['tokens_s']:10.1f}")
    print(f"{'bare jitted forward':22s} {res['forward']['rows_s']:9.1f} {res['forward']['tokens_s']:10.1f}")
    print(f"ratio {res['ratio']:.2f} (goal >= 0.9)  {'ok' if res['ratio'] >= 0.9 else 'MISSED'}")
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
