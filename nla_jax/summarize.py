"""Teacher summaries for the warm-start rows (WORKSPACE.md, "The method in brief"), stored beside the activations.

    python -m nla_jax.summarize --config configs/smollm2_135m.py            # generate (resumes)
    python -m nla_jax.summarize --config configs/smollm2_135m.py --import summaries.jsonl

For every row of the configured splits (default av_sft and ar_sft) a teacher model (the target
itself unless `summarize.teacher` names another source) reads the end of the row's context and
writes a short description of what matters for predicting the next token. With
`summarize.append_final_tokens > 0` the text also quotes the context's last tokens, before the
summary: a small model's summaries rarely name them, the reconstructor needs them (WORKSPACE.md,
"The method in brief"), and the AV's cap (av.max_len) truncates from the end, so they go first.
`summarize.teacher="quote"` skips the model: the text is only that quote of the last
`quote_tokens` tokens (a cheap warm start, and the ablation that isolates the final-token signal).
`summarize.teacher="predict"` runs the target once over each row's context (no sampling) and
writes what it computed there: the current token, its `predict_k` most likely next tokens with
probabilities, and the `before_tokens` tokens before it (nla/selftext.py; `predict_style` "token":
current token first, "quote": the tokens in reading order, "next_first": the predictions, then the
tokens in reading order); the record also keeps the prediction ids and probabilities ("top_ids",
"top_probs"). When the store holds extraction's own predictions (data.top_k >= predict_k) the texts
are written from them with the tokenizer alone; otherwise the target runs once more over the rows.

Output: STORE/summaries.jsonl, one {"row", "doc_id", "position", "text"} per line, append-only;
a rerun skips rows already written and drops a half-written last line. `--import` validates
summaries produced elsewhere ({"row": int, "text": str} per line) against the store and
appends them the same way.

Several processes (--coordinator/--num-processes/--process-id, or --distributed-auto) run the teacher
together on the config's mesh; process 0 writes the file, which ends up as one process would have
written it.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from nla_jax import cli, distributed, fileio, sampling, sharding, weights
from nla_jax.cli import cli_main
from nla_jax.data import loader as data_loader
from nla_jax.data import store as store_lib
from nla_jax.data import summaries as summaries_lib
from nla_jax.errors import UserError
from nla_jax.nla import selftext


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--import", dest="import_path", default=None, help="JSONL of {row, text} to validate and store")
    p.add_argument("--limit", type=int, default=None, help="summarise at most this many new rows (tests)")
    return cli.add_distributed_flags(p)


def teacher_prompt(template: str, context: str, last: str) -> str:
    return template.replace("{context}", context).replace("{last}", last)


def target_rows(store, splits) -> np.ndarray:
    return np.sort(np.concatenate([store.rows_of_split(s) for s in splits]))


@cli_main
def main(argv=None) -> int:
    """Several processes (--coordinator.. / --distributed-auto) run the teacher together on the
    config's mesh, each feeding the batch shards its devices hold; process 0, the only writer,
    appends every batch in order, so the file is the one a single process writes (a row's text
    depends on the seed and its batch's first row only)."""
    args, cfg = cli.parse(build_parser(), argv)
    cli.start_distributed(args)
    lead = jax.process_index() == 0
    sc = cfg.summarize
    store = store_lib.open_store(cfg.data.store)
    out = summaries_lib.path_in(cfg.data.store)
    rows = target_rows(store, sc.splits)
    if lead:
        fileio.drop_torn_tail(out)  # a crash's half-written last line goes before anyone reads the file
    distributed.barrier("summarize-read")
    done = summaries_lib.read_records(out)
    if args.import_path:
        return import_file(args.import_path, store, set(rows.tolist()), done, out) if lead else 0
    todo = [int(r) for r in rows if int(r) not in done]
    if args.limit is not None:
        todo = todo[:args.limit]
    if lead:
        print(f"{len(rows)} rows in {list(sc.splits)}; {len(done)} done; {len(todo)} to summarise", file=sys.stderr)
    if not todo:
        return 0
    cli.enable_compilation_cache()
    teacher_model = ml_collections.ConfigDict(cfg.model.to_dict())
    if sc.teacher not in ("target", "quote", "predict"):
        teacher_model.source = sc.teacher
    if sc.teacher == "predict":
        check_predict(sc)
    stored = sc.teacher == "predict" and store.top_k >= int(sc.predict_k)
    if sc.teacher == "quote" or stored:   # no model: the tokenizer is all it needs
        _, tok = weights.config_and_tokenizer(teacher_model)
        if tok is None:
            raise UserError(f"teacher {sc.teacher!r} has no tokenizer")
        if not lead:
            return 0
        return stored_predict_rows(store, tok, todo, sc, out) if stored else quote_rows(store, tok, todo, sc, out)
    if sc.teacher == "predict" and lead:
        print(f"store {cfg.data.store} holds {store.top_k} next-token predictions per row, summarize.predict_k="
              f"{sc.predict_k}: running the target over the rows (extract with data.top_k >= {sc.predict_k} "
              f"to skip this pass)", file=sys.stderr)
    # The teacher runs sharded on the config's mesh (a 70B teacher does not fit one device): its
    # weights are read shard by shard, each batch is fed by data shard (sharding.BatchLayout) and
    # the texts are gathered back; process 0 writes them.
    mesh = sharding.mesh_from_config(cfg.mesh)
    layout = sharding.batch_layout(mesh, cfg.rules)
    batch = -(-sc.batch // layout.shards) * layout.shards        # padded to whole batch shards
    mcfg, params, tok = weights.load_from_config(teacher_model, mesh, cfg.rules)
    if tok is None:
        raise UserError(f"teacher {sc.teacher!r} has no tokenizer")
    if sc.teacher == "predict":
        return predict_rows(store, tok, mcfg, params, todo, sc, out, mesh, cfg.rules, batch,
                            weights.dtype_of(teacher_model.dtype))
    scfg = sampling.SampleConfig(max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_p=sc.top_p)
    sample = sampling.make_sampler(mcfg, scfg, mesh, cfg.rules, weights.dtype_of(teacher_model.dtype))
    with sharding.use_mesh(mesh, cfg.rules):
        params = sample.split(params)
    mine = layout.local_positions(batch)
    bar = tqdm(total=len(todo), desc="summarize", unit="row", disable=not lead)
    t0 = time.perf_counter()
    for i in range(0, len(todo), sc.batch):
        chunk = todo[i:i + sc.batch]
        got, prompts, lasts = teacher_inputs(store, tok, chunk, sc)
        toks, valid = sampling.pad_prompts(prompts + [prompts[0]] * (batch - len(prompts)), mcfg.pad_id)  # [batch, T]
        key = jax.random.fold_in(jax.random.key(sc.seed), chunk[0])  # a row's text: f(seed, first row of batch)
        g = data_loader.to_global({"toks": toks[mine], "valid": valid[mine]}, mesh, cfg.rules, batch)
        res = sample(params, g["toks"], g["valid"], key)
        tokens, lengths = distributed.host_array(res.tokens), distributed.host_array(res.lengths)
        recs = summary_records(tok, chunk, got, lasts, tokens, lengths, sc)
        if lead:
            fileio.append_jsonl(out, recs)
        bar.update(len(chunk))
        bar.set_postfix(rows_s=f"{(i + len(chunk)) / (time.perf_counter() - t0):.2f}")
    bar.close()
    return 0


def teacher_inputs(store, tok, chunk: list[int], sc) -> tuple[dict, list[list[int]], list[str]]:
    """(store fields, teacher prompt ids, decoded final tokens) of a batch of rows."""
    got = store.read(None, np.asarray(chunk), fields=("doc_id", "position", "tokens"))
    prompts, lasts = [], []
    for j in range(len(chunk)):
        p = int(got["position"][j])
        ctx = got["tokens"][j][:p + 1]
        context = tok.decode(ctx[-sc.context_tokens:].tolist())
        last = tok.decode(ctx[-max(sc.append_final_tokens, 1):].tolist())
        lasts.append(last)
        prompts.append(tok.encode_chat(teacher_prompt(sc.prompt, context, last.strip())))
    return got, prompts, lasts


def summary_records(tok, chunk: list[int], got: dict, lasts: list[str], tokens: np.ndarray, lengths: np.ndarray,
                    sc) -> list[dict]:
    """The summaries.jsonl records of a batch from its sampled tokens [B, N] and lengths [B]."""
    recs = []
    for j, r in enumerate(chunk):
        text = tok.decode(tokens[j][:lengths[j]].tolist()).strip()
        if sc.append_final_tokens > 0:
            # the quote first: the AV's cap truncates from the end, and the final tokens are what the
            # activation encodes best (a long summary used to push them past the cap)
            text = f"The text ends with: \u00ab{lasts[j].strip()}\u00bb. {text}".strip()
        recs.append({"row": r, "doc_id": int(got["doc_id"][j]), "position": int(got["position"][j]), "text": text})
    return recs


def quote_rows(store, tok, todo: list[int], sc, out: str) -> int:
    """Warm-start texts that only quote each context's final tokens (no teacher model)."""
    bar = tqdm(total=len(todo), desc="quote", unit="row")
    for i in range(0, len(todo), 256):
        chunk = todo[i:i + 256]
        got = store.read(None, np.asarray(chunk), fields=("doc_id", "position", "tokens"))
        recs = []
        for j, r in enumerate(chunk):
            p = int(got["position"][j])
            last = tok.decode(got["tokens"][j][max(0, p + 1 - sc.quote_tokens):p + 1].tolist()).strip()
            recs.append({"row": r, "doc_id": int(got["doc_id"][j]), "position": p,
                         "text": f"The text ends with: \u00ab{last}\u00bb"})
        fileio.append_jsonl(out, recs)
        bar.update(len(chunk))
    bar.close()
    return 0


def check_predict(sc) -> None:
    if int(sc.predict_k) < 1:
        raise UserError(f"config key summarize.predict_k={sc.predict_k} must be >= 1")
    if sc.predict_style not in selftext.STYLES:
        raise UserError(f"config key summarize.predict_style={sc.predict_style!r}: expected one of "
                        f"{', '.join(map(repr, selftext.STYLES))}")


def predict_record(tok, row: int, doc_id: int, position: int, tokens: np.ndarray, ids: np.ndarray,
                   probs: np.ndarray, sc) -> dict:
    """One summaries.jsonl record of the "predict" warm start: the text and the predictions it names."""
    return {"row": int(row), "doc_id": int(doc_id), "position": int(position),
            "text": selftext.self_text(tok, tokens, int(position), ids, probs, int(sc.before_tokens), sc.predict_style),
            "top_ids": [int(i) for i in ids], "top_probs": [round(float(q), 6) for q in probs]}


def stored_predict_rows(store, tok, todo: list[int], sc, out: str) -> int:
    """The "predict" warm start from the predictions extraction stored with each row (its own
    forward pass, data.top_k >= predict_k): no model, no second pass."""
    k = int(sc.predict_k)
    bar = tqdm(total=len(todo), desc="predict (stored)", unit="row")
    for i in range(0, len(todo), 256):
        chunk = todo[i:i + 256]
        got = store.read(None, np.asarray(chunk), fields=("doc_id", "position", "tokens", "top_ids", "top_probs"))
        fileio.append_jsonl(out, [predict_record(tok, r, got["doc_id"][j], got["position"][j], got["tokens"][j],
                                                 got["top_ids"][j, :k], got["top_probs"][j, :k], sc)
                                  for j, r in enumerate(chunk)])
        bar.update(len(chunk))
    bar.close()
    return 0


def predict_rows(store, tok, mcfg, params, todo: list[int], sc, out: str, mesh, rules, batch: int,
                 compute_dtype) -> int:
    """Warm-start texts from a forward pass of the target over the stored rows (nla/selftext.py),
    for a store without extraction's predictions. Rows of one document share its tokens up to
    their positions, so one pass over the document's longest row reads every row of it:
    `sc.batch` documents at a time, padded to `batch`; every process computes, process 0 appends
    (a document's rows in row order)."""
    lead = jax.process_index() == 0
    mine = sharding.batch_layout(mesh, rules).local_positions(batch)
    todo_a = np.asarray(todo, np.int64)
    doc_of = store.read(None, todo_a, fields=("doc_id",))["doc_id"]               # [n]
    _, first, inv = np.unique(doc_of, return_index=True, return_inverse=True)
    groups = [np.flatnonzero(inv == g) for g in np.argsort(first)]               # indices into todo, doc by doc
    bar = tqdm(total=len(todo), desc="predict", unit="row", disable=not lead)
    for i in range(0, len(groups), sc.batch):
        chunk = groups[i:i + sc.batch]
        rows = todo_a[np.concatenate(chunk)]
        got = store.read(None, rows, fields=("doc_id", "position", "tokens"))
        at = np.cumsum([0] + [len(g) for g in chunk])                             # [docs + 1]: slices of `rows`
        P = 1 << int(np.ceil(np.log2(max(len(g) for g in chunk))))                # positions per document, padded
        seq = np.array([at[j] + int(np.argmax(got["position"][at[j]:at[j + 1]])) for j in range(len(chunk))])
        pos = np.stack([np.resize(got["position"][at[j]:at[j + 1]], P) for j in range(len(chunk))])  # [docs, P]
        idx = np.minimum(np.arange(batch), len(chunk) - 1)                       # pad by repeating the last document
        pos = pos[idx].astype(np.int32)                                          # [batch, P]
        L = min(got["tokens"].shape[1], -(-(int(pos.max()) + 1) // 64) * 64)     # few compiled lengths
        toks = got["tokens"][seq[idx], :L]                                       # [batch, L]
        toks = np.where(toks < 0, mcfg.pad_id, toks).astype(np.int32)            # -1 after the last position: inert
        with sharding.use_mesh(mesh, rules):
            g = data_loader.to_global({"toks": toks[mine], "pos": pos[mine]}, mesh, rules, batch)
            top = selftext.top_next(params, mcfg, g["toks"], g["pos"], int(sc.predict_k), compute_dtype)
        ids, probs = distributed.host_array(top["ids"]), distributed.host_array(top["probs"])   # [batch, P, k]
        recs = []
        for j in range(len(chunk)):
            for slot, r in enumerate(range(at[j], at[j + 1])):
                recs.append(predict_record(tok, rows[r], got["doc_id"][r], got["position"][r], got["tokens"][r],
                                           ids[j, slot], probs[j, slot], sc))
        if lead:
            fileio.append_jsonl(out, recs)
        bar.update(len(recs))
    bar.close()
    return 0


def import_file(path: str, store, allowed: set[int], done: dict[int, dict], out: str) -> int:
    """Validate summaries made elsewhere ({row, text} per line, rows in `allowed`, each once) and
    append the ones not yet in `out`, with the doc_id and position the store holds for each row."""
    if not os.path.isfile(path):
        raise UserError(f"summaries file {path!r} does not exist")
    recs, seen = [], set()
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError:
            raise UserError(f"summaries file {path!r} is not UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: not valid JSON") from None
        row, text = rec.get("row") if isinstance(rec, dict) else None, rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(row, int) or not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{n}: expected {{\"row\": int, \"text\": non-empty string}}")
        if row not in allowed:
            raise UserError(f"{path}:{n}: row {row} is not in the store's summarised splits")
        if row in seen:
            raise UserError(f"{path}:{n}: row {row} appears twice")
        seen.add(row)
        if row not in done:
            recs.append(rec)
    got = (store.read(None, np.asarray([r["row"] for r in recs], np.int64), fields=("doc_id", "position"))
           if recs else None)
    full = [{"row": r["row"], "doc_id": int(got["doc_id"][i]), "position": int(got["position"][i]),
             "text": r["text"]} for i, r in enumerate(recs)]
    fileio.append_jsonl(out, full)
    print(f"imported {len(full)} summaries ({len(seen) - len(full)} already present) into {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
