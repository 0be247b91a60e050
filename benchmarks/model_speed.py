"""Target-model speed, side by side with transformers on the same weights and shapes.

    .venv/bin/python benchmarks/model_speed.py                  # prints a table, writes JSON
    .venv/bin/python benchmarks/model_speed.py --skip-peer      # nla_jax only

Measures (float32, SmolLM2-135M-Instruct from the embedded GGUF):
  forward tok/s at batch x seq, as a fraction of this machine's float32 matmul ceiling
  (XLA 4096^3 matmul, measured in the same run); forward+backward tok/s (jax.grad of the
  next-token cross-entropy vs transformers' loss.backward()), and the same with plain autodiff
  (no hand-written matmul gradient) for reference; sampler new tok/s at each generation batch
  with exactly --new-tokens new tokens (no EOS stop) vs `generate`, and the decode step time
  next to its lower bound (all matmul weights read once at the measured memory bandwidth).
  The same in bfloat16 (16-bit weights, float32 accumulation), beside transformers' bfloat16, on
  CPUs with bf16 instructions (--bf16 auto; elsewhere both sides would only emulate it, and the
  peer's part then runs benchmarks/peer_float32.py). Every peer subcommand is time-boxed
  (--peer-timeout): one that runs past it is stopped and its rows are reported missing.
  Our side runs with the CLIs' host-malloc set-up (nla_jax/hostmem.py) unless --host-malloc system;
  the peer as installed unless --peer-malloc reuse.
Matmul-only programs: the forward, forward+backward and one decode step reduced to their weight
matmuls (same shapes and weights, layers unrolled; no attention, norms or sampling), as the ratio
to the peer they would give. An estimate of how far XLA:CPU's GEMMs could carry each, not a strict
bound: the unrolled f32 forward has measured *slower* than the real scanned one.
--rounds N alternates peer and ours N times and keeps each metric's best (the machine is shared:
interference only ever slows a run down).
The peer runs through ../shared/peers/hf_peer.py in its own venv (NLA_PEERS_PYTHON, or
build/peers-venv, or ~/.cache/nla-peers-venv). Compare ratios from one run: the machine is
shared and absolute times drift.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from record import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PEER_SCRIPT = os.path.join(REPO, "..", "shared", "peers", "hf_peer.py")
# The peer's prompt set, so both sides generate from identical chat prompts.
PROMPTS = [
    "What is the capital of France?", "Write a haiku about the ocean.", "Name three primary colors.",
    "Explain gravity to a child.", "Give me a synonym for happy.", "What is 2+2?",
    "List some fruits that are red.", "Describe a cat in one sentence.",
]


def find_peer_python() -> str | None:
    for cand in (os.environ.get("NLA_PEERS_PYTHON"), os.path.join(REPO, "build", "peers-venv", "bin", "python"),
                 os.path.expanduser("~/.cache/nla-peers-venv/bin/python")):
        if cand and os.path.isfile(cand):
            return cand
    return None


def timeit(fn, warmup: int = 1, runs: int = 5) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_peer_rss(py: str, script: str, cmd: list[str], timeout: float | None = None,
                 env: dict | None = None) -> tuple[dict | None, float]:
    """Run one peer subcommand under a time box: (its JSON, or None if it failed or ran past `timeout`
    seconds, said on stderr; its own peak RSS in GB). The one runner both speed benchmarks use."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    print(f"[peer] {os.path.basename(script)} {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen([py, script, *cmd, "--out", out], stdout=subprocess.DEVNULL, env=env)
    t0 = time.monotonic()
    while True:  # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix two peers)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if timeout is not None and time.monotonic() - t0 > timeout:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            print(f"[peer] {' '.join(cmd)}: stopped after the time box of {timeout:g} s; its rows are missing",
                  file=sys.stderr, flush=True)
            return None, usage.ru_maxrss / 2 ** 20
        time.sleep(0.5)
    code = os.waitstatus_to_exitcode(status)
    if code:
        print(f"[peer] {' '.join(cmd)} exited {code}; its rows are missing", file=sys.stderr, flush=True)
        return None, usage.ru_maxrss / 2 ** 20
    with open(out) as f:
        return json.load(f), usage.ru_maxrss / 2 ** 20


