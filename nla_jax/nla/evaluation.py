"""The trainer's final stage: explanation quality on held-out documents, with its controls.

For each finished checkpoint pair (after SFT: the SFT AV read by the SFT AR; after RL: the RL AV
read by the live RL AR) it explains every evaluation activation (greedy unless eval.temperature
> 0) and scores the text by the AR. Beside it, always:
  floor     the renormalised mean of the training vectors as a constant prediction;
  shuffled  explanations of *other rows'* activations (a permutation that never keeps a
            document; the real explanations reordered, no second decode), scored against the
            true activation: what the AR gets from the text alone when the text says nothing
            about this activation;
  zero      explanations of a zero vector on eval.zero_rows of the rows (a check, not a
            measurement): if these equal the real ones, injection failed.
Claims (nla/claims.py): the current token named, quoted spans absent from the context and, where
the store's warm-start texts recorded the target's predictions, its top-1 next token named.
With a fixed judge (the trainer passes the SFT AR: trained once, on teacher text only, never on an
AV's own explanations) every pair's explanations are also scored by that one frozen reader, and
after RL - after SFT is reported paired by row under both readers. The live RL AR recalibrates to
the RL AV's text; only the judge's difference says whether the *verbalizer* got better. Beside it,
the RL AV's exact KL to the SFT AV along its own explanations (how far RL moved it).
Beside eval.json, WORKDIR/eval_rows.jsonl holds each row's explanation and scores per checkpoint
(the format of evaluate's rows.jsonl) for paired comparisons across runs (benchmarks/paired_rows.py).
Every number comes with a 95% cluster-robust t-interval over documents (rows of one document move
together; measure.ci), and real - shuffled and real - floor with paired intervals. Writes
WORKDIR/eval.json.

The measurements themselves (explain, reconstruct, score, intervals) are nla/measure.py, which
`python -m nla_jax.evaluate` uses for its fuller side-by-side table.
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

import jax
import numpy as np

from nla_jax import fileio, paths, sampling
from nla_jax.data import summaries as summaries_lib
from nla_jax.nla import claims, measure, selftext
from nla_jax.nla.run import Run

CONTEXT_TOKENS = 24   # tokens of context shown beside each example explanation (position included)


def heldout_rows(run: Run, split: str, n: int, seed: int) -> np.ndarray:
    """measure.pick_rows trimmed to a multiple of the batch shards (every shard gets whole rows)."""
    rows = measure.pick_rows(run.store, split, n, seed)
    return rows[:len(rows) - len(rows) % run.batch_shards]


def eval_batch(n: int, most: int, shards: int) -> int:
    """The largest multiple of `shards` that divides n (itself a multiple of shards) and is at most
    max(most, shards): one compiled shape, no padding."""
    batch = max(shards, min(most, n) - min(most, n) % shards)
    while n % batch:
        batch -= shards
    return batch


def target_top1(store, tok, rows: np.ndarray, got: dict) -> list[str] | None:
    """The target's own top-1 next token at each row, as text: stored by extraction (data.top_k > 0,
    any corpus: got["top_ids"] [n, k]), else where the store's warm-start texts recorded it
    (summarize.teacher="predict" over the eval split: each record's "top_ids"); None when any row
    lacks it (then no prediction claim is made)."""
    if store.top_k:
        ids = got["top_ids"][:, 0].tolist()
    else:
        recs = summaries_lib.read_records(summaries_lib.path_in(store.root))
        ids = [recs[int(r)]["top_ids"][0] if recs.get(int(r), {}).get("top_ids") else None for r in rows]
    return None if any(t is None for t in ids) else [selftext.token_text(tok, t) for t in ids]


def heldout_stage(run: Run, pairs: Sequence[tuple[str, dict, dict]], workdir: str, writer,
                  judge: tuple[str, dict] | None = None, ref_av: dict | None = None) -> dict:
    """Score each (name, AV params, AR params) on config `eval` rows; write workdir/eval.json and a
    printed report (process 0), and one "eval" metrics record. Returns the eval.json dict.

    judge: (name, AR params) of a frozen reader that scores every pair's explanations too;
    ref_av: the verbalizer each pair's KL is measured against (pairs whose AV is not it)."""
    E = run.cfg.eval
    rows = heldout_rows(run, E.split, E.rows, E.seed)
    stored_top = ("top_ids",) if run.store.top_k else ()      # the target's predictions, where extraction stored them
    got = run.store.read(None, rows, fields=("acts", "doc_id", "position", "tokens") + stored_top)
    acts, docs = got["acts"], got["doc_id"]                     # [n, d], [n]
    center = run.ctx.center
    var = run.stats.var(center)
    floor_mse = measure.floor_mse(measure.targets(acts, run.stats, center), run.stats, center)
    fve = lambda mse: 1.0 - mse / var
    ci = lambda v: measure.ci(v, docs)
    perm = measure.derangement_by_doc(docs, E.seed)
    sc = sampling.SampleConfig(max_new_tokens=run.ctx.av.max_len, temperature=max(E.temperature, 1e-6),
                               greedy=E.temperature <= 0)
    batch = eval_batch(len(rows), int(E.batch), run.batch_shards)
    res = {"rows": int(len(rows)), "documents": int(len(np.unique(docs))), "var_nrm": var, "center": center,
           "floor": ci(fve(floor_mse)), "checkpoints": {}}
    examples = []
    # what each row's claims are checked against: its tokens, the quote window, the target's top-1 (if known)
    ctxs = claims.row_contexts(run.tokenizer, got["tokens"], got["position"], E.quote_window,
                               target_top1(run.store, run.tokenizer, rows, got))
    per_row = {}                                                  # name -> {"own": fve [n], "judge": fve [n]}
    row_recs: dict[str, list[dict]] = {}                          # name -> one record per row (eval_rows.jsonl)
    first_of_doc = np.unique(docs, return_index=True)[1]
    example_idx = sorted(first_of_doc)[:E.n_examples]                     # one example per document
    # the zero-vector check on the examples' rows and the first rows up to eval.zero_rows (0: all)
    zero_idx = np.arange(len(rows)) if E.zero_rows <= 0 else \
        np.union1d(example_idx, np.arange(min(E.zero_rows, len(rows)))).astype(np.int64)
    for name, av, ar in pairs:
        real = measure.explain_rows(run, av, acts, batch, sc, E.seed)
        shuf = measure.permuted(real, perm)
        zero = measure.explain_rows(run, av, np.zeros_like(acts[zero_idx]), batch, sc, E.seed)
        m_real, m_shuf = measure.score(run, ar, real, acts, batch), measure.score(run, ar, shuf, acts, batch)
        t_real, t_shuf = (measure.decode_explanations(run.tokenizer, e) for e in (real, shuf))
        t_zero = dict(zip(zero_idx.tolist(), measure.decode_explanations(run.tokenizer, zero)))   # row index -> text
        checks = [claims.check_row(t_real[i], ctxs[i]) for i in range(len(rows))]      # per row (nla/claims.py)
        cl = claims.summary(checks, docs, E.n_boot, E.seed)
        res["checkpoints"][name] = {
            "real": ci(fve(m_real)),
            "shuffled": ci(fve(m_shuf)),
            "real_minus_shuffled": ci(fve(m_real) - fve(m_shuf)),
            "real_minus_floor": ci(fve(m_real) - fve(floor_mse)),
            "extract_fail": float(1 - real["ok"].mean()),
            "expl_len": float(real["expl_len"][real["ok"]].mean()) if real["ok"].any() else 0.0,
            "differs_from_zero": float(np.mean([t_real[i] != t for i, t in t_zero.items()])),
            "zero_rows": int(len(zero_idx)),
            "differs_from_shuffled": float(np.mean([a != b for a, b in zip(t_real, t_shuf)])),
            "distinct_explanations": int(len(set(t_real))),
            # claim accuracy (nla/claims.py): the current token named (exact or near; exact), quoted spans not
            # in context, the text it says comes right before the current token ("after «…»": how often stated,
            # how often right) and, where the target's predictions are known, its top-1 among the stated ones
            "names_current_token": cl["current_token_named"],
            "current_token_exact": cl["current_token_exact"],
            **{k: cl[k] for k in ("quotes_absent", "states_preceding", "preceding_correct", "names_top1_prediction",
                                  "repeats_prediction")
               if k in cl},
            # how varied its stated predictions are, beside the target's own top-1 tokens
            "prediction_spread": claims.prediction_spread(checks, docs),
        }
        c = res["checkpoints"][name]
        per_row[name] = {"own": fve(m_real)}
        row_recs[name] = [{"explanation": t_real[i], "ok": bool(real["ok"][i]), "fve": float(fve(m_real[i])),
                           "fve_floor": float(fve(floor_mse[i])), "fve_shuffled": float(fve(m_shuf[i])), **checks[i]}
                          for i in range(len(rows))]
        if judge is not None:
            if judge[1] is ar:      # the judge is this pair's own AR (the SFT pair): the same scores
                j_real, j_shuf = fve(m_real), fve(m_shuf)
            else:
                j_real, j_shuf = fve(measure.score(run, judge[1], real, acts, batch)), fve(measure.score(run, judge[1], shuf, acts, batch))
            per_row[name]["judge"] = j_real
            for i, r in enumerate(row_recs[name]):
                r["fve_judge"] = float(j_real[i])
            c.update({"judge_real": ci(j_real), "judge_shuffled": ci(j_shuf),
                      "judge_real_minus_shuffled": ci(j_real - j_shuf),
                      "judge_real_minus_floor": ci(j_real - fve(floor_mse))})
        if ref_av is not None and av is not ref_av:
            kl = measure.av_kl_rows(run, av, ref_av, acts, real, batch)
            c["kl_to_ref_per_token"] = measure.ratio_ci(kl["kl_sum"], kl["tokens"], docs, E.n_boot, E.seed)
        for i in example_idx:
            ctx_text = measure.context_text(run.tokenizer, got["tokens"][i], int(got["position"][i]), CONTEXT_TOKENS)
            examples.append({"checkpoint": name, "row": int(rows[i]), "context": ctx_text, "explanation": t_real[i],
                             "fve": float(fve(m_real[i])), "zero_vector_explanation": t_zero[i]})
    res["examples"] = examples
    if judge is not None:
        res["judge"] = judge[0]
    if "after_sft" in per_row and "after_rl" in per_row:   # paired by row: the same held-out activations
        a, b = per_row["after_rl"], per_row["after_sft"]
        res["rl_minus_sft"] = {k: ci(a[k] - b[k]) for k in a if k in b}
    if jax.process_index() == 0:
        # eval.json and, per row as evaluate's rows.jsonl, what benchmarks/paired_rows.py pairs across runs:
        # renamed into place together, so the two always describe the same evaluation
        fileio.replace_together({
            paths.join(workdir, "eval_rows.jsonl"): "".join(
                json.dumps({"row": int(rows[i]), "doc_id": str(docs[i]), "position": int(got["position"][i]),
                            "checkpoints": {name: recs[i] for name, recs in row_recs.items()}}) + "\n"
                for i in range(len(rows))),
            paths.join(workdir, "eval.json"): fileio.json_text(res)})
        print(report(res), file=sys.stdout, flush=True)
    writer.write("eval", 0, {"kind": "eval", **{f"{k}_real": v["real"]["mean"] for k, v in res["checkpoints"].items()},
                             "floor": res["floor"]["mean"]})
    return res


def spread_line(name: str, sp: dict) -> str:
    """One report line: the most common stated prediction and its share, beside the target's own."""
    e, t = sp["explanations"], sp.get("target")
    line = (f"  {name + ': most common prediction':34s} «{e['mode']}» in {e['mode_share']['mean']:.2f} of "
            f"{e['rows']} ({e['distinct']} distinct)")
    if t is not None and t["mode"] is not None:
        line += f"; the target's top-1: «{t['mode']}» in {t['mode_share']['mean']:.2f} ({t['distinct']} distinct)"
    return line


def report(res: dict) -> str:
    """eval.json as the table the trainer prints."""
    f = lambda d: f"{d['mean']:+.3f} " + (f"[{d['lo']:+.3f}, {d['hi']:+.3f}]" if d["lo"] is not None else "[n/a]")
    lines = [f"\nfve_nrm on {res['rows']} held-out rows from {res['documents']} documents "
             f"(95% CI over documents; Var(v_nrm)={res['var_nrm']:.3f}, centred={res['center']})",
             f"  {'renormalised-mean floor':34s} {f(res['floor'])}"]
    for name, c in res["checkpoints"].items():
        lines += [f"  {name + ': real activations':34s} {f(c['real'])}",
                  f"  {name + ': shuffled activations':34s} {f(c['shuffled'])}",
                  f"  {name + ': real - shuffled (paired)':34s} {f(c['real_minus_shuffled'])}",
                  f"  {name + ': real - floor (paired)':34s} {f(c['real_minus_floor'])}",
                  f"  {name + ': names the current token':34s} {f(c['names_current_token'])}",
                  f"  {name + ': quoted spans not in context':34s} "
                  + (f(c["quotes_absent"]) if c["quotes_absent"]["mean"] is not None else "n/a (no quotes)"),
                  *([f"  {name + ': preceding text right':34s} {f(c['preceding_correct'])}   (stated in "
                     f"{c['states_preceding']['mean']:.2f})"] if c.get("preceding_correct", {}).get("mean") is not None
                    else []),
                  *([f"  {name + ': names the top-1 next token':34s} {f(c['names_top1_prediction'])}"]
                    if "names_top1_prediction" in c else []),
                  *([spread_line(name, c["prediction_spread"])] if c.get("prediction_spread", {}).get(
                      "explanations", {}).get("mode") is not None else []),
                  f"  {name + ': extraction failures':34s} {c['extract_fail']:.2f}   mean length {c['expl_len']:.1f} tok"
                  f"   differs from zero-vector text {c['differs_from_zero']:.2f}"]
        if "judge_real" in c:
            lines += [f"  {name + ': fixed judge, real':34s} {f(c['judge_real'])}",
                      f"  {name + ': fixed judge, real - shuffled':34s} {f(c['judge_real_minus_shuffled'])}"]
        if "kl_to_ref_per_token" in c and c["kl_to_ref_per_token"]["mean"] is not None:
            lines.append(f"  {name + ': KL to the SFT AV / token':34s} {f(c['kl_to_ref_per_token'])}")
    for k, d in res.get("rl_minus_sft", {}).items():
        reader = "fixed judge " + res.get("judge", "") if k == "judge" else "each pair's own AR"
        lines.append(f"  {'after RL - after SFT (paired)':34s} {f(d)}   read by {reader}")
    for e in res["examples"]:
        lines += [f"\n[{e['checkpoint']}] context: …{e['context']!r}", f"   explanation (fve {e['fve']:+.2f}): "
                  f"{e['explanation']!r}"]
    return "\n".join(lines)
