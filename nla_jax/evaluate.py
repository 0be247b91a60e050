"""Evaluate trained NLA checkpoints on the held-out split of an activation store, side by side.

    python -m nla_jax.evaluate --config configs/smollm2_135m.py:quick \\
        --checkpoint runs/smollm2_135m_quick/train/sft_av --checkpoint runs/smollm2_135m_quick/train/rl \\
        --out runs/smollm2_135m_quick/evaluate

A checkpoint is a trainer work directory (its final pair), WORKDIR/rl, WORKDIR/rl@STEP or
WORKDIR/sft_av (the SFT pair); see nla_jax/nla/workdir.py (load_pair). Each pair is loaded with the config and
statistics it was trained with; the --config supplies the store (data.store; its split eval.split
is evaluated), the mesh and the `eval` section. Every pair's target (model file, layer, width) must
be the store's.

Per checkpoint, on the same rows (eval.rows of eval.split, a seeded choice), each number a mean
over rows with a 95% interval over documents (nla/measure.py has the exact definitions): a
cluster-robust t-interval (t with documents - 1 degrees of freedom; it keeps 95% coverage with few
documents, where a percentile bootstrap covers ~90% at 8) for means and for the paired differences
explanation - floor and explanation - shuffled (per-row differences on the same rows); a document
bootstrap (eval.n_boot) for ratios of totals (loss recovered, quoted spans absent, KL per token):
  fve_nrm and cosine of the AR reading the AV's explanation (greedy unless eval.temperature > 0),
    beside: the renormalised-mean floor; the unnormalised training mean (fve ~0: a check);
    shuffled activations (explanations of other documents' rows, reordered, same AR); the empty explanation;
    the raw context (last eval.context_tokens tokens, decoded, read by the AR as an explanation);
    the teacher summary (rows that have one in the summaries file), with the explanation on the
    same rows;
  explanation length (mean, histogram) and extraction failures (no closing tag or empty);
  KL to the reference verbalizer: exact KL(AV || ref) over the vocabulary at each generated token
    of the AV's own explanations (teacher forced), per token and per explanation. The reference is
    the RL checkpoint's KL reference (its sft_av stage); for an SFT pair, the target-initialised
    verbalizer SFT started from;
  claim accuracy (nla/claims.py; every row, shuffled explanations as the chance level): the share
    of explanations naming the current token exactly / exactly or nearly, naming the target's own
    top-1 next token among their stated predictions (with eval.downstream, from its forward pass),
    quoting anything, and of quoted spans ("...", “...”, «...», `...`; span-level, pooled over rows)
    absent from the context window up to the position, near misses (one word or character off) set
    apart and reported beside; the share stating one prediction twice; the same checks of the
    teacher summary on its rows (suffix _teacher), what a verbalizer faithful to its warm start says;
  downstream: block K's output at the position replaced by the reconstruction (its direction at the
    original norm, the mean added back when centred) and the next-token KL to the unmodified model,
    against mean-ablation (the training mean vector there): loss recovered = 1 - KL_recon / KL_mean
    (ratio of totals); beside it the floor direction and the shuffled reconstruction;
  fve_nrm by token position (equal-count bins) and sample explanations.
With --judge DIR, one frozen AR (that pair's; e.g. WORKDIR/sft_av names the SFT AR, trained on
teacher text only) also reads every checkpoint's explanations, as decoded text: an AV's gain is then
separated from its own AR's recalibration (an RL AR learns to read its AV's habits). Every column
after the first gets its paired per-row difference from the first, under its own AR and under the
judge.

Writes OUTDIR/evaluate.json, OUTDIR/report.html (self-contained: inline SVG, no external
resources) and OUTDIR/rows.jsonl (one record per row: each checkpoint's explanation and per-row
scores, for paired analyses across evaluations: benchmarks/paired_rows.py) only once everything is
computed, through temporary files renamed into place, and prints the side-by-side table. OUTDIR
defaults to FIRST_CHECKPOINT_WORKDIR/evaluate.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from nla_jax import cli, fileio, metrics, paths, report, sampling, sharding, weights
from nla_jax.cli import cli_main
from nla_jax.data import store as store_lib
from nla_jax.data import summaries as summaries_lib
from nla_jax.errors import UserError
from nla_jax.nla import claims, measure, selftext
from nla_jax.nla import workdir as workdir_lib

FORMAT = "nla_jax.evaluate/1"


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", action="append", default=[], required=True, metavar="DIR",
                   help="WORKDIR, WORKDIR/rl, WORKDIR/rl@STEP or WORKDIR/sft_av (repeatable: one column each)")
    p.add_argument("--judge", default=None, metavar="DIR",
                   help="a checkpoint whose AR scores every checkpoint's explanations too (the fixed judge), "
                        "e.g. WORKDIR/sft_av for the SFT AR")
    p.add_argument("--out", default=None, metavar="OUTDIR",
                   help="where evaluate.json and report.html go (default: FIRST_WORKDIR/evaluate)")
    return cli.add_distributed_flags(p)


# ============================================================================= checks (cheap, before any model)

@dataclasses.dataclass
class Plan:
    path: str
    workdir: str
    kind: str
    step: int
    cfg: object          # the saved training config


def check_settings(E) -> None:
    for key in ("batch", "position_bins", "context_tokens", "n_boot"):
        if int(E[key]) < 1:
            raise UserError(f"config key eval.{key}={E[key]} must be >= 1")
    for key in ("rows", "n_examples", "quote_window", "seq_multiple", "sample_context_tokens"):
        if int(E[key]) < 0 or (key in ("rows", "seq_multiple") and int(E[key]) < 1):
            raise UserError(f"config key eval.{key}={E[key]} is out of range")


def plan(path: str) -> Plan:
    """Resolve a checkpoint path and read its saved config (metadata only)."""
    workdir, kind, step = workdir_lib.resolve(path)
    first = paths.join(workdir, "rl" if kind == "rl" else "sft_av")
    step, meta = workdir_lib.saved_meta(first, step)
    return Plan(path, workdir, kind, step, workdir_lib.config_from_meta(meta, first))


def check_target(p: Plan, store) -> None:
    """The store must hold activations of the pair's own target at its layer (one line otherwise)."""
    man = store.manifest
    meta = man.get("meta", {})
    try:
        d = weights.peek_config(p.cfg.model).d_model
    except UserError as e:
        raise UserError(f"checkpoint {p.path}: its target model does not load ({e})") from None
    if meta.get("layer") != p.cfg.model.layer or man.get("d") != d:
        raise UserError(f"store {store.root} holds layer {meta.get('layer')} (d={man.get('d')}) activations, but "
                        f"checkpoint {p.path} explains layer {p.cfg.model.layer} of a d={d} model")
    want = meta.get("model", {}).get("checksum")
    if want:
        have = weights.model_checksum(p.cfg.model.source)
        if have != want:
            raise UserError(f"store {store.root} was extracted from model {meta['model'].get('source')!r} "
                            f"(sha256 {want[:12]}), but checkpoint {p.path} was trained on "
                            f"{p.cfg.model.source!r} (sha256 {have[:12]})")


