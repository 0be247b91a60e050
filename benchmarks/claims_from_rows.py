"""Claim accuracy recomputed from saved explanations: no model, no decoding.

    .venv/bin/python benchmarks/claims_from_rows.py runs/ev/evaluate --config configs/smollm2_135m.py:quick \\
        [--config.data.store=STORE] [--name NAME]

Reads EVALDIR/rows.jsonl (evaluate) or WORKDIR/eval_rows.jsonl (the trainer's eval stage), the rows'
tokens and positions from the store of --config, and the target's tokenizer, and scores every
checkpoint's saved explanations with nla/claims.py as it is now: the current token named, the
preceding text ("after «…»") stated and right, quoted spans absent from the context window
(eval.quote_window tokens) once near misses are set apart, and the target's top-1 next token among
the stated predictions where the store holds it (data.top_k > 0, or the predict warm start's
records, as the eval stage finds it); each beside its chance level (nla/claims.py summary), the same
checks of the explanations reordered by evaluate's shuffled control (other documents' rows,
measure.derangement_by_doc with eval.seed). Use it when a claim check is added or
changed after an expensive evaluation: the explanations do not change, only how they are read.
Intervals as evaluate's: cluster-robust t over documents for shares of rows, a document bootstrap
(eval.n_boot) for ratios of totals. Also the spread of the stated predictions beside the target's own
(claims.prediction_spread), the top-1 claim by the target's own top-1 probability (stores with
predictions), and the same checks of the rows' warm-start text ("teacher_text": what a verbalizer
faithful to its warm start would be scored) where the store's summaries cover them. Prints a table and writes benchmarks/results/claims_<NAME>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nla_jax import configlib, weights  # noqa: E402
from nla_jax.data import summaries as summaries_lib  # noqa: E402
from nla_jax.data import store as store_lib  # noqa: E402
from nla_jax.errors import UserError  # noqa: E402
from nla_jax.nla import claims, evaluation, measure  # noqa: E402
from paired_rows import Bad, read_rows  # noqa: E402
from record import write_result  # noqa: E402


def score(recs: list[dict], store, tok, E) -> tuple[dict, dict | None]:
    """({checkpoint: claims}, the same claims of the rows' warm-start text or None)."""
    rows = np.array([r["row"] for r in recs], np.int64)
    got = store.read(None, rows, fields=("doc_id", "position", "tokens")
                     + (("top_ids", "top_probs") if store.top_k else ()))
    if [str(d) for d in got["doc_id"]] != [r["doc_id"] for r in recs] or \
            got["position"].tolist() != [r["position"] for r in recs]:
        raise Bad("the rows' documents or positions differ from the store's: the evaluation was of another store")
    docs = got["doc_id"]
    ctxs = claims.row_contexts(tok, got["tokens"], got["position"], int(E.quote_window),
                               evaluation.target_top1(store, tok, rows, got))   # top-1 where stored or recorded
    perm = measure.derangement_by_doc(docs, int(E.seed))     # evaluate's shuffled control: other documents' rows
    out = {}
    for label in recs[0]["checkpoints"]:
        real = [r["checkpoints"][label]["explanation"] for r in recs]
        out[label] = {}
        for suffix, tx in (("", real), ("_shuffled", [real[j] for j in perm])):
            checks = [claims.check_row(t, c) for t, c in zip(tx, ctxs)]
            out[label].update(claims.summary(checks, docs, int(E.n_boot), int(E.seed), suffix=suffix))
            if not suffix:
                out[label]["prediction_spread"] = claims.prediction_spread(checks, docs)
                if "top_probs" in got and "names_top1" in checks[0]:
                    out[label]["names_top1_by_confidence"] = by_confidence(
                        np.array([c["names_top1"] for c in checks], np.float64), got["top_probs"][:, 0], docs)
    # the warm-start (teacher) text of the same rows, where the store's summaries cover them (summarize.splits
    # with the eval split): what a verbalizer faithful to its warm start would be scored
    texts = summaries_lib.read_texts(summaries_lib.path_in(store.root))
    have = [i for i, r in enumerate(rows.tolist()) if r in texts]
    teacher = None
    if have:
        checks = [claims.check_row(texts[int(rows[i])], ctxs[i]) for i in have]
        teacher = {"rows": len(have), **claims.summary(checks, docs[have], int(E.n_boot), int(E.seed))}
    return out, teacher


CONFIDENCE_EDGES = (0.0, 0.2, 0.5, 1.0)    # the target's top-1 probability: unsure / leaning / confident


def by_confidence(named: np.ndarray, p_top1: np.ndarray, docs: np.ndarray) -> list[dict]:
    """The top-1 claim's share per bin of the target's own top-1 probability (CONFIDENCE_EDGES; the
    last bin includes 1.0), each with its interval over the bin's documents: does the verbalizer name
    what the target predicts when the target is sure of it, and not otherwise?"""
    out = []
    for lo, hi in zip(CONFIDENCE_EDGES[:-1], CONFIDENCE_EDGES[1:]):
        sel = (p_top1 >= lo) & ((p_top1 < hi) | (hi == CONFIDENCE_EDGES[-1]))
        out.append({"lo": lo, "hi": hi, "rows": int(sel.sum()),
                    "names_top1": measure.ci(named[sel], docs[sel])})
    return out


def fmt(d: dict) -> str:
    if d.get("mean") is None:
        return "n/a"
    return f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]" if d["lo"] is not None else f"{d['mean']:.3f}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("evaldir", help="an evaluate OUTDIR (rows.jsonl) or a trainer work directory (eval_rows.jsonl)")
    p.add_argument("--config", required=True, help="the config whose store (data.store) and eval section to use")
    p.add_argument("--name", default=None, help="names the result file claims_NAME.json (default: EVALDIR's name)")
    p.add_argument("--out", default=None)
    try:
        rest, overrides = configlib.split_config_args(argv)
        args = p.parse_args(rest)
        cfg = configlib.get(args.config, overrides)
        recs = read_rows(args.evaldir)
        if not recs:
            raise Bad(f"{args.evaldir}: no rows")
        store = store_lib.open_store(cfg.data.store)
        _, tok = weights.config_and_tokenizer(cfg.model)
        scored, teacher = score(recs, store, tok, cfg.eval)
        res = {"evaldir": os.path.abspath(args.evaldir), "store": os.path.abspath(cfg.data.store), "rows": len(recs),
               "documents": len({r["doc_id"] for r in recs}), "checkpoints": scored, "teacher_text": teacher}
    except (Bad, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{res['rows']} rows from {res['documents']} documents ({args.evaldir}); 95% CIs over documents")
    print(f"\n{'checkpoint':28s} {'current token':>22s} {'states preceding':>18s} {'preceding right':>22s} "
          f"{'quoted spans absent':>22s} {'names top-1 next':>22s} {'repeats a prediction':>22s}")
    table = list(res["checkpoints"].items()) + ([("teacher text", teacher)] if teacher else [])
    for label, c in table:
        for suffix in ("", "_shuffled"):
            if suffix and c is teacher:
                continue
            print(f"{(label[-28:] if not suffix else '  shuffled (chance)'):28s} "
                  f"{fmt(c['current_token_named' + suffix]):>22s} {fmt(c['states_preceding' + suffix]):>18s} "
                  f"{fmt(c['preceding_correct' + suffix]):>22s} {fmt(c['quotes_absent' + suffix]):>22s} "
                  f"{fmt(c.get('names_top1_prediction' + suffix, {})):>22s} "
                  f"{fmt(c.get('repeats_prediction' + suffix, {})):>22s}")
    for label, c in res["checkpoints"].items():
        e, t = c["prediction_spread"]["explanations"], c["prediction_spread"].get("target")
        if e["mode"] is not None:
            print(f"{label[-28:]:28s} most common first prediction «{e['mode']}» in {fmt(e['mode_share'])} of "
                  f"{e['rows']} rows, {e['distinct']} distinct" + (
                      f"; the target's top-1 «{t['mode']}» in {fmt(t['mode_share'])}, {t['distinct']} distinct"
                      if t else ""))
        for b in c.get("names_top1_by_confidence", []):
            print(f"{'':28s} names the top-1 when the target gives it p in [{b['lo']:.1f}, {b['hi']:.1f}"
                  f"{']' if b['hi'] == 1.0 else ')'}: {fmt(b['names_top1'])} of {b['rows']} rows")
    name = args.name or os.path.basename(os.path.normpath(args.evaldir))
    write_result(args.out or os.path.join(REPO, "benchmarks", "results", f"claims_{name}.json"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
