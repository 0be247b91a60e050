"""How readable the target's next token is straight from the block-K activation (the logit lens).

    .venv/bin/python benchmarks/lens_top1.py --config configs/smollm2_135m.py:quick
    .venv/bin/python benchmarks/lens_top1.py --config configs/smollm2_135m.py    # the default's store
    (--config.KEY=VALUE overrides as in the programs, e.g. --config.data.store=DIR)

The NLA's claim "the explanation names the target's top-1 next token among its stated predictions"
(issue 17 asks >= 50%) is bounded by how much of that prediction block K already holds. This reads
the store's held-out rows (the eval stage's own choice: eval.rows of eval.split, seed eval.seed),
applies the target's final norm and unembedding to each stored activation (the logit lens: no
training, the later blocks skipped) and reports, beside the chance level of the same lens applied
to another document's activation (the eval stage's shuffled derangement):
  lens top-1 == target top-1          the lens's best guess is the target's
  target top-1 in the lens's top-3    the eval claim's shape: top-1 among three stated predictions
  target top-1 in the lens's top-10
each with a 95% cluster-t interval over documents. The target's top-1 comes from the warm-start
records (summarize.teacher="predict": `top_ids`), so the store must have them for its eval rows.
Prints a table and writes benchmarks/results/lens_top1[_NAME].json.
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

from nla_jax import configlib  # noqa: E402
from nla_jax.data import summaries as summaries_lib  # noqa: E402
from nla_jax.models import transformer  # noqa: E402
from nla_jax.nla import measure  # noqa: E402
from nla_jax.nla import run as run_lib  # noqa: E402
from record import write_result  # noqa: E402

KS = (1, 3, 10)


def lens_topk(run, acts: np.ndarray, k: int, batch: int = 64) -> np.ndarray:
    """acts [n, d] (block K's output) -> the logit lens's top-k token ids [n, k]."""
    @jax.jit
    def top(params, h):                                        # h: [b, d]
        logits = transformer.unembed(run.model_cfg, params, h[:, None, :].astype(jnp.float32))[:, 0]  # [b, V]
        return jax.lax.top_k(logits, k)[1]                     # [b, k]
    out = [np.asarray(top(run.target, jnp.asarray(acts[i:i + batch]))) for i in range(0, len(acts), batch)]
    return np.concatenate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2_135m.py:quick", help="FILE.py[:ARG]: its data.store and eval section")
    p.add_argument("--name", default="", help="suffix of the result file (lens_top1_NAME.json)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    rest, overrides = configlib.split_config_args(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(rest)
    cfg = configlib.get(args.config, overrides)
    t0 = time.perf_counter()
    run = run_lib.build(cfg)
    E = cfg.eval
    rows = measure.pick_rows(run.store, E.split, E.rows, E.seed)
    got = run.store.read(None, rows, fields=("acts", "doc_id"))
    acts, docs = np.asarray(got["acts"], np.float32), got["doc_id"]          # [n, d], [n]
    recs = summaries_lib.read_records(summaries_lib.path_in(cfg.data.store))
    missing = [int(r) for r in rows if not recs.get(int(r), {}).get("top_ids")]
    if missing:
        print(f"error: {summaries_lib.path_in(cfg.data.store)} has no top_ids for {len(missing)} of the "
              f"{len(rows)} eval rows (e.g. row {missing[0]}); expected summarize.teacher='predict' with the "
              f"{E.split!r} split", file=sys.stderr)
        return 2
    top1 = np.array([recs[int(r)]["top_ids"][0] for r in rows])               # [n]
    perm = measure.derangement_by_doc(docs, E.seed)
    res = {"config": args.config, "store": cfg.data.store, "layer": int(cfg.model.layer), "rows": int(len(rows)),
           "documents": int(len(np.unique(docs))),
           "command": " ".join([".venv/bin/python benchmarks/lens_top1.py", f"--config {args.config}",
                                *(f"--config.{o}" for o in overrides), *([f"--name {args.name}"] if args.name else [])])}
    ids = lens_topk(run, acts, max(KS))                                       # [n, 10]
    ids_shuf = ids[perm]
    for k in KS:
        hit = (ids[:, :k] == top1[:, None]).any(1).astype(np.float64)
        hit_shuf = (ids_shuf[:, :k] == top1[:, None]).any(1).astype(np.float64)
        res[f"top1_in_lens_top{k}"] = {"real": measure.ci(hit, docs), "shuffled": measure.ci(hit_shuf, docs),
                                       "real_minus_shuffled": measure.ci(hit - hit_shuf, docs)}
    res["seconds"] = time.perf_counter() - t0
    f = lambda d: f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"
    print(f"logit lens at block {res['layer']}: {res['rows']} held-out rows over {res['documents']} documents "
          f"({cfg.data.store})")
    print(f"  {'target top-1 among':24s} {'lens (real activation)':26s} {'other document (chance)':26s}")
    for k in KS:
        r = res[f"top1_in_lens_top{k}"]
        print(f"  {'the lens top-' + str(k):24s} {f(r['real']):26s} {f(r['shuffled']):26s}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"lens_top1{'_' + args.name if args.name else ''}.json")
    write_result(path, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
