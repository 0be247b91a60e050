"""One table of every quality lever measured for issue 17, read from the committed results.

    .venv/bin/python benchmarks/ablation_table.py          # prints a markdown table, writes results/ablation_table.json

Nothing is run: each row is one evaluation already in benchmarks/results (the trainer's eval stage or
rl_levers.py), on the held-out rows it names. Rows of one group share their held-out rows (same store
and eval settings), so within a group the columns compare like with like; across groups they do not
(other corpus, other code, other recipe). Where a paired per-row file exists (benchmarks/paired_rows.py)
its difference against the group's base is given; otherwise compare the intervals, which is weaker.
Every interval is the 95% cluster-t interval over documents the evaluation itself reported (ratios of
totals, quoted spans absent: document bootstrap).

Columns: rows / documents; real - floor after SFT and after RL (paired within the run, own AR); RL - SFT
read by the fixed judge (the run's SFT AR); the RL AV's KL to the SFT AV per token; after RL: the
current token named, the target's top-1 next token among the stated predictions, quoted spans absent
from the context, explanations repeating a stated prediction; the paired difference in after-RL
real - floor against the group's base, where measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (group, lever, file, key inside the file ("" = the file is one evaluation; "results:NAME" = rl_levers'
#  entry NAME), paired file against the group's base or None, what it changes)
LEVERS = [
    ("default config (3,000 documents)", "the default recipe", "default_run_eval.json", "", None,
     "launch/default_run.sh: self-text warm start, SFT 1,500 + 1,500 steps, RL 300"),
    ("quickstart, SFT AR at 2x the learning rates (f484337 on)", "the quickstart recipe, run 1",
     "quickstart_eval_arlr2x.json", "", None, "configs/smollm2_135m.py:quick: SFT AR at 6e-5 / 2e-4"),
    ("quickstart, SFT AR at 2x the learning rates (f484337 on)", "the same, fresh clone on another machine",
     "quickstart_eval_a9bbdad.json", "", None, "bash launch/quickstart.sh at a9bbdad (the same recipe: a second run)"),
    ("quickstart, SFT AR at 3e-5 (before f484337)", "the quickstart recipe (base)", "levers-predict_k3.json", "", None,
     "configs/smollm2_135m.py:quick: 3 stated predictions, 300 documents"),
    ("quickstart, SFT AR at 3e-5 (before f484337)", "one stated prediction", "levers-predict_k1.json", "",
     "paired_predict_k1_vs_k3_rl.json", "summarize.predict_k=1"),
    ("quickstart, 600 documents", "twice the documents, same steps", "levers-docs600.json", "", None,
     "default_corpus --documents 600 (other held-out rows: compare intervals only)"),
    ("quickstart warm starts (a335de5 and before)", "no token before (base)", "quickstart_eval.json", "", None,
     "summarize.before_tokens=0"),
    ("quickstart warm starts (a335de5 and before)", "one token before", "levers-before1.json", "",
     "paired_before0_vs_before1.json", "summarize.before_tokens=1 (paired: none - one, sign flipped here)"),
    ("warm-start forms, 3 tokens before (74fe177)", "token first", "warmstarts_quickstart.json", "tokenfirst", None,
     "Token «x» after «...». Next: ..."),
    ("warm-start forms, 3 tokens before (74fe177)", "quote, then predictions", "warmstarts_quickstart.json",
     "quotepredict", None, "The text ends with: «...». Next: ..."),
    ("warm-start forms, 3 tokens before (74fe177)", "predictions, then quote", "warmstarts_quickstart.json",
     "nextfirst", None, "Next: ... The text ends with: «...»."),
]
# rl_levers.py sweeps, each from one SFT pair: (file, its group, what its base row is)
_SELFTEXT60 = ("RL levers from the quickstart's SFT pair (self-text, 60 RL steps)", "the quickstart recipe, 60 RL steps")
RL_LEVERS = [("levers-rl.json", "RL levers from one SFT pair (quote warm start, older)", "the quote recipe"),
             ("levers-rl-selftext60.json", *_SELFTEXT60),
             ("levers-rl-selftext60-seeds.json", *_SELFTEXT60)]   # more seeds of the same sweep: one group
# claims recomputed later from an evaluation's saved rows (benchmarks/claims_from_rows.py) fill what it lacks
CLAIMS_LATER = {"default_run_eval.json": "claims_default_run.json"}


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ci(x) -> str:
    if not isinstance(x, dict) or x.get("mean") is None:
        return "—"
    if x.get("lo") is None:
        return f"{x['mean']:+.3f}"
    return f"{x['mean']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}]"


def _share(x) -> str:
    return "—" if not isinstance(x, dict) or x.get("mean") is None else f"{x['mean']:.3f}"


def row_of(group: str, lever: str, ev: dict, rl_minus_sft: dict | None, paired: dict | None, what: str) -> dict:
    """One table row from an evaluation: ev has after_sft / after_rl (eval-stage checkpoints or rl_levers)."""
    sft, rl = ev.get("after_sft") or {}, ev.get("after_rl") or {}
    return {"group": group, "lever": lever, "what": what, "rows": ev.get("rows"), "documents": ev.get("documents"),
            "sft_real_minus_floor": sft.get("real_minus_floor"), "rl_real_minus_floor": rl.get("real_minus_floor"),
            "rl_minus_sft_judge": _get(rl_minus_sft, "judge"), "kl_per_token": rl.get("kl_to_ref_per_token"),
            "current_token": rl.get("names_current_token"), "names_top1": rl.get("names_top1_prediction"),
            "quotes_absent": rl.get("quotes_absent"), "repeats_prediction": rl.get("repeats_prediction"),
            "paired_rl_real_minus_floor_vs_base": paired}


def collect(results: str = RESULTS) -> list[dict]:
    out = []
    for group, lever, fname, key, paired_file, what in LEVERS:
        path = os.path.join(results, fname)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            d = json.load(f)
        d = d[key] if key else d
        ev = {"rows": d.get("rows"), "documents": d.get("documents"), **(d.get("checkpoints") or {})}
        paired = None
        if paired_file and os.path.exists(os.path.join(results, paired_file)):
            with open(os.path.join(results, paired_file)) as f:
                p = json.load(f)
            paired = _get(p, "scores", "fve_minus_floor", "pooled_minus_base")
            if paired and "sign flipped" in what:        # the file's base is this row, its versus the group's base
                paired = {k: (-v if isinstance(v, float) else v) for k, v in paired.items()}
                paired["lo"], paired["hi"] = paired["hi"], paired["lo"]
        later = os.path.join(results, CLAIMS_LATER.get(fname, ""))
        if fname in CLAIMS_LATER and os.path.exists(later):
            with open(later) as f:
                recomputed = json.load(f)["checkpoints"]
            for name, claims in recomputed.items():
                if name in ev:
                    ev[name] = {**claims, **ev[name]}      # the evaluation's own numbers win where both have one
        out.append(row_of(group, lever, ev, d.get("rl_minus_sft"), paired, what))
    for fname, group, base_what in RL_LEVERS:
        path = os.path.join(results, fname)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            d = json.load(f)
        for r in d["results"]:
            if "error" in r:
                continue
            ev = {"rows": r.get("rows"), "documents": r.get("documents"), "after_sft": r.get("after_sft"),
                  "after_rl": r.get("after_rl")}
            what = ", ".join(r.get("overrides") or []) or r.get("config_variant") or base_what
            out.append(row_of(group, r["variant"], ev, r.get("rl_minus_sft"), None, what))
    return out


def markdown(rows: list[dict]) -> str:
    head = ("| group | lever | rows / docs | SFT: real − floor | RL: real − floor | RL − SFT (judge) | KL/token "
            "| current token | top-1 | quotes absent | repeats | paired RL − floor vs base |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['group']} | {r['lever']} | {r['rows']} / {r['documents']} | {_ci(r['sft_real_minus_floor'])} "
                     f"| {_ci(r['rl_real_minus_floor'])} | {_ci(r['rl_minus_sft_judge'])} | {_share(r['kl_per_token'])} "
                     f"| {_share(r['current_token'])} | {_share(r['names_top1'])} | {_share(r['quotes_absent'])} "
                     f"| {_share(r['repeats_prediction'])} | {_ci(r['paired_rl_real_minus_floor_vs_base'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS, help="the results folder to read (default: benchmarks/results)")
    p.add_argument("--out", default=None, help="JSON output (default: RESULTS/ablation_table.json)")
    args = p.parse_args(argv)
    rows = collect(args.results)
    if not rows:
        print(f"error: no lever results found in {args.results}", file=sys.stderr)
        return 2
    print(markdown(rows))
    out = args.out or os.path.join(args.results, "ablation_table.json")
    with open(out + ".tmp", "w") as f:
        json.dump({"levers": rows, "markdown": markdown(rows)}, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
