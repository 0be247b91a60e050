"""Extract block-K activations of the frozen target over a corpus into a tensorstore store.

    python -m nla_jax.extract --config configs/smollm2_135m.py            # extract (resumes)
    python -m nla_jax.extract --config configs/smollm2_135m.py --verify   # check the store
    python -m nla_jax.extract --config configs/tiny.py --config.data.store=/tmp/acts

Global batches of data.batch documents (rounded up to whole batch shards of the mesh) run on all
processes' devices; each process feeds the batch shards its devices hold and writes those it owns
(the lowest-numbered holder) into its own store part (nla_jax.data.plan). Data is written before
the row count (a crash leaves garbage past the ledger, never a corrupt row), and a rerun continues
from the slowest part's stored batch. Process 0 joins the parts into
manifest.json when all are done. Several processes: pass --coordinator/--num-processes/
--process-id (or launch/local_multiprocess.sh), or --distributed-auto under SLURM / on a TPU pod.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nla_jax import cli, distributed, faults, paths, sharding, weights
from nla_jax.cli import cli_main
from nla_jax.data import corpus
from nla_jax.data import plan as plan_lib
from nla_jax.data import positions
from nla_jax.data import store as store_lib
from nla_jax.data.store import ledger as ledger_lib
from nla_jax.errors import UserError
from nla_jax.models import transformer as T
from nla_jax.nla import selftext

CODE_VERSION = "extract-v1"


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--verify", action="store_true", help="check the store against its manifest and exit")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop after this many batches (for tests and benchmarks; rerun to continue)")
    p.add_argument("--timing-out", default=None,
                   help="write JSON timing of the loop after the first (compiling) batch: seconds, rows, tokens")
    return cli.add_distributed_flags(p)


def data_meta(cfg, mcfg, checksum: str) -> dict:
    """What the store records about how it was made; its hash is the store's fingerprint."""
    d = cfg.data
    meta = {
        "model": {"source": cfg.model.source, "name": mcfg.name, "family": mcfg.family, "checksum": checksum},
        "layer": int(cfg.model.layer), "d": int(mcfg.d_model), "dtype": d.dtype,
        "corpus": [dict(s) for s in d.sources], "seed": int(d.seed), "k": int(d.k),
        "min_position": int(d.min_position), "max_len": int(d.max_len),
        "splits": [[n, float(f)] for n, f in d.splits], "split_names": [n for n, _ in d.splits],
        "code_version": CODE_VERSION,
    }
    if int(d.get("top_k", 0)):   # absent when 0: a store without predictions keeps its fingerprint
        meta["top_k"] = int(d.top_k)
    meta["fingerprint"] = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return meta


