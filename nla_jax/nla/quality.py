"""The trainer's final stage: explanation quality on held-out documents, with its controls.

For each finished checkpoint pair (after SFT: the SFT AV read by the SFT AR; after RL: the RL AV
read by the live RL AR) it explains every evaluation activation (greedy unless eval.temperature
> 0) and scores the text by the AR. Beside it, always:
  floor     the renormalised mean of the training vectors as a constant prediction;
  shuffled  explanations of *other rows'* activations (a permutation that never keeps a
            document), scored against the true activation: what the AR gets from the text
            alone when the text says nothing about this activation;
  zero      explanations of a zero vector: if these equal the real ones, injection failed.
Every number comes with a 95% bootstrap interval over documents (rows of one document move
together), and real - shuffled with a paired interval. Writes WORKDIR/eval.json.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from nla_jax import sampling
from nla_jax.nla import measure
from nla_jax.nla import stats as stats_lib


def _rows(S, split: str, n: int, seed: int) -> np.ndarray:
    rows = measure.pick_rows(S.store, split, n, seed)
    shards = jax.process_count() * int(np.prod([S.mesh.shape[a] for a in ("data", "fsdp")]))
    return rows[:len(rows) - len(rows) % shards]


# shared with `python -m nla_jax.evaluate` (nla/measure.py); kept here under their old names
derangement_by_doc = measure.derangement_by_doc
explain_rows = measure.explain_rows
score = measure.score


def run(S) -> dict:
    from nla_jax import train  # the stage loaders live in the trainer
    E = S.cfg.eval
    rows = _rows(S, E.split, E.rows, E.seed)
    got = S.store.read(None, rows, fields=("acts", "doc_id", "position", "tokens"))
    acts, docs = got["acts"], got["doc_id"]
    center = S.ctx.center
    var = S.stats.var(center)
    floor_mse = measure.floor_mse(measure.targets(acts, S.stats, center), S.stats, center)
    fve = lambda mse: 1.0 - mse / var
    ci = lambda v: stats_lib.bootstrap_ci(v, docs, E.n_boot, E.seed)
    perm = derangement_by_doc(docs, E.seed)
    sc = sampling.SampleConfig(max_new_tokens=S.ctx.av.max_len, temperature=max(E.temperature, 1e-6),
                               greedy=E.temperature <= 0)
    batch = min(S.cfg.rl.batch * S.cfg.rl.group_size, len(rows))
    while len(rows) % batch:
        batch -= 1
    res = {"rows": int(len(rows)), "documents": int(len(np.unique(docs))), "var_nrm": var, "center": center,
           "floor": dict(zip(("mean", "lo", "hi"), ci(fve(floor_mse)))), "checkpoints": {}}
    pairs = []
    if train.finished(S, "sft_av") and train.finished(S, "sft_ar"):
        _, _, i_av, t_av, a_av = train.sft_av_parts(S)
        _, _, i_ar, t_ar, a_ar = train.sft_ar_parts(S)
        pairs.append(("after_sft", train.load_final(S, "sft_av", "av", i_av, lambda: t_av, a_av),
                      train.load_final(S, "sft_ar", "ar", i_ar, lambda: t_ar, a_ar)))
    if train.finished(S, "rl"):
        *_, i_rl, t_rl, a_rl = train.rl_parts(S)
        pairs.append(("after_rl", train.load_final(S, "rl", "av", i_rl, lambda: t_rl, a_rl),
                      train.load_final(S, "rl", "ar", i_rl, lambda: t_rl, a_rl)))
    examples = []
    for name, av, ar in pairs:
        real = explain_rows(S, av, acts, batch, sc, E.seed)
        shuf = explain_rows(S, av, acts[perm], batch, sc, E.seed)
        zero = explain_rows(S, av, np.zeros_like(acts), batch, sc, E.seed)
        m_real, m_shuf = score(S, ar, real, acts, batch), score(S, ar, shuf, acts, batch)
        t_real, t_zero, t_shuf = (measure.decode_explanations(S.tok, e) for e in (real, zero, shuf))
        res["checkpoints"][name] = {
            "real": dict(zip(("mean", "lo", "hi"), ci(fve(m_real)))),
            "shuffled": dict(zip(("mean", "lo", "hi"), ci(fve(m_shuf)))),
            "real_minus_shuffled": dict(zip(("mean", "lo", "hi"), ci(fve(m_real) - fve(m_shuf)))),
            "extract_fail": float(1 - real["ok"].mean()),
            "expl_len": float(real["expl_len"][real["ok"]].mean()) if real["ok"].any() else 0.0,
            "differs_from_zero": float(np.mean([a != b for a, b in zip(t_real, t_zero)])),
            "differs_from_shuffled": float(np.mean([a != b for a, b in zip(t_real, t_shuf)])),
            "distinct_explanations": int(len(set(t_real))),
        }
        first_of_doc = np.unique(docs, return_index=True)[1]
        for i in sorted(first_of_doc)[:E.n_examples]:  # one example per document
            p = int(got["position"][i])
            ctx_text = S.tok.decode(got["tokens"][i][max(0, p - 23):p + 1].tolist())
            examples.append({"checkpoint": name, "row": int(rows[i]), "context": ctx_text, "explanation": t_real[i],
                             "fve": float(fve(m_real[i])), "zero_vector_explanation": t_zero[i]})
    res["examples"] = examples
    if jax.process_index() == 0:
        with open(os.path.join(S.workdir, "eval.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(report(res), file=sys.stdout, flush=True)
    S.writer.write("eval", 0, {"kind": "eval", **{f"{k}_real": v["real"]["mean"] for k, v in res["checkpoints"].items()},
                               "floor": res["floor"]["mean"]})
    return res


def report(res: dict) -> str:
    f = lambda d: f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
    lines = [f"\nfve_nrm on {res['rows']} held-out rows from {res['documents']} documents "
             f"(95% CI over documents; Var(v_nrm)={res['var_nrm']:.3f}, centred={res['center']})",
             f"  {'renormalised-mean floor':34s} {f(res['floor'])}"]
    for name, c in res["checkpoints"].items():
        lines += [f"  {name + ': real activations':34s} {f(c['real'])}",
                  f"  {name + ': shuffled activations':34s} {f(c['shuffled'])}",
                  f"  {name + ': real - shuffled':34s} {f(c['real_minus_shuffled'])}",
                  f"  {name + ': extraction failures':34s} {c['extract_fail']:.2f}   mean length {c['expl_len']:.1f} tok"
                  f"   differs from zero-vector text {c['differs_from_zero']:.2f}"]
    for e in res["examples"]:
        lines += [f"\n[{e['checkpoint']}] context: …{e['context']!r}", f"   explanation (fve {e['fve']:+.2f}): "
                  f"{e['explanation']!r}"]
    return "\n".join(lines)