def unique_labels(plans: list[Plan]) -> list[str]:
    labels = [f"{paths.basename(p.workdir)}/{p.kind}@{p.step}" for p in plans]
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            labels[i] = f"{paths.basename(paths.dirname(plans[i].workdir))}/{lab}"
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            labels[i] = f"{lab}#{i + 1}"
    return labels


# ============================================================================= one pair

def evaluate_pair(p, D: dict, E, bar) -> dict:
    """Every measurement of one loaded pair on the rows D (acts, doc_id, position, tokens, summaries)."""
    run = p.run
    tok = run.tokenizer
    acts, docs, pos, toks = D["acts"], D["doc_id"], D["position"], D["tokens"]
    n, B = len(acts), int(E.batch)
    center = run.ctx.center
    var = run.stats.var(center)
    t = measure.targets(acts, run.stats, center)
    ci = lambda v, d=docs: measure.ci(v, d)
    sc = sampling.SampleConfig(max_new_tokens=run.ctx.av.max_len, temperature=max(float(E.temperature), 1e-6),
                               greedy=E.temperature <= 0)
    perm = measure.derangement_by_doc(docs, E.seed)
    tick = lambda k: bar.update(k)
    res: dict = {"label": p.label, "path": p.path, "workdir": p.workdir, "kind": p.kind, "step": p.step,
                 "center": center, "var_nrm": var, "inject": run.ctx.av.mode, "max_len": run.ctx.av.max_len}
    with sharding.use_mesh(run.mesh, run.rules):
        bar.set_postfix_str("explain")
        real = measure.explain_rows(run, p.av, acts, B, sc, E.seed, tick)
        shuf = measure.permuted(real, perm)          # explanations of other documents' rows
        bar.set_postfix_str("reconstruct")
        pred = measure.reconstruct(run, p.ar, real["tokens"], real["expl_len"], B, tick)
        pred_shuf = measure.reconstruct(run, p.ar, shuf["tokens"], shuf["expl_len"], B, tick)
        pred_empty = measure.reconstruct(run, p.ar, np.zeros((1, run.ctx.ar.max_len), np.int32), np.zeros(1, np.int32),
                                         B, tick)
        ctx_texts = [measure.context_text(tok, toks[i], int(pos[i]), E.context_tokens) for i in range(n)]
        ce, cl = measure.texts_to_expl(tok, ctx_texts, run.ctx.ar, keep="end")
        pred_ctx = measure.reconstruct(run, p.ar, ce, cl, B, tick)
        have = np.array([i for i in range(n) if D["rows"][i] in D["summaries"]], np.int64)
        pred_teacher = None
        if len(have):
            te, tl = measure.texts_to_expl(tok, [D["summaries"][D["rows"][i]] for i in have], run.ctx.ar)
            pred_teacher = measure.reconstruct(run, p.ar, te, tl, B, tick)

        # -- fve / cosine, each beside the floor and the shuffled control
        mse = {"real": measure.mse_rows(pred, t), "floor": measure.floor_mse(t, run.stats, center),
               "mean": measure.mean_mse(t, run.stats, center), "shuffled": measure.mse_rows(pred_shuf, t),
               "empty": measure.mse_rows(pred_empty, t), "context": measure.mse_rows(pred_ctx, t)}
        f = {k: measure.fve(v, var) for k, v in mse.items()}
        res["fve"] = {k: ci(v) for k, v in f.items()}
        res["fve"]["real_minus_shuffled"] = ci(f["real"] - f["shuffled"])      # paired: same rows
        res["fve"]["real_minus_floor"] = ci(f["real"] - f["floor"])
        res["cosine"] = {k: ci(measure.cosine(v)) for k, v in mse.items() if k != "mean"}
        if pred_teacher is not None:
            m_t = measure.mse_rows(pred_teacher, t[have])
            res["fve"]["teacher"] = ci(measure.fve(m_t, var), docs[have])
            res["fve"]["teacher_rows_real"] = ci(f["real"][have], docs[have])
            res["cosine"]["teacher"] = ci(measure.cosine(m_t), docs[have])
        else:
            res["fve"]["teacher"] = res["fve"]["teacher_rows_real"] = res["cosine"]["teacher"] = ci([], [])
        eval_nrm = t - t.mean(0, keepdims=True)
        res["var_nrm_eval"] = float((eval_nrm ** 2).mean())

        # -- explanations: failures, length
        ok = real["ok"].astype(bool)
        res["extract_fail"] = ci((~ok).astype(np.float64))
        res["extract_fail_shuffled"] = ci((~shuf["ok"].astype(bool)).astype(np.float64))
        lens = real["expl_len"].astype(np.int64)
        res["length"] = {"mean": ci(lens[ok], docs[ok]) if ok.any() else ci([], []),
                         "mean_all_rows": ci(lens),
                         "hist": np.bincount(lens[ok], minlength=run.ctx.av.max_len + 1).tolist(),
                         "failed": int((~ok).sum())}
        texts = measure.decode_explanations(tok, real)
        texts_shuf = measure.decode_explanations(tok, shuf)
        ctxs = claims.row_contexts(tok, toks, pos, E.quote_window)     # what each row's claims are checked against

        # -- KL to the reference verbalizer
        res["kl_ref"] = {"ref": None, "per_token": ci([], []), "per_explanation": ci([], [])}
        if E.kl_ref:
            bar.set_postfix_str("KL to reference")
            where, ref = workdir_lib.reference_av(p)
            kl = measure.av_kl_rows(run, p.av, ref, acts, real, B, tick)
            del ref
            res["kl_ref"] = {"ref": where, "per_token": measure.ratio_ci(kl["kl_sum"], kl["tokens"], docs, E.n_boot, E.seed),
                             "per_explanation": ci(kl["kl_sum"])}

        # -- downstream: block K's output replaced at the position
        res["downstream"] = None
        if E.downstream:
            bar.set_postfix_str("downstream")
            mean_raw = run.stats.mean_array().astype(np.float64)
            cmean = mean_raw if center else None
            floor_dir = run.stats.floor_prediction(center)
            kls = np.zeros((n, 4))
            top1 = np.zeros(n, np.int64)
            rel = np.zeros(n)
            for idx, tk, ps in measure.context_batches(toks, pos, B, E.seq_multiple, run.model_cfg.pad_id):
                xk, h = measure.block_output(run, tk, ps)
                repl = np.stack([np.broadcast_to(mean_raw, h.shape),
                                 measure.denormalise(np.broadcast_to(floor_dir, h.shape), h, cmean),
                                 measure.denormalise(pred[idx], h, cmean),
                                 measure.denormalise(pred_shuf[idx], h, cmean)], axis=1)
                kls[idx], top1[idx] = measure.next_token_kl(run, xk, ps, repl, with_top1=True)
                rel[idx] = np.linalg.norm(h - acts[idx], axis=-1) / np.maximum(np.linalg.norm(acts[idx], axis=-1), 1e-12)
                tick(1)
            km = kls[:, 0]
            lr = lambda k: measure.ratio_ci(k, km, docs, E.n_boot, E.seed, transform=lambda r: 1.0 - r)
            res["downstream"] = {
                "kl_mean": ci(km), "kl_floor": ci(kls[:, 1]), "kl_recon": ci(kls[:, 2]), "kl_shuffled": ci(kls[:, 3]),
                "loss_recovered": lr(kls[:, 2]), "loss_recovered_floor": lr(kls[:, 1]),
                "loss_recovered_shuffled": lr(kls[:, 3]),
                # block K recomputed from the stored context vs the stored activation: a store/target check
                "recompute_rel_err_max": float(rel.max()), "recompute_rel_err_median": float(np.median(rel))}
            # the target's own top-1 next token here, for the claim that the explanation predicts it
            ctxs = [dataclasses.replace(c, top1=selftext.token_text(tok, x)) for c, x in zip(ctxs, top1)]

        # -- claim accuracy (nla/claims.py), every row (a failed extraction is read up to its cap), beside
        # the same checks of the shuffled control's explanations (chance level)
        checks = [claims.check_row(texts[i], ctxs[i]) for i in range(n)]
        res["claims"] = {**claims.summary(checks, docs, E.n_boot, E.seed),
                         **claims.summary([claims.check_row(texts_shuf[i], ctxs[i]) for i in range(n)], docs,
                                          E.n_boot, E.seed, suffix="_shuffled"),
                         "prediction_spread": claims.prediction_spread(checks, docs)}
        if len(have):   # the same checks of the teacher text on its rows: what a faithful verbalizer would say
            res["claims"].update(claims.summary(
                [claims.check_row(D["summaries"][D["rows"][i]], ctxs[i]) for i in have], docs[have],
                E.n_boot, E.seed, suffix="_teacher"))

    # -- fve by token position (equal-count bins of the evaluated positions)
    edges = np.unique(np.quantile(pos, np.linspace(0, 1, int(E.position_bins) + 1)).round().astype(np.int64))
    which = np.clip(np.searchsorted(edges[1:-1], pos, side="right"), 0, max(len(edges) - 2, 0))
    res["by_position"] = []
    for b in range(max(len(edges) - 1, 1)):
        sel = which == b
        if not sel.any():
            continue
        res["by_position"].append({"lo": int(pos[sel].min()), "hi": int(pos[sel].max()), "n": int(sel.sum()),
                                   "real": ci(f["real"][sel], docs[sel]), "floor": ci(f["floor"][sel], docs[sel]),
                                   "shuffled": ci(f["shuffled"][sel], docs[sel])})

    # -- samples: one row per document, first documents in row order
    first = sorted(np.unique(docs, return_index=True)[1])[:int(E.n_examples)]
    res["samples"] = [{"row": int(D["rows"][i]), "doc_id": str(docs[i]), "position": int(pos[i]),
                       "context": measure.context_text(tok, toks[i], int(pos[i]), E.sample_context_tokens),
                       "explanation": texts[i], "ok": bool(ok[i]), "fve": float(f["real"][i]),
                       "floor": float(f["floor"][i]), "shuffled_explanation": texts_shuf[i],
                       "fve_shuffled": float(f["shuffled"][i])} for i in first]
    # for the judge and the paired comparisons between columns (main drops them before writing)
    res["_texts"], res["_fve_real"], res["_fve_floor"] = (texts, texts_shuf), f["real"], f["floor"]
    # one record per row for rows.jsonl: what a later analysis pairs by row (across checkpoints, seeds, runs)
    res["_rows"] = [{"explanation": texts[i], "ok": bool(ok[i]), "fve": float(f["real"][i]),
                     "fve_floor": float(f["floor"][i]), "fve_shuffled": float(f["shuffled"][i]), **checks[i]}
                    for i in range(n)]
    return res


