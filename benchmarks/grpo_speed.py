"""GRPO step speed, side by side with TRL's GRPOTrainer and Google's Tunix GRPOLearner, plus the
NLA step at `quick` settings.

    .venv/bin/python benchmarks/grpo_speed.py                 # prints a table, writes JSON
    .venv/bin/python benchmarks/grpo_speed.py --skip-peer --skip-tunix --skip-nla

Peers: TRL through ../shared/peers/hf_peer.py (its venv: ../shared/peers/setup.sh), Tunix through
../shared/peers/tunix_peer.py grpo (its venv: ../shared/peers/setup_tunix.sh, or NLA_TUNIX_PYTHON;
--setup-tunix builds it first). Tunix's side: tunix.rl.grpo's GRPOLearner, vanilla rollout, the same
weights (GGUF dequantised into its Llama3), float32, beta 0, one AdamW update per rollout, reward =
-completion length; the peer script documents two work-arounds that change no work done.

Plain policy step (both sides): SmolLM2-135M-Instruct float32, 8 chat prompts x 4 completions x
up to 32 new tokens, temperature 1, reward = -completion length (TRL: characters; ours: tokens,
computed inside the compiled step; the reward's value does not change the work), no reference
KL (beta 0), one update per rollout. Ours is `nla_jax.rl.grpo.policy_step`: sampling, reward,
advantages, the clipped surrogate and the AdamW update in one jitted function. By default its
update runs each prompt once for its group (`rl.share_prompt`, `transformer.forward_grouped`);
the same step in TRL's layout (every completion with its own prompt copy) is timed beside it.
NLA step: `nla_jax.nla.steps.rl_step` at configs/smollm2_135m.py:quick settings (needs the quick
store, runs/smollm2_135m_quick/acts), seconds per step, rollout tokens/s of the sampler alone. That
is the one-function step at the cap; the trainer's default (train.text_bucket > 0) samples first and
updates at the rollouts' width: benchmarks/rl_width.py compares the two.
Peak memory: max RSS of each peer subprocess (os.wait4; run first, while this process is still
small: Linux keeps a forked child's RSS high-water mark across exec) and of this process after the
plain step and after the NLA step.
Compare ratios from one run: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from model_speed import PROMPTS, find_peer_python, run_peer_rss  # noqa: E402
from record import write_result  # noqa: E402

PEERS = os.path.join(REPO, "..", "shared", "peers")


def find_tunix_python() -> str | None:
    for cand in (os.environ.get("NLA_TUNIX_PYTHON"), os.path.expanduser("~/.cache/nla-tunix-venv/bin/python")):
        if cand and os.path.isfile(cand):
            return cand
    return None


def _median_steps(fn, warmup: int, runs: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def measure_plain(args) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections

    from nla_jax import optim, sampling
    from nla_jax import weights
    from nla_jax.rl import grpo

    cfg, params, tok = weights.load("embedded")
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[:args.prompts]
    toks, valid = sampling.pad_prompts([tok.encode_chat(p) for p in prompts], cfg.pad_id)
    rl = ml_collections.ConfigDict(dict(group_size=args.group, advantage="grpo", adv_eps=1e-4, adv_ddof=1, beta=0.0,
                                        kl="k3", eps_low=0.2, eps_high=0.2, agg="token_mean",
                                        share_prompt=args.share_prompt))
    ocfg = ml_collections.ConfigDict(dict(lr=1e-6, lr_head=0.0, lr_proj=0.0, warmup=0, schedule="constant", clip=1.0,
                                          weight_decay=0.0, b1=0.9, b2=0.999, train_embed=True,
                                          train_blocks=(0, -1)))
    tx = optim.make(ocfg, 100, params)
    sc = sampling.SampleConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    reward = lambda t, n: -n.astype(jnp.float32)
    step = jax.jit(functools.partial(grpo.policy_step, cfg=cfg, sc=sc, rl=rl, tx=tx, labels=optim.labels(params, True),
                                     reward_fn=reward), donate_argnums=(0,))
    box = {"state": {"params": params, "opt": tx.init(params), "step": jnp.int32(0)}, "i": 0, "tokens": []}
    prompt, v = jnp.asarray(toks), jnp.asarray(valid)

    def one():
        box["i"] += 1
        box["state"], m = step(box["state"], params, prompt, v, jax.random.key(box["i"]))
        box["tokens"].append(float(jax.device_get(m["length"])) * args.prompts * args.group)

    t0 = time.perf_counter()
    one()
    compile_s = time.perf_counter() - t0
    med, ts = _median_steps(one, 0, args.steps)
    return {"step_s": ts, "median_step_s": med, "first_step_s_with_compile": compile_s,
            "completions_per_s": args.prompts * args.group / med,
            "mean_completion_tokens": statistics.mean(box["tokens"][1:]) / (args.prompts * args.group)}


def measure_nla(args) -> dict | None:
    import jax
    import numpy as np

    from nla_jax import configlib, sharding
    from nla_jax.nla import batches as batches_lib
    from nla_jax.nla import run as run_lib
    from nla_jax.nla import state as state_lib
    from nla_jax.nla import steps

    cfg = configlib.get(os.path.join(REPO, "configs", "smollm2_135m.py") + ":quick")
    if not os.path.exists(os.path.join(cfg.data.store, "manifest.json")):
        print(f"[nla] no store at {cfg.data.store}: run the quickstart first; NLA step skipped", file=sys.stderr)
        return None
    run = run_lib.build(cfg)
    with sharding.use_mesh(run.mesh, run.rules):
        layout = state_lib.rl(run)
        state = state_lib.fresh(run, layout)
        ref = state_lib.init_av(run, run.target)
        fn = state_lib.rl_step(run, layout, jax.tree.map(lambda a: a.sharding, ref))
        it = batches_lib.stage_batches(run, "rl", cfg.rl.batch, 0, None)
        box = {"state": state, "i": 0, "m": None}

        def one():
            step, batch = next(it)
            box["state"], m = fn(box["state"], ref, batch, run.mean, jax.random.key(step))
            box["m"] = jax.device_get(m)

        t0 = time.perf_counter()
        one()
        compile_s = time.perf_counter() - t0
        med, ts = _median_steps(one, 0, args.nla_steps)
        # the sampler alone on the same rollout shape
        sc = state_lib.rl_sample_config(run)
        ex = jax.jit(functools.partial(steps.explain, ctx=run.ctx, sc=sc))
        _, batch = next(it)
        acts = jax.numpy.repeat(batch["acts"], cfg.rl.group_size, axis=0)
        out = jax.block_until_ready(ex(box["state"]["av"], acts, run.mean, jax.random.key(0)))
        t0 = time.perf_counter()
        n_tok = 0
        for i in range(3):
            out = jax.device_get(ex(box["state"]["av"], acts, run.mean, jax.random.key(i + 1)))
            n_tok += int(np.sum(out["lengths"]))
        samp_s = time.perf_counter() - t0
    return {"rollouts_per_step": cfg.rl.batch * cfg.rl.group_size, "max_len": cfg.av.max_len,
            "step_s": ts, "median_step_s": med, "first_step_s_with_compile": compile_s,
            "rollout_tokens_per_s": n_tok / samp_s, "sampler_share_of_step": (samp_s / 3) / med}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed steps after the compiling one")
    p.add_argument("--nla-steps", type=int, default=3)
    p.add_argument("--no-share-prompt", dest="share_prompt", action="store_false",
                   help="run every completion's prompt in the update (the TRL layout) instead of once per group")
    p.add_argument("--skip-unshared", action="store_true",
                   help="do not also time our step without prompt sharing (the lever's effect)")
    p.add_argument("--skip-peer", action="store_true", help="no TRL")
    p.add_argument("--skip-tunix", action="store_true", help="no Tunix")
    p.add_argument("--setup-tunix", action="store_true",
                   help="build the Tunix venv first if missing (../shared/peers/setup_tunix.sh, ~2 min)")
    p.add_argument("--peer-timeout", type=float, default=1800.0, help="time box per peer run, seconds")
    p.add_argument("--skip-nla", action="store_true")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "grpo_speed.json"))
    args = p.parse_args()
    from nla_jax import hostmem
    hostmem.tune_malloc()  # as the CLIs do (NLA_HOST_MALLOC=system to compare), before JAX's threads
    res: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "shape": {"prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens}}
    shape = ["--prompts", str(args.prompts), "--group", str(args.group), "--new-tokens", str(args.new_tokens),
             "--steps", str(args.steps + 1)]   # + the compiling first step, left out of each side's median
    py = find_peer_python()
    if not args.skip_peer:
        if py is None:
            print("TRL peer venv not found (bash ../shared/peers/setup.sh); its column is empty", file=sys.stderr)
        else:
            trl, res["peak_rss_gb_peer"] = run_peer_rss(py, os.path.join(PEERS, "hf_peer.py"), ["trl-grpo", *shape],
                                                    args.peer_timeout)
            if trl is not None:
                res["trl"] = trl
    if not args.skip_tunix:
        tpy = find_tunix_python()
        if tpy is None and args.setup_tunix:
            setup = subprocess.run(["bash", os.path.join(PEERS, "setup_tunix.sh")], capture_output=True, text=True)
            tpy = setup.stdout.strip().splitlines()[-1] if setup.returncode == 0 else None
        if tpy is None:
            print("Tunix venv not found (--setup-tunix, or bash ../shared/peers/setup_tunix.sh); its column is "
                  "empty", file=sys.stderr)
        else:
            tunix, res["peak_rss_gb_tunix"] = run_peer_rss(tpy, os.path.join(PEERS, "tunix_peer.py"),
                                                       ["grpo", *shape, "--warmup", "1"], args.peer_timeout)
            if tunix is not None:
                res["tunix"] = tunix
    res["nla_jax"] = measure_plain(args)
    res["nla_jax"]["share_prompt"] = args.share_prompt
    res["peak_rss_gb_ours"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if args.share_prompt and not args.skip_unshared:
        res["nla_jax_unshared"] = measure_plain(argparse.Namespace(**{**vars(args), "share_prompt": False}))
    if not args.skip_nla:
        res["nla_step"] = measure_nla(args)
        res["peak_rss_gb_nla_step"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    ours = res["nla_jax"]["median_step_s"]

    def peer_cols(key: str, ours_value: float | None, fmt: str = "{:.2f}", ratio: bool = True) -> tuple:
        """(TRL, TRL/ours, Tunix, Tunix/ours) cells for one metric."""
        cells = []
        for name in ("trl", "tunix"):
            v = res[name].get(key) if name in res else None
            cells.append(fmt.format(v) if v is not None else "-")
            cells.append(f"{v / ours_value:.2f}x" if ratio and v is not None and ours_value else "")
        return tuple(cells)

    rows = [("plain GRPO step s (median)", f"{ours:.2f}", *peer_cols("median_step_s", ours))]
    if "nla_jax_unshared" in res:
        u = res["nla_jax_unshared"]["median_step_s"]
        rows.append(("  same, prompt not shared (TRL layout)", f"{u:.2f}", *peer_cols("median_step_s", u)))
    if "tunix" in res:
        t = res["tunix"]
        rows.append(("  Tunix: rollout s / update s (median)", "", "", "", f"{t['rollout_s_median']:.1f} / "
                     f"{t['update_s_median']:.1f}", ""))
    rows.append(("completions/s", f"{res['nla_jax']['completions_per_s']:.2f}",
                 *peer_cols("completions_per_s", None, ratio=False)))
    rows.append(("peak RSS GB (plain step)", f"{res['peak_rss_gb_ours']:.2f}",
                 f"{res['peak_rss_gb_peer']:.2f}" if "peak_rss_gb_peer" in res else "-", "",
                 f"{res['peak_rss_gb_tunix']:.2f}" if "peak_rss_gb_tunix" in res else "-", ""))
    if res.get("nla_step"):
        n = res["nla_step"]
        rows.append((f"NLA step s ({n['rollouts_per_step']} rollouts x <= {n['max_len']} tok)",
                     f"{n['median_step_s']:.2f}", "", "", "", ""))
        rows.append(("NLA rollout tokens/s (sampler alone)", f"{n['rollout_tokens_per_s']:.1f}", "", "", "", ""))
        rows.append(("peak RSS GB (after the NLA step too)", f"{res['peak_rss_gb_nla_step']:.2f}", "", "", "", ""))
    for name in ("trl", "tunix"):
        if name in res:   # the peer's seconds per step over ours: > 1 means nla_jax is faster
            res[f"ratio_step_rate{'' if name == 'trl' else '_tunix'}"] = res[name]["median_step_s"] / ours
    print(f"\n{'metric':44s} {'nla_jax':>10s} {'TRL':>10s} {'ratio':>8s} {'Tunix':>10s} {'ratio':>8s}")
    for r in rows:
        print(f"{r[0]:44s} {r[1]:>10s} {r[2]:>10s} {r[3]:>8s} {r[4]:>10s} {r[5]:>8s}")
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
