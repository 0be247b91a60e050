"""Paired per-row comparisons across evaluations: pooled seeds, two recipes on the same rows.

    .venv/bin/python benchmarks/paired_rows.py \\
        --base  runs/ev/evaluate:sft_av \\
        --versus runs/ev/evaluate:rl-seed0 --versus runs/ev/evaluate:rl-seed1 --versus runs/ev/evaluate:rl-seed2 \\
        --name rl_seeds_pooled

Each COLUMN is EVALDIR:LABEL, a column of `python -m nla_jax.evaluate`'s OUTDIR/rows.jsonl, or of a
trainer work directory's eval_rows.jsonl (its eval stage: labels after_sft, after_rl) (LABEL: the
checkpoint's label there, or any substring naming exactly one). Every column must hold the same rows
(row ids and documents; evaluate picks them from eval.rows and eval.seed, so two evaluations of
one store with the same settings do). For each score, per row: mean over the --versus columns
minus the --base column, and each --versus column alone minus the base; the mean of those per-row
differences with a 95% cluster-robust t-interval over documents (nla_jax/nla/stats.py
cluster_t_ci, the intervals evaluate itself reports). Pooling seeds this way averages their noise
per row before the interval is taken, so the interval is the one for "RL with a random seed"
against the one base, on these documents.

Runs that each have their own base (two runs of one recipe, each with its own SFT pair): give --base once per
--versus, in the same order; each --versus is then taken minus its own --base per row, and those per-row
differences are pooled (`--base RUN1:after_sft --versus RUN1:after_rl --base RUN2:after_sft --versus
RUN2:after_rl`: "RL - SFT" over two runs). fve_judge is compared when each pair shares one judge (each run's
gain is read on its own judge's scale; the gains, not the scores, are averaged).

A column EVALDIR:LABEL#judge is LABEL's explanations read by that evaluation's fixed judge (its fve is the
judge's): `--base EV:sft --versus EV:sft#judge` pairs two reconstructors on one verbalizer's text.

Scores: fve (each column's own AR), fve_judge (the fixed judge's, where the evaluation had
--judge, and only when every column had the same judge), fve - floor, and the claims as 0/1 per row: the current token named (exact or near), the
target's top-1 next token named. (Quoted-span rates are ratios of totals; evaluate reports those
with a document bootstrap and they are not paired here.)

Prints a table and writes benchmarks/results/paired_<NAME>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nla_jax.nla.measure import ci  # noqa: E402  (evaluate's own interval: cluster-robust t over documents)
from record import write_result  # noqa: E402

SCORES = {                      # name -> per-row value from one column's record (None: not available)
    "fve": lambda c: c.get("fve"),
    "fve_judge": lambda c: c.get("fve_judge"),
    "fve_minus_floor": lambda c: c["fve"] - c["fve_floor"] if "fve_floor" in c else None,
    "current_token_named": lambda c: None if "current_token" not in c else float(c["current_token"] is not None),
    "names_top1": lambda c: None if "names_top1" not in c else float(c["names_top1"]),
}


class Bad(Exception):
    """A user mistake: one line, exit 2."""


def read_rows(evaldir: str) -> list[dict]:
    """An evaluate OUTDIR's rows.jsonl, else a trainer work directory's eval_rows.jsonl (its eval stage)."""
    path = os.path.join(evaldir, "rows.jsonl")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(evaldir, "eval_rows.jsonl")):
        path = os.path.join(evaldir, "eval_rows.jsonl")
    if not os.path.isfile(path):
        raise Bad(f"{path}: not found (evaluate writes rows.jsonl beside evaluate.json, the trainer's eval stage "
                  f"eval_rows.jsonl beside eval.json; rerun the one that made it)")
    with open(path) as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            raise Bad(f"{path}: not JSON lines ({e})") from None


def _stage_digest(stage_dir: str) -> str | None:
    """sha256 over the newest checkpoint of a stage (relative paths and bytes): the same reader copied into
    several work directories (benchmarks/rl_levers.py copies one SFT pair into each) is one judge."""
    steps = sorted((d for d in os.listdir(stage_dir) if d.isdigit()), key=int) if os.path.isdir(stage_dir) else []
    if not steps:
        return None
    root, h = os.path.join(stage_dir, steps[-1]), hashlib.sha256()
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return "sha256:" + h.hexdigest()


def judge_of(evaldir: str) -> str | None:
    """Which frozen reader scored fve_judge in this evaluation: evaluate's --judge (evaluate.json), or a
    trainer work directory's own SFT AR (its eval stage; named by its newest checkpoint's content, so
    copies of one SFT AR are one judge); None when neither file says."""
    for name in ("evaluate.json", "eval.json"):
        path = os.path.join(evaldir, name)
        if os.path.isfile(path):
            with open(path) as f:
                judge = json.load(f).get("judge")
            if judge is None:
                return None
            if name == "evaluate.json":
                return os.path.abspath(judge)
            return _stage_digest(os.path.join(evaldir, "sft_ar")) or f"{os.path.abspath(evaldir)}:{judge}"
    return None


JUDGE_SUFFIX = "#judge"


def column(spec: str, cache: dict) -> tuple[str, str, list[dict]]:
    """EVALDIR:LABEL -> (display name, the label in rows.jsonl, the evaluation's records in row order).

    EVALDIR:LABEL#judge is that column read by the evaluation's fixed judge instead of its own AR (its
    fve is the judge's; the explanations and claims are the same): against EVALDIR:LABEL it pairs two
    readers of one verbalizer's text, e.g. a reconstructor lever measured without retraining the AV."""
    as_judge = spec.endswith(JUDGE_SUFFIX)
    spec = spec[:-len(JUDGE_SUFFIX)] if as_judge else spec
    evaldir, sep, want = spec.rpartition(":")
    if not sep or not evaldir or not want:
        raise Bad(f"column {spec!r}: expected EVALDIR:LABEL")
    if evaldir not in cache:
        cache[evaldir] = read_rows(evaldir)
    recs = cache[evaldir]
    labels = list(recs[0]["checkpoints"]) if recs else []
    hits = [lab for lab in labels if lab == want] or [lab for lab in labels if want in lab]
    if len(hits) != 1:
        raise Bad(f"column {spec!r}: {'no' if not hits else 'more than one'} label of {evaldir}/rows.jsonl matches "
                  f"{want!r} (labels: {', '.join(labels)})")
    shown = f"{os.path.basename(os.path.normpath(evaldir))}:{hits[0]}"
    if not as_judge:
        return shown, hits[0], recs
    if any(r["checkpoints"][hits[0]].get("fve_judge") is None for r in recs):
        raise Bad(f"column {spec + JUDGE_SUFFIX!r}: {evaldir} has no fixed judge's scores (evaluate --judge DIR)")
    key = hits[0] + JUDGE_SUFFIX
    judged = []
    for r in recs:
        rec = dict(r["checkpoints"][hits[0]])
        rec["fve"] = rec.pop("fve_judge")          # the judge's score stands in for the column's own AR's
        judged.append({**r, "checkpoints": {key: rec}})
    return shown + JUDGE_SUFFIX, key, judged


def compare(base: str | list[str], versus: list[str]) -> dict:
    """Each --versus column minus the base per row, pooled over the --versus columns. `base` is one column
    (every --versus against it) or a list with one base per --versus (each run against its own base)."""
    bases = [base] if isinstance(base, str) else list(base)
    if len(bases) not in (1, len(versus)):
        raise Bad(f"{len(bases)} --base columns for {len(versus)} --versus: give one, or one per --versus in order")
    pairs = list(zip(bases * len(versus) if len(bases) == 1 else bases, versus))    # (base spec, versus spec)
    cache: dict = {}
    specs = list(dict.fromkeys([*bases, *versus]))
    cols = {s: column(s, cache) for s in specs}
    ids = [(r["row"], r["doc_id"]) for r in cols[bases[0]][2]]
    for spec in specs:
        if [(r["row"], r["doc_id"]) for r in cols[spec][2]] != ids:
            raise Bad(f"column {spec!r}: its rows differ from {bases[0]!r}'s (evaluate both on the same store with "
                      f"the same eval.rows, eval.seed and eval.split)")
    docs = np.array([d for _, d in ids])
    shown = {s: cols[s][0] for s in specs}
    out = {"base": shown[bases[0]] if len(bases) == 1 else [shown[b] for b in bases],
           "versus": [shown[v] for v in versus], "rows": len(ids), "documents": int(len(np.unique(docs))),
           "scores": {}}
    # one judge_of per evaluation (a trainer's judge is named by hashing its SFT AR's checkpoint); a pair whose
    # columns share the judge is comparable, and with one base that means every column shares it
    judges = {d: judge_of(d) for d in {s.rpartition(":")[0] for s in specs}}
    judge_sets = [{judges[b.rpartition(":")[0]], judges[v.rpartition(":")[0]]} for b, v in pairs]
    for name, get in SCORES.items():
        if name == "fve_judge" and any(len(js) > 1 for js in judge_sets):
            # a difference between scores of two different judges means nothing (their scales differ)
            out["fve_judge_skipped"] = ("the columns were scored by different judges: "
                                        f"{sorted(map(str, set().union(*judge_sets)))}")
            continue
        vals = {}
        for spec in specs:
            _, key, recs = cols[spec]
            v = [get(r["checkpoints"][key]) for r in recs]
            vals[spec] = None if any(x is None for x in v) else np.array(v, np.float64)
        if any(v is None for v in vals.values()):
            continue                      # a score some column lacks (no judge, no downstream claim)
        b = np.stack([vals[s] for s in bases]).mean(0)                      # [n] (the mean of the bases)
        vs = np.stack([vals[v] for v in versus])                            # [k, n]
        diffs = np.stack([vals[v] - vals[bs] for bs, v in pairs])           # [k, n] each run minus its base
        out["scores"][name] = {"base": ci(b, docs), "versus_mean": ci(vs.mean(0), docs),
                               "pooled_minus_base": ci(diffs.mean(0), docs),
                               "each_minus_base": {shown[v]: ci(d, docs) for (_, v), d in zip(pairs, diffs)}}
    return out


def fmt(d: dict) -> str:
    if d["lo"] is None:
        return f"{d['mean']:+.3f} [n/a]"
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", action="append", required=True, metavar="EVALDIR:LABEL",
                   help="once (every --versus against it) or once per --versus, in order (each against its own)")
    p.add_argument("--versus", action="append", required=True, metavar="EVALDIR:LABEL",
                   help="repeatable; several are pooled (mean per row) and also shown one by one")
    p.add_argument("--name", default="comparison", help="names the result file paired_NAME.json")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/paired_NAME.json)")
    args = p.parse_args(argv)
    try:
        res = compare(args.base, args.versus)
    except Bad as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = res["base"] if isinstance(res["base"], str) else " / ".join(res["base"]) + " (each --versus its own)"
    print(f"{res['rows']} rows from {res['documents']} documents; base {base}; "
          f"versus {', '.join(res['versus'])} (pooled: their per-row mean); 95% cluster-robust t over documents")
    print(f"\n{'score':22s} {'base':>26s} {'versus (pooled)':>26s} {'pooled - base (paired)':>26s}")
    if "fve_judge_skipped" in res:
        print(f"fve_judge not compared: {res['fve_judge_skipped']}")
    for name, s in res["scores"].items():
        print(f"{name:22s} {fmt(s['base']):>26s} {fmt(s['versus_mean']):>26s} {fmt(s['pooled_minus_base']):>26s}")
        if len(res["versus"]) > 1:
            for lab, d in s["each_minus_base"].items():
                print(f"  {lab[-40:]:>48s} - base {fmt(d):>26s}")
    write_result(args.out or os.path.join(REPO, "benchmarks", "results", f"paired_{args.name}.json"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