def judge_scores(judge, results: list[dict], acts: np.ndarray, docs: np.ndarray, batch: int) -> None:
    """The fixed judge's fve_nrm of every checkpoint's real and shuffled explanations (decoded text,
    tokenised for the judge's own wrapper), and each column's paired difference from the first under
    its own AR and under the judge; stored in each result as "judge" and "vs_first"."""
    run = judge.run
    t = measure.targets(acts, run.stats, run.ctx.center)
    var = run.stats.var(run.ctx.center)
    floor = measure.fve(measure.floor_mse(t, run.stats, run.ctx.center), var)
    with sharding.use_mesh(run.mesh, run.rules):
        for res in results:
            f = [measure.fve(measure.mse_rows(measure.reconstruct(
                    run, judge.ar, *measure.texts_to_expl(run.tokenizer, tx, run.ctx.ar), batch), t), var)
                 for tx in res["_texts"]]
            res["_fve_judge"] = f[0]
            for i, r in enumerate(res["_rows"]):
                r["fve_judge"] = float(f[0][i])
            res["judge"] = {"real": measure.ci(f[0], docs), "shuffled": measure.ci(f[1], docs),
                            "real_minus_floor": measure.ci(f[0] - floor, docs),
                            "real_minus_shuffled": measure.ci(f[0] - f[1], docs)}


