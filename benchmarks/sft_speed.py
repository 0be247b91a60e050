"""The SFT verbalizer's forward + backward with the prompt's pre-marker tokens run once per batch
(`av.teacher_logits(share_prefix=True)`, what the trainer does) against every row running the whole
prompt, on the real embedded target, interleaved in one process (the machine is shared and noisy:
read the ratio).

    .venv/bin/python benchmarks/sft_speed.py                         # the quick shapes: batch 8, cap 44
    .venv/bin/python benchmarks/sft_speed.py --batch 16 --cap 64     # the default config's

Per variant: one jitted value_and_grad of the token-mean cross-entropy (the SFT loss, remat as the
config says) on random activations and target ids, compiled once, then --reps timed calls per
variant, alternating. Also reports the largest log-prob difference between the two (same maths,
another summation order). Prints a table and writes benchmarks/results/sft_speed.json.
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
from nla_jax import weights as weights_lib  # noqa: E402
from nla_jax.nla import av as av_lib  # noqa: E402
from nla_jax.nla import run as run_lib  # noqa: E402
from record import write_result  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2_135m.py:quick")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cap", type=int, default=44, help="explanation cap (target tokens per row)")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "sft_speed.json"))
    args = p.parse_args(argv)
    cfg = configlib.get(args.config, [f"av.max_len={args.cap}"])
    mesh = sharding.mesh_from_config(cfg.mesh)
    mcfg, params, tok = weights_lib.load_from_config(cfg.model, mesh, cfg.rules)
    spec = av_lib.build_spec(tok, mcfg, cfg.av, mean_norm=1.0)
    remat = run_lib.remat_policy(cfg)
    rng = np.random.default_rng(0)
    acts = jnp.asarray(rng.normal(size=(args.batch, mcfg.d_model)), jnp.float32)          # [b, d]
    targets = jnp.asarray(rng.integers(3, mcfg.vocab_size, (args.batch, args.cap)), jnp.int32)  # [b, L]

    def make(share: bool):
        def loss(prm):
            lp = av_lib.logprobs(prm, {}, mcfg, spec, acts, targets, remat=remat, share_prefix=share)
            return -lp.mean(), lp
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    fns = {"prefix once per batch": make(True), "whole prompt per row": make(False)}
    outs, times = {}, {k: [] for k in fns}
    for name, fn in fns.items():                                  # compile + first call
        (_, lp), _ = jax.block_until_ready(fn(params))
        outs[name] = np.asarray(lp)
    for _ in range(args.reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(params))
            times[name].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med["whole prompt per row"]
    res = {"config": args.config, "batch": args.batch, "cap": args.cap, "prompt_tokens": len(spec.prompt),
           "prefix_tokens": int(spec.marker_pos), "remat": remat, "reps": args.reps,
           "median_s": med, "speedup": base / med["prefix once per batch"],
           "max_abs_logprob_diff": float(np.abs(outs["prefix once per batch"] - outs["whole prompt per row"]).max()),
           "command": f".venv/bin/python benchmarks/sft_speed.py --batch {args.batch} --cap {args.cap}"}
    print(f"SFT AV forward+backward, batch {args.batch} x (prompt {res['prompt_tokens']} + cap {args.cap}), "
          f"{res['prefix_tokens']} prompt tokens before the marker, remat {remat}, {args.reps} reps interleaved")
    print(f"  {'':24s} {'median s':>9s} {'vs per row':>10s}")
    for k, v in med.items():
        print(f"  {k:24s} {v:9.3f} {base / v:9.2f}x")
    print(f"  largest log-prob difference {res['max_abs_logprob_diff']:.2e}")
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