def run_peer(py: str, cmd: list[str], malloc: str = "system", timeout: float | None = None,
             script: str = PEER_SCRIPT) -> dict | None:
    """One peer subcommand's JSON (run_peer_rss); malloc="reuse" gives it nla_jax.hostmem's allocator settings."""
    env = dict(os.environ)
    if malloc == "reuse":  # nla_jax.hostmem's settings, spelled for a process we start
        from nla_jax import hostmem
        env["GLIBC_TUNABLES"] = hostmem.glibc_tunables()
    return run_peer_rss(py, script, cmd, timeout, env)[0]


def native_bf16() -> tuple[bool, str]:
    """Whether this CPU has bfloat16 instructions (x86 avx512_bf16 / amx_bf16, aarch64 bf16), and the
    flag that says so. Without them both sides emulate bf16 through float32 and time nothing useful
    (the peer's bf16 4096^3 matmul alone ran > 13 minutes on an AMD Zen 3 host)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.lower().startswith(("flags", "features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        return False, "no /proc/cpuinfo"
    found = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return bool(found), (", ".join(found) if found else "no avx512_bf16 / amx_bf16 / bf16 flag in /proc/cpuinfo")


def measure_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nla_jax import sampling
    from nla_jax import weights
    from nla_jax.models import transformer as T
    from nla_jax.models.logprobs import next_token_loss

    res: dict = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count()}
    cfg, params, tok = weights.load("embedded")
    B, S = args.batch, args.seq
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, size=(B, S)), jnp.int32)

    n = 4096
    a = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    print("[ours] matmul ceiling", file=sys.stderr, flush=True)
    res["matmul_float32_gflops"] = 2 * n ** 3 / timeit(lambda: mm(a).block_until_ready()) / 1e9

    def speed(params, split, tag: str, plain: bool):  # split: the same params, `sampling.split_layers`-ed
        fwd = jax.jit(lambda p, t: T.forward(p, t, cfg)["logits"])
        print(f"[ours] forward {tag}", file=sys.stderr, flush=True)
        res[f"forward_{tag}_tok_s"] = B * S / timeit(lambda: fwd(params, tokens).block_until_ready())

        def loss(p, t):
            return next_token_loss(T.forward(p, t, cfg)["logits"], t)

        grad = jax.jit(jax.value_and_grad(loss))
        print(f"[ours] forward+backward {tag}", file=sys.stderr, flush=True)
        res[f"train_{tag}_tok_s"] = B * S / timeit(lambda: jax.block_until_ready(grad(params, tokens)), 1, 3)
        if plain:  # for reference: autodiff through every matmul and log_softmax + take
            def plain_loss(p, t):
                logits = T.forward(p, t, cfg)["logits"][:, :-1]
                logp = jax.nn.log_softmax(logits, axis=-1)
                return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], axis=-1))

            T.CPU_HANDWRITTEN_MATMUL_GRAD = False
            try:
                g = jax.jit(jax.value_and_grad(plain_loss))
                print("[ours] forward+backward, plain autodiff baseline", file=sys.stderr, flush=True)
                res[f"train_plain_autodiff_{tag}_tok_s"] = B * S / timeit(
                    lambda: jax.block_until_ready(g(params, tokens)), 1, 3)
            finally:
                T.CPU_HANDWRITTEN_MATMUL_GRAD = True
        sc = sampling.SampleConfig(max_new_tokens=args.new_tokens, greedy=True, stop_at_eos=False)
        for gb in args.gen_batches:
            prompts = (PROMPTS * (gb // len(PROMPTS) + 1))[:gb]
            toks, valid = sampling.pad_prompts([tok.encode_chat(p) for p in prompts], cfg.pad_id)
            toks, valid = jnp.asarray(toks), jnp.asarray(valid)
            key = jax.random.key(0)
            print(f"[ours] sampler {tag} batch {gb}", file=sys.stderr, flush=True)
            t = timeit(lambda: jax.block_until_ready(sampling.sample(split, toks, valid, key, cfg=cfg, sc=sc)), 1, 3)
            res[f"generate_{tag}_batch{gb}_new_tok_s"] = gb * args.new_tokens / t
            res[f"decode_step_{tag}_batch{gb}_ms"] = t / args.new_tokens * 1e3

    split32 = sampling.split_layers(params)
    speed(params, split32, "float32", plain=True)
    t = res["forward_float32_tok_s"]
    flops = cfg.matmul_flops_per_token() + cfg.attention_flops_per_token(S // 2)
    res["forward_gflops"] = flops * t / 1e9
    res["forward_fraction_of_ceiling"] = res["forward_gflops"] / res["matmul_float32_gflops"]

    # Decode is bound by streaming the weights: one read of every matmul weight per step.
    big = jnp.ones((64 * 1024 * 1024 // 4,), jnp.float32)  # 64 MiB
    rd = jax.jit(lambda x: jnp.sum(x))
    res["memory_read_gb_s"] = big.nbytes / timeit(lambda: rd(big).block_until_ready(), 2, 7) / 1e9
    weight_bytes = (cfg.matmul_flops_per_token() // 2) * 4
    res["decode_step_lower_bound_ms"] = weight_bytes / (res["memory_read_gb_s"] * 1e9) * 1e3

    # Matmul-only programs: every weight matmul of the forward / one decode step, nothing else. The
    # layers come split (separate arrays, as the sampler holds them) so no weight is sliced or copied.
    def matmuls_only(p, x):  # x: [m, d] -> logits [m, V]
        D = cfg.d_model
        for lp in p["layers"]:
            q = T.matmul(x, lp["wq"].reshape(D, -1))
            k = T.matmul(x, lp["wk"].reshape(D, -1))
            v = T.matmul(x, lp["wv"].reshape(D, -1))
            o = T.matmul(q, lp["wo"].reshape(-1, D))
            f = T.matmul(x, lp["w_gate"]) * T.matmul(x, lp["w_up"])
            x = x + o + T.matmul(f, lp["w_down"]) + (k.sum() + v.sum()).astype(x.dtype)
        w = p["embed"] if cfg.tie_embeddings else p["lm_head"]
        return T.matmul(x, w, w_out_first=cfg.tie_embeddings, out_dtype=jnp.float32)

    mm_only = jax.jit(matmuls_only)

    def matmul_only_programs(pp, tag, dt):
        print(f"[ours] matmul-only programs {tag}", file=sys.stderr, flush=True)
        x = jnp.asarray(np.random.default_rng(2).standard_normal((B * S, cfg.d_model)) * 0.02, dt)
        res[f"forward_matmuls_only_{tag}_tok_s"] = B * S / timeit(lambda: mm_only(pp, x).block_until_ready())
        if tag == "float32":  # forward+backward: the same matmuls and their two gradient matmuls each
            # a dense cotangent (a constant one lets XLA turn the logits' gradient dots into reductions)
            r = jnp.asarray(np.random.default_rng(4).standard_normal((B * S, cfg.vocab_size)), jnp.float32)
            g = jax.jit(jax.grad(lambda p, x, r: jnp.sum(matmuls_only(p, x) * r)))
            res[f"train_matmuls_only_{tag}_tok_s"] = B * S / timeit(lambda: jax.block_until_ready(g(pp, x, r)), 1, 3)
            del r
        for gb in args.gen_batches:
            xg = jnp.asarray(np.random.default_rng(3).standard_normal((gb, cfg.d_model)) * 0.02, dt)
            step = timeit(lambda: mm_only(pp, xg).block_until_ready(), 2, 9)
            res[f"decode_step_matmuls_only_{tag}_batch{gb}_ms"] = step * 1e3
            res[f"generate_matmuls_only_{tag}_batch{gb}_new_tok_s"] = gb / step

    matmul_only_programs(split32, "float32", jnp.float32)
    if "bfloat16" in args.dtypes:
        params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        split16 = sampling.split_layers(params16)
        matmul_only_programs(split16, "bfloat16", jnp.bfloat16)
        speed(params16, split16, "bfloat16", plain=False)
    return res


def best_of(runs: list[dict]) -> dict:
    """Per key, the best of several runs: max for rates, min for times (`_ms`); others from the last."""
    out = dict(runs[-1])
    for k in out:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        if len(vals) == len(runs) and vals:
            out[k] = min(vals) if k.endswith("_ms") else max(vals)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "model_speed.json"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gen-batches", default="8,32")
    p.add_argument("--rounds", type=int, default=1, help="alternate peer and ours this many times; keep the best")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--host-malloc", choices=("reuse", "system"), default="reuse",
                   help="nla_jax's malloc set-up (nla_jax/hostmem.py; the CLIs use 'reuse')")
    p.add_argument("--peer-malloc", choices=("reuse", "system"), default="system",
                   help="the peer's: 'system' is transformers as installed; 'reuse' gives it the same set-up "
                        "(GLIBC_TUNABLES), to see how much of a ratio is the allocator")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 rows: auto = only on CPUs with bf16 instructions (native_bf16)")
    p.add_argument("--peer-timeout", type=float, default=1800.0,
                   help="time box per peer subcommand, seconds (a timed-out peer's rows are left out, said so)")
    args = p.parse_args()
    has_bf16, why = native_bf16()
    args.dtypes = ["float32"] + (["bfloat16"] if args.bf16 == "on" or (args.bf16 == "auto" and has_bf16) else [])
    if "bfloat16" not in args.dtypes:
        print(f"bfloat16 rows skipped ({'--bf16 off' if args.bf16 == 'off' else why}); the peer runs "
              f"benchmarks/peer_float32.py (float32 only). --bf16 on times them anyway.", file=sys.stderr)
    from nla_jax import hostmem
    args.host_malloc_applied = hostmem.tune_malloc(args.host_malloc)  # before JAX starts its threads
    args.gen_batches = [int(x) for x in args.gen_batches.split(",")]

    peer_py = None if args.skip_peer else find_peer_python()
    if not args.skip_peer and (peer_py is None or not os.path.isfile(PEER_SCRIPT)):
        print("peer venv or ../shared/peers not found: run `bash ../shared/peers/setup.sh` or pass --skip-peer",
              file=sys.stderr)
        return 2
    peer_runs: dict[str, list] = {"matmul": [], "speed": []}
    our_runs = []
    for r in range(args.rounds):
        if peer_py:
            script = PEER_SCRIPT if "bfloat16" in args.dtypes else os.path.join(REPO, "benchmarks", "peer_float32.py")
            for cmd in (["matmul"], ["speed", "--batch", str(args.batch), "--seq", str(args.seq), "--new-tokens",
                                     str(args.new_tokens), "--gen-batches", ",".join(map(str, args.gen_batches))]):
                got = run_peer(peer_py, cmd, args.peer_malloc, timeout=args.peer_timeout, script=script)
                if got is not None:
                    peer_runs[cmd[0]].append(got)
        our_runs.append(measure_ours(args))
    peer = {k: best_of(v) for k, v in peer_runs.items() if v}
    ours = best_of(our_runs)
    # a ratio of two bests, not the best of the ratios (that pairs a round's forward with its own ceiling)
    ours["forward_fraction_of_ceiling"] = ours["forward_gflops"] / ours["matmul_float32_gflops"]

    ps = peer.get("speed", {})
    rows = []
    for tag, goals in (("float32", (1.1, 1.0, 3.0)), ("bfloat16", (None, None, None)))[:len(args.dtypes)]:
        rows += [(f"forward tok/s ({tag}, {args.batch}x{args.seq})", ours[f"forward_{tag}_tok_s"],
                  ps.get(f"forward_{tag}_tok_s"), goals[0]),
                 (f"forward+backward tok/s ({tag})", ours[f"train_{tag}_tok_s"], ps.get(f"train_{tag}_tok_s"), goals[1])]
        for gb in args.gen_batches:
            rows.append((f"sampler new tok/s ({tag}, batch {gb})", ours[f"generate_{tag}_batch{gb}_new_tok_s"],
                         ps.get(f"generate_{tag}_batch{gb}_new_tok_s"), goals[2] if gb == 32 else None))
    mm_rows = []
    for tag in args.dtypes:
        mm_rows.append((f"forward, matmuls only ({tag})", ours[f"forward_matmuls_only_{tag}_tok_s"],
                       ps.get(f"forward_{tag}_tok_s")))
        if f"train_matmuls_only_{tag}_tok_s" in ours:
            mm_rows.append((f"forward+backward, matmuls only ({tag})", ours[f"train_matmuls_only_{tag}_tok_s"],
                           ps.get(f"train_{tag}_tok_s")))
        for gb in args.gen_batches:
            mm_rows.append((f"decode, matmuls only ({tag}, batch {gb})",
                           ours[f"generate_matmuls_only_{tag}_batch{gb}_new_tok_s"],
                           ps.get(f"generate_{tag}_batch{gb}_new_tok_s")))
    table = []

    def line(name, o, t, goal=None, rec=True):
        ratio = o / t if t else None
        met = None if ratio is None or goal is None else ratio >= goal
        if rec:
            table.append({"metric": name, "nla_jax": o, "transformers": t, "ratio": ratio, "goal": goal, "met": met})
        print(f"{name:44s} {o:10.1f} {t if t else float('nan'):13.1f} {ratio if ratio else float('nan'):7.2f} "
              f"{'' if goal is None else '>=%.1fx' % goal:>6s} {'' if met is None else ('ok' if met else 'MISSED')}")
        return {"metric": name, "matmuls_only": o, "transformers": t, "ratio": ratio}

    print(f"\n{'metric (best of %d rounds)' % args.rounds:44s} {'nla_jax':>10s} {'transformers':>13s} {'ratio':>7s} {'goal':>6s}")
    for name, o, t, goal in rows:
        line(name, o, t, goal)
    line("forward+backward, plain autodiff (reference)", ours["train_plain_autodiff_float32_tok_s"],
         ps.get("train_float32_tok_s"), rec=False)
    print(f"\n{'matmul-only programs (tok/s, estimates)':44s} {'nla_jax':>10s} {'transformers':>13s} {'ratio':>7s}")
    mm_table = [line(name, o, t, rec=False) for name, o, t in mm_rows]
    print()
    for tag in args.dtypes:
        for gb in args.gen_batches:
            print(f"{'decode ms/step (%s, batch %d)' % (tag, gb):44s} {ours[f'decode_step_{tag}_batch{gb}_ms']:10.1f}"
                  f"   matmuls only {ours[f'decode_step_matmuls_only_{tag}_batch{gb}_ms']:.1f}")
    print(f"{'decode weight-read bound, float32 (ms)':44s} {ours['decode_step_lower_bound_ms']:10.1f}"
          f"   (memory read {ours['memory_read_gb_s']:.1f} GB/s)")
    frac = ours["forward_fraction_of_ceiling"]
    print(f"{'forward GFLOP/s / XLA f32 matmul ceiling':44s} {ours['forward_gflops']:10.1f} "
          f"{ours['matmul_float32_gflops']:13.1f} {frac:7.2f} {'>=0.9':>6s} {'ok' if frac >= 0.9 else 'MISSED'}")
    if "matmul" in peer:
        print(f"{'torch f32 matmul GFLOP/s (peer ceiling)':44s} {'':10s} {peer['matmul']['matmul_float32_gflops']:13.1f}")
    result = {"benchmark": "model_speed", "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args), "nla_jax": ours, "peer": peer,
              "rounds": {"nla_jax": our_runs, "peer": peer_runs}, "table": table, "matmul_only_programs": mm_table,
              "forward_fraction_of_ceiling": frac}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