def compare_to_first(results: list[dict], docs: np.ndarray) -> None:
    """Each column after the first: its per-row fve minus the first column's on the same rows."""
    first = results[0]
    for res in results[1:]:
        res["vs_first"] = {"own": measure.ci(res["_fve_real"] - first["_fve_real"], docs)}
        if "_fve_judge" in res:
            res["vs_first"]["judge"] = measure.ci(res["_fve_judge"] - first["_fve_judge"], docs)


def total_batches(n: int, n_teacher: int, E) -> int:
    nb = measure.n_batches(n, int(E.batch))
    return 4 * nb + 1 + (measure.n_batches(n_teacher, int(E.batch)) if n_teacher else 0) + nb * bool(E.kl_ref) \
        + nb * bool(E.downstream)


# ============================================================================= training curves

def training_curves(workdir: str) -> dict:
    """fve and reward against step from a run's metrics.jsonl (RL rollouts; SFT-AR validation)."""
    recs = metrics.read(paths.join(workdir, "metrics.jsonl"))
    rl = sorted((r for r in recs if r.get("stage") == "rl" and r.get("kind") is None and "fve_nrm" in r),
                key=lambda r: r["step"])
    ar = sorted((r for r in recs if r.get("stage") == "sft_ar" and r.get("kind") == "eval" and "fve_nrm" in r),
                key=lambda r: r["step"])
    return {"rl": [{"step": r["step"], "fve_nrm": r["fve_nrm"], "reward_mean": r.get("reward_mean")} for r in rl],
            "sft_ar_val": [{"step": r["step"], "fve_nrm": r["fve_nrm"], "floor": r.get("floor")} for r in ar]}