@cli_main
def main(argv=None) -> int:
    args, cfg = cli.parse(build_parser(), argv)
    if args.verify:
        problems = store_lib.verify(cfg.data.store)
        for p in problems:
            print(p)
        if problems:
            print(f"store {cfg.data.store}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        m = store_lib.open_store(cfg.data.store).manifest
        print(f"store {cfg.data.store}: OK ({m['num_rows']} rows, splits {_split_rows(m)})")
        return 0
    return extract(cfg, args)


def extract(cfg, args) -> int:
    """Extract this process's share of the corpus into its part; process 0 finalizes the store."""
    cli.start_distributed(args)
    cli.enable_compilation_cache()
    d = cfg.data
    positions.check_fractions([(n, f) for n, f in d.splits])
    if d.dtype not in store_lib.DTYPES:
        raise UserError(f"config key data.dtype={d.dtype!r}: expected one of {', '.join(sorted(store_lib.DTYPES))}")
    top_k = int(d.get("top_k", 0))
    if top_k < 0:
        raise UserError(f"config key data.top_k={top_k}: expected >= 0 (0: store no next-token predictions)")
    if d.k < 1 or d.min_position < 1 or d.max_len <= d.min_position:
        raise UserError(f"config data: need k >= 1 and 1 <= min_position < max_len, got k={d.k}, "
                        f"min_position={d.min_position}, max_len={d.max_len}")
    mesh = sharding.mesh_from_config(cfg.mesh)
    mcfg, params, tok = weights.load_from_config(cfg.model, mesh, cfg.rules)
    if tok is None:
        raise UserError(f"model source {cfg.model.source!r} has no tokenizer; extraction needs one")
    if top_k > mcfg.vocab_size:
        raise UserError(f"config key data.top_k={top_k}: more than the model's vocabulary ({mcfg.vocab_size})")
    meta = data_meta(cfg, mcfg, weights.model_checksum(cfg.model.source))

    docs, stats = corpus.load_corpus([dict(s) for s in d.sources])
    plan = plan_lib.plan_documents(docs, tok, seed=d.seed, k=d.k, min_position=d.min_position,
                                   max_len=d.max_len, splits=[(n, f) for n, f in d.splits], stats=stats)
    pid, nproc = jax.process_index(), jax.process_count()
    # Global batch `step` = plan documents [step*B, (step+1)*B), split into the mesh's batch shards.
    # Each process feeds the shards its devices hold (replicas of a shard, e.g. tensor spanning
    # hosts, feed the same documents) and writes the shards it owns (the lowest-numbered holder)
    # into its own part; a process that owns none keeps an empty part.
    layout = sharding.batch_layout(mesh, cfg.rules)
    B = -(-int(d.batch) // layout.shards) * layout.shards
    n_total = plan_lib.num_steps(len(plan), B)
    own = plan_lib.ownership(plan, B, layout.shards, layout.owned)
    want_layout = {"batch": B, "shards": layout.shards, "owned": list(layout.owned), "processes": nproc}
    _check_part_layout(d.store, pid, want_layout)
    writer = store_lib.PartWriter.create_or_resume(d.store, pid, d=mcfg.d_model, dtype=d.dtype,
                                                   capacity=max(1, own.rows), ctx_len=d.max_len,
                                                   chunk_rows=d.chunk_rows, meta=meta, top_k=top_k)
    mine_next = int(writer.cursor.get("next_step", 0))
    # every process runs the same steps (SPMD): from the slowest part's cursor on; a part that is
    # further along skips the writes it has already committed
    todo = mine_next if mine_next < own.last_step else n_total
    start = -distributed.max_over_processes(-todo)
    print(f"[{pid}/{nproc}] corpus: {stats.summary()}; {len(plan)} planned documents in {n_total} batches of {B} "
          f"({layout.shards} batch shard(s), this process writes shard(s) {list(layout.owned)}: {own.rows} rows), "
          f"resuming at batch {start} ({writer.committed} rows done)", file=sys.stderr)

    n_steps = n_total - start
    if args.max_batches is not None:
        n_steps = min(n_steps, args.max_batches)
    K = cfg.model.layer
    batch_sh = sharding.named_sharding(("batch", "seq"), None, mesh, cfg.rules)
    pos_sh = sharding.named_sharding(("batch", None), None, mesh, cfg.rules)
    acts_sh = sharding.named_sharding(("batch", None, None), None, mesh, cfg.rules)

    def gather_rows(params, tokens, valid, pos):
        """Block K's residual at each document's k positions ({"acts": [b, k, d]}) and, with
        data.top_k > 0, the target's top next tokens there from the same pass (the blocks after K
        run on; {"ids", "probs": [b, k, top_k]})."""
        with sharding.use_mesh(mesh, cfg.rules):
            h = T.forward(params, tokens, mcfg, valid=valid, capture_layer=K, logits=False)["hidden"]  # [b, s, d]
            out = {"acts": jnp.take_along_axis(h, pos[..., None], axis=1).astype(jnp.float32)}     # [b, k, d]
            if top_k:
                x = T.run_blocks(mcfg, params["layers"], h, T.positions_from_mask(valid), T.causal_mask(valid),
                                 K + 1, mcfg.n_layers, False, valid)                                # [b, s, d]
                out.update(selftext.top_at(params, mcfg, x, pos, top_k))
        return out

    step_fn = jax.jit(gather_rows, out_shardings={"acts": acts_sh, **({"ids": acts_sh, "probs": acts_sh} if top_k else {})})
    per = B // layout.shards
    owned_at = [layout.held.index(s) for s in layout.owned]   # owned shards among the held ones
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # writes overlap the next forward
    pending = None
    t0, rows_done = time.perf_counter(), 0
    timing = {"batches": 0, "rows": 0, "tokens": 0, "seconds": 0.0}
    t_first = None
    bar = tqdm(total=n_steps, desc=f"extract[{pid}]", unit="batch", disable=pid != 0 and nproc > 1)
    for step in range(start, start + n_steps):
        faults.point("extract.batch")
        docs = plan_lib.step_docs(plan, step, B)
        longest = max(len(x.tokens) for x in docs)
        fed = plan_lib.block_docs(docs, layout.held, B, layout.shards)      # what this process feeds
        toks, valid, pos, pos_valid = plan_lib.pad_batch(fed, len(layout.held) * per, d.seq_multiple, d.k, longest)
        g = [distributed.global_batch(x, sh, B) for x, sh in
             ((toks, batch_sh), (valid, batch_sh), (pos, pos_sh))]
        got = {name: distributed.local_rows(x) for name, x in step_fn(params, *g).items()}  # the held shards' rows
        acts = got["acts"]                                                                  # [held * per, k, d]
        if pending is not None:
            pending.result()
        written = plan_lib.block_docs(docs, layout.owned, B, layout.shards)
        if written and step >= mine_next:
            sel = np.concatenate([np.arange(i * per, (i + 1) * per) for i in owned_at])[:len(written)]
            rows = _rows(written, acts[sel], pos_valid[sel], d.max_len)
            top = {}
            if top_k:   # [rows, top_k] each, in _rows' order (document, then position)
                top = {f"top_{name}": got[name][sel][pos_valid[sel]] for name in ("ids", "probs")}
            pending = pool.submit(writer.append, *rows, cursor=dict(want_layout, next_step=step + 1), **top)
            rows_done += len(rows[1])
        bar.update(1)
        bar.set_postfix(rows_s=f"{rows_done / (time.perf_counter() - t0):.1f}")
        if t_first is None:
            t_first = time.perf_counter()
        else:
            timing["batches"] += 1
            timing["rows"] += int(pos_valid.sum())
            timing["tokens"] += int(valid.sum())
    if pending is not None:
        pending.result()
    if t_first is not None:
        timing["seconds"] = time.perf_counter() - t_first
    if args.timing_out and pid == 0:
        with open(args.timing_out, "w") as f:
            json.dump(timing, f)
    bar.close()
    pool.shutdown()
    done = int(writer.cursor.get("next_step", 0)) >= own.last_step
    writer.close()
    finished = distributed.all_true(done)
    if pid == 0 and finished:
        faults.point("extract.before_manifest")
        m = store_lib.finalize_manifest(d.store, dict(meta, corpus_stats={
            "documents": stats.documents, "skipped": dict(stats.skipped), "planned": len(plan)}), num_parts=nproc)
        print(f"store {d.store}: {m['num_rows']} rows, splits {_split_rows(m)}", file=sys.stderr)
    elif not finished:
        print(f"[{pid}] stopped early after {n_steps} batches; rerun to continue", file=sys.stderr)
    distributed.barrier("extract-done")
    return 0


def _check_part_layout(root: str, part: int, want: dict) -> None:
    """A part resumes only under the batch layout it was written with (which documents it holds
    depends on it): another mesh, process count or data.batch is one line, before anything opens."""
    part_dir = paths.join(root, store_lib.part_name(part))
    if not paths.exists(ledger_lib.path_in(part_dir)):
        return
    cursor = ledger_lib.read(part_dir).get("cursor") or {}
    if "next_doc" in cursor:
        raise UserError(f"store part {part_dir} was written by an older extraction (documents split by process); "
                        f"finish it with that version or extract into a fresh data.store")
    have = {k: cursor[k] for k in want if k in cursor}
    if cursor and have != want:
        raise UserError(f"store part {part_dir} was written with batch layout {have}, this run has {want} "
                        f"(config keys data.batch, mesh.shape and the process count must stay as they were to "
                        f"resume; or extract into a fresh data.store)")


def _split_rows(manifest: dict) -> dict[str, int]:
    return {k: v["rows"] for k, v in manifest["splits"].items()}


def _rows(chunk, acts: np.ndarray, pos_valid: np.ndarray, ctx_len: int):
    """Flatten a batch to store rows: (acts, doc_id, position, split, tokens), doc order then position."""
    out_a, out_doc, out_pos, out_split, out_tok = [], [], [], [], []
    for i, doc in enumerate(chunk):
        n = int(pos_valid[i].sum())
        for j in range(n):
            p = int(doc.positions[j])
            out_a.append(acts[i, j])
            out_doc.append(doc.doc_key)
            out_pos.append(p)
            out_split.append(doc.split)
            t = np.full((ctx_len,), -1, np.int32)
            t[:p + 1] = doc.tokens[:p + 1]
            out_tok.append(t)
    return (np.stack(out_a), np.asarray(out_doc, np.int64), np.asarray(out_pos, np.int32),
            np.asarray(out_split, np.uint8), np.stack(out_tok))


if __name__ == "__main__":
    sys.exit(main())
