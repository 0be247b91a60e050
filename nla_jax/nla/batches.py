"""The training stages' batches: store rows -> warm-start texts / token ids -> global arrays on the mesh.

Row order is the data loader's pure function of (seed, step), so a resumed stage sees exactly the
batches it would have seen; each split gets its own seed (data.seed + a hash of the split name),
so the stages do not walk their splits in lockstep.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Iterator

import numpy as np

from nla_jax import faults
from nla_jax.data import loader as data_loader
from nla_jax.errors import UserError
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import av as av_lib
from nla_jax.nla.run import Run

MakeBatch = Callable[..., dict]   # (run, host rows {"acts", "row"}[, width]) -> host batch


def split_seed(run: Run, split: str) -> int:
    return run.cfg.data.seed + zlib.crc32(split.encode()) % 997


def av_batch(run: Run, local: dict, width: int | None = None) -> dict:
    """SFT-AV rows: acts [b, d], the warm-start text as targets [b, L] with its loss mask [b, L];
    L = width (every row's text fits: `text_widths`) or the cap av.max_len."""
    texts = [run.summaries[int(r)] for r in local["row"]]
    targets, mask = av_lib.sft_targets(run.tokenizer, texts, run.ctx.av, width)
    return {"acts": local["acts"], "targets": targets, "mask": mask}


def ar_batch(run: Run, local: dict, width: int | None = None) -> dict:
    """SFT-AR rows: acts [b, d], the warm-start text as explanation ids [b, M] and lengths [b];
    M = width (the step then runs an ARSpec of that max_len: `text_widths`) or the cap ar.max_len."""
    texts = [run.summaries[int(r)] for r in local["row"]]
    spec = run.ctx.ar if width is None else dataclasses.replace(run.ctx.ar, max_len=int(width))
    expl, lens = ar_lib.host_explanations(run.tokenizer, texts, spec)
    return {"acts": local["acts"], "expl": expl, "expl_len": lens}


def text_widths(run: Run, stage: str, rows: np.ndarray) -> Callable[[np.ndarray], int] | None:
    """For SFT batches padded only as far as they need: a function from a global batch's row ids to
    its padded text width, the longest row's tokens (AV: the text as cut at the cap, then the closing
    tag and EOS; AR: the text as cut at the cap) rounded up to train.text_bucket and never past the
    cap. None when train.text_bucket is 0 (every batch padded to the cap).

    Why: the warm-start texts are far shorter than the cap that leaves RL room (the default's are
    27 tokens on average, p99 32, against a cap of 64), and the padding ran through every layer, in
    every step, for nothing. Tokens after a row's last real token change nothing before it (causal
    attention; the loss and the AR's read-out sit at real tokens; the AR's suffix follows the text
    wherever it ends), so a narrower batch computes the same loss up to float summation order
    (tests/test_sft_width.py). Each width compiles its own step once; buckets keep them few. The
    width is a function of the global batch's rows, so every process pads alike."""
    bucket = int(run.cfg.train.text_bucket)
    if bucket <= 0:
        return None
    tok, texts = run.tokenizer, run.summaries
    if stage == "sft_av":       # the rows exactly as av_batch / ar_batch build them
        cap = run.ctx.av.max_len
        length = {int(r): len(av_lib.sft_row(tok, texts[int(r)], run.ctx.av)) for r in rows}
    else:
        cap = run.ctx.ar.max_len
        length = {int(r): len(ar_lib.explanation_ids(tok, texts[int(r)], cap)) for r in rows}

    def width(batch_rows: np.ndarray) -> int:
        longest = max(length[int(r)] for r in batch_rows)
        return min(cap, -(-longest // bucket) * bucket)
    return width


def to_global(run: Run, local: dict, global_batch: int) -> dict:
    """This process's rows (BatchLayout.local_positions of a `global_batch`-row batch) -> global arrays."""
    return data_loader.to_global(local, run.mesh, run.rules, global_batch)


def stage_batches(run: Run, split: str, batch: int, start: int, make: MakeBatch | None,
                  only: np.ndarray | None = None, stage: str | None = None,
                  width: Callable[[np.ndarray], int] | None = None) -> Iterator[tuple[int, dict]]:
    """(step, global batch) from `start` on: `make` turns the host rows into the step's inputs
    (None: activations only, the RL stage). `stage` names the fault point tests poison batches at.
    `width` (text_widths): the batch's text width from its global rows, passed to `make`."""
    layout = run.batch_layout
    layout.check(batch, f"{stage or split}.batch")
    positions = layout.local_positions(batch)
    for step, local in data_loader.iterate(run.cfg.data.store, split, batch=batch, seed=split_seed(run, split),
                                           start_step=start, fields=("acts",), only=only, positions=positions,
                                           batch_rows=width is not None):
        if stage is not None and (poison := faults.point(f"train.{stage}.batch")) in ("nan", "inf"):
            local["acts"] = np.full_like(local["acts"], np.nan if poison == "nan" else np.inf)  # tests only
        if make is None:
            host = {"acts": local["acts"]}
        elif width is None:
            host = make(run, local)
        else:
            host = make(run, local, width(local.pop("batch_rows")))
        yield step, to_global(run, host, batch)


def fixed_rows(run: Run, rows: np.ndarray, n: int, make: MakeBatch, key: str = "val_rows") -> tuple[dict, np.ndarray]:
    """A fixed validation batch of the first n rows in canonical order, trimmed to a multiple of
    the batch shards: (global batch, doc ids of all its rows)."""
    layout = run.batch_layout
    rows = np.sort(rows)[:n]
    n = len(rows) - len(rows) % layout.shards
    if n == 0:
        raise UserError(f"config key {key}: {len(rows)} validation rows are fewer than the {layout.shards} batch "
                        f"shards of the mesh (raise it, or use fewer data x fsdp shards)")
    rows = rows[:n]
    mine = rows[layout.local_positions(n)]
    local = run.store.read(None, mine, fields=("acts",))
    local["row"] = mine
    docs = run.store.read(None, rows, fields=("doc_id",))["doc_id"]
    return to_global(run, make(run, local), n), docs