# ============================================================================= table

ROWS = (  # (key path, label); one line per row, one column per checkpoint
    ("fve.real", "fve_nrm   explanation"),
    ("fve.floor", "fve_nrm   floor: renormalised training mean"),
    ("fve.mean", "fve_nrm   unnormalised training mean (check ~0)"),
    ("fve.shuffled", "fve_nrm   shuffled activations (control)"),
    ("fve.real_minus_floor", "fve_nrm   explanation - floor (paired)"),
    ("fve.real_minus_shuffled", "fve_nrm   explanation - shuffled (paired)"),
    ("fve.empty", "fve_nrm   empty explanation"),
    ("fve.context", "fve_nrm   raw context, last N tokens"),
    ("judge.real", "fve_nrm   explanation, fixed judge AR"),
    ("judge.shuffled", "fve_nrm   shuffled, fixed judge AR"),
    ("judge.real_minus_floor", "fve_nrm   explanation - floor, fixed judge"),
    ("judge.real_minus_shuffled", "fve_nrm   explanation - shuffled, fixed judge"),
    ("vs_first.own", "fve_nrm   minus first column, paired (own AR)"),
    ("vs_first.judge", "fve_nrm   minus first column, paired (judge)"),
    ("fve.teacher", "fve_nrm   teacher summary (its rows)"),
    ("fve.teacher_rows_real", "fve_nrm   explanation on teacher rows"),
    ("cosine.real", "cosine    explanation"),
    ("cosine.floor", "cosine    floor"),
    ("cosine.shuffled", "cosine    shuffled activations"),
    ("cosine.empty", "cosine    empty explanation"),
    ("cosine.context", "cosine    raw context"),
    ("cosine.teacher", "cosine    teacher summary"),
    ("downstream.loss_recovered", "loss recovered   reconstruction"),
    ("downstream.loss_recovered_floor", "loss recovered   floor direction"),
    ("downstream.loss_recovered_shuffled", "loss recovered   shuffled reconstruction"),
    ("downstream.kl_recon", "next-token KL    reconstruction (nats)"),
    ("downstream.kl_floor", "next-token KL    floor direction"),
    ("downstream.kl_shuffled", "next-token KL    shuffled reconstruction"),
    ("downstream.kl_mean", "next-token KL    mean-ablation"),
    ("kl_ref.per_token", "KL to reference AV, per token"),
    ("kl_ref.per_explanation", "KL to reference AV, per explanation"),
    ("extract_fail", "extraction failures"),
    ("extract_fail_shuffled", "extraction failures, shuffled"),
    ("length.mean", "explanation length (tokens, extracted)"),
    ("claims.current_token_exact", "claims: names the current token, exact"),
    ("claims.current_token_named", "claims: names the current token, exact or near"),
    ("claims.current_token_named_shuffled", "claims: names it, shuffled (chance)"),
    ("claims.names_top1_prediction", "claims: names the target's top-1 next token"),
    ("claims.names_top1_prediction_shuffled", "claims: names top-1 next, shuffled (chance)"),
    ("claims.names_top1_prediction_teacher", "claims: names top-1 next, teacher text"),
    ("claims.repeats_prediction", "claims: repeats a stated prediction, of >= 2"),
    ("claims.repeats_prediction_teacher", "claims: repeats one, teacher text"),
    ("claims.states_preceding", "claims: states the preceding text (after «…»)"),
    ("claims.preceding_correct", "claims: preceding text right, of stated"),
    ("claims.preceding_correct_shuffled", "claims: preceding text right, shuffled (chance)"),
    ("claims.quotes_absent", "claims: quoted spans not in context"),
    ("claims.quotes_near", "claims: quoted spans, near misses"),
    ("claims.quotes_absent_shuffled", "claims: quoted spans not in context, shuffled"),
    ("claims.with_quotes", "claims: explanations with a quote"),
    ("claims.prediction_spread.explanations.mode", "claims: most common stated prediction"),
    ("claims.prediction_spread.explanations.mode_share", "claims: its share of rows stating one"),
    ("claims.prediction_spread.target.mode_share", "claims: target's most common top-1, share"),
)


def lookup(res: dict, key: str):
    cur = res
    for k in key.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, dict):
        if v.get("mean") is None:
            return "n/a"
        if v.get("lo") is None:        # one document: no interval
            return f"{v['mean']:+.3f} [n/a]"
        small = max(abs(v["mean"]), abs(v["lo"]), abs(v["hi"])) < 0.01 and v["hi"] > 0
        f = (lambda x: f"{x:+.1e}") if small else (lambda x: f"{x:+.3f}")
        return f"{f(v['mean'])} [{f(v['lo'])}, {f(v['hi'])}]"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def table(doc: dict) -> str:
    cks = doc["checkpoints"]
    w0 = max(len(lab) for _, lab in ROWS) + 2
    w = max(len(x) for c in cks for x in [c["label"], *(fmt(lookup(c, k)) for k, _ in ROWS)]) + 3
    lines = [f"\n{doc['rows']} rows of split {doc['split']!r} from {doc['documents']} documents in {doc['store']} "
             f"(mean [95% CI over documents: cluster-robust t for means and paired differences, bootstrap for "
             f"ratios])",
             " " * w0 + "".join(c["label"].rjust(w) for c in cks)]
    for key, lab in ROWS:
        lines.append(lab.ljust(w0) + "".join(fmt(lookup(c, key)).rjust(w) for c in cks))
    extra = [("Var(v_nrm) train / eval rows", lambda c: f"{c['var_nrm']:.3f} / {c['var_nrm_eval']:.3f}"),
             ("teacher rows", lambda c: str(c["fve"]["teacher"]["n"])),
             ("reference AV", lambda c: paths.basename(str(c["kl_ref"]["ref"])) if c["kl_ref"]["ref"] else "n/a")]
    for lab, get in extra:
        lines.append(lab.ljust(w0) + "".join(get(c).rjust(w) for c in cks))
    return "\n".join(lines)


# ============================================================================= output

def _plain(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def row_records(D: dict, results: list[dict]) -> list[dict]:
    """rows.jsonl: per evaluated row its ids and, per checkpoint label, the explanation and its per-row
    scores (fve under its own AR, the floor, the shuffled control, the judge's fve with --judge) and
    claims. The JSON's means are these rows' means; paired analyses across checkpoints, seeds or
    separate evaluations of the same rows (benchmarks/paired_rows.py) start here."""
    return [{"row": int(D["rows"][i]), "doc_id": str(D["doc_id"][i]), "position": int(D["position"][i]),
             "checkpoints": {res["label"]: res["_rows"][i] for res in results}} for i in range(len(D["rows"]))]


def write_outputs(out: str, doc: dict, html: str, rows: list[dict] | None = None) -> None:
    """evaluate.json, report.html and (given) rows.jsonl, all renamed into place only after all are written."""
    paths.makedirs(out)
    files = {paths.join(out, "evaluate.json"): fileio.json_text(doc, default=_plain, allow_nan=True),
             paths.join(out, "report.html"): html}
    if rows is not None:
        files[paths.join(out, "rows.jsonl")] = "".join(json.dumps(r) + "\n" for r in rows)
    fileio.replace_together(files)


# ============================================================================= main

@cli_main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli.quiet_orbax_readonly()
    args, cfg = cli.parse(build_parser(), argv)
    cli.start_distributed(args)      # before anything (checkpoint metadata, the store) starts a JAX backend
    E = cfg.eval
    check_settings(E)
    plans = [plan(c) for c in args.checkpoint]        # bad paths / damaged metadata: one line, before any model
    judge_plan = plan(args.judge) if args.judge else None
    store = store_lib.open_store(cfg.data.store)
    for p in plans + ([judge_plan] if judge_plan else []):
        check_target(p, store)
    out = paths.absolute(args.out or paths.join(plans[0].workdir, "evaluate"))
    if paths.exists(out) and not paths.isdir(out):
        raise UserError(f"--out {out}: exists and is not a directory")
    rows = np.sort(store.rows_of_split(E.split))
    if len(rows) == 0:
        raise UserError(f"store {cfg.data.store} has no rows in split {E.split!r} (config key eval.split)")
    rows = measure.pick_rows(store, E.split, int(E.rows), int(E.seed))
    D = store.read(None, rows, fields=("acts", "doc_id", "position", "tokens"))
    D["rows"] = rows.tolist()
    summ_path = E.summaries or summaries_lib.path_in(cfg.data.store)
    D["summaries"] = {r: t for r, t in summaries_lib.read_texts(summ_path).items() if r in set(D["rows"])}

    cli.enable_compilation_cache()
    t0 = time.time()
    labels = unique_labels(plans)
    results = []
    for p, label in zip(plans, labels):
        pr = workdir_lib.load_pair(p.path, mesh_cfg=cfg.mesh, rules=cfg.rules, label=label)
        pr.run.batch_layout.check(int(E.batch), "eval.batch")    # every batch split into whole data shards
        with tqdm(total=total_batches(len(rows), len(D["summaries"]), E), desc=label, unit="batch",
                  dynamic_ncols=True, file=sys.stderr, disable=jax.process_index() != 0) as bar:
            results.append(evaluate_pair(pr, D, E, bar))
        del pr
    docs = D["doc_id"]
    if judge_plan is not None:
        judge = workdir_lib.load_pair(args.judge, mesh_cfg=cfg.mesh, rules=cfg.rules, label="judge")
        print(f"fixed judge: the AR of {args.judge} reads every checkpoint's explanations", file=sys.stderr)
        judge_scores(judge, results, D["acts"], docs, int(E.batch))
        del judge
    compare_to_first(results, docs)
    rows_out = row_records(D, results)
    for res in results:
        for k in [k for k in res if k.startswith("_")]:
            del res[k]

    doc = {"format": FORMAT, "command": ["python", "-m", "nla_jax.evaluate", *argv],
           "config": args.config, "store": paths.absolute(cfg.data.store), "split": E.split,
           "rows": int(len(rows)), "documents": int(len(np.unique(docs))), "row_ids": D["rows"],
           "row_records": "rows.jsonl",
           "teacher_summaries": summ_path, "teacher_rows": len(D["summaries"]), "judge": args.judge,
           "settings": E.to_dict(), "devices": jax.device_count(), "elapsed_s": None,
           "ci": {"level": 0.95, "means": "cluster-robust (CR1) t-interval over documents, documents - 1 df "
                                           "(stats.cluster_t_ci); paired differences use per-row differences",
                  "ratios": f"percentile bootstrap over documents, {int(E.n_boot)} resamples"},
           "checkpoints": results,
           "training_curves": {w: training_curves(w) for w in dict.fromkeys(r["workdir"] for r in results)}}
    doc["elapsed_s"] = round(time.time() - t0, 1)
    if jax.process_index() != 0:      # every process computed the same numbers; one writes them
        return 0
    html = report.render(doc, ROWS, fmt, lookup)
    write_outputs(out, doc, html, rows_out)
    print(table(doc), flush=True)
    print(f"\nwrote {paths.join(out, 'evaluate.json')}, report.html and rows.jsonl in {doc['elapsed_s']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
