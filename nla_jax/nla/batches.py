"""The training stages' batches: store rows -> warm-start texts / token ids -> global arrays on the mesh.

Row order is the data loader's pure function of (seed, step), so a resumed stage sees exactly the
batches it would have seen; each split gets its own seed (data.seed + a hash of the split name),
so the stages do not walk their splits in lockstep.
"""
from __future__ import annotations

import zlib
from typing import Callable, Iterator

import numpy as np

from nla_jax import faults
from nla_jax.data import loader as data_loader
from nla_jax.errors import UserError
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import av as av_lib
from nla_jax.nla.run import Run

MakeBatch = Callable[[Run, dict], dict]   # (run, host rows {"acts", "row"}) -> host batch


def split_seed(run: Run, split: str) -> int:
    return run.cfg.data.seed + zlib.crc32(split.encode()) % 997


def av_batch(run: Run, local: dict) -> dict:
    """SFT-AV rows: acts [b, d], the warm-start text as targets [b, L] with its loss mask [b, L]."""
    texts = [run.summaries[int(r)] for r in local["row"]]
    targets, mask = av_lib.sft_targets(run.tokenizer, texts, run.ctx.av)
    return {"acts": local["acts"], "targets": targets, "mask": mask}


def ar_batch(run: Run, local: dict) -> dict:
    """SFT-AR rows: acts [b, d], the warm-start text as explanation ids [b, M] and lengths [b]."""
    texts = [run.summaries[int(r)] for r in local["row"]]
    expl, lens = ar_lib.host_explanations(run.tokenizer, texts, run.ctx.ar)
    return {"acts": local["acts"], "expl": expl, "expl_len": lens}


def to_global(run: Run, local: dict, global_batch: int) -> dict:
    """This process's rows (BatchLayout.local_positions of a `global_batch`-row batch) -> global arrays."""
    return data_loader.to_global(local, run.mesh, run.rules, global_batch)


def stage_batches(run: Run, split: str, batch: int, start: int, make: MakeBatch | None,
                  only: np.ndarray | None = None, stage: str | None = None) -> Iterator[tuple[int, dict]]:
    """(step, global batch) from `start` on: `make` turns the host rows into the step's inputs
    (None: activations only, the RL stage). `stage` names the fault point tests poison batches at."""
    layout = run.batch_layout
    layout.check(batch, f"{stage or split}.batch")
    positions = layout.local_positions(batch)
    for step, local in data_loader.iterate(run.cfg.data.store, split, batch=batch, seed=split_seed(run, split),
                                           start_step=start, fields=("acts",), only=only, positions=positions):
        if stage is not None and (poison := faults.point(f"train.{stage}.batch")) in ("nan", "inf"):
            local["acts"] = np.full_like(local["acts"], np.nan if poison == "nan" else np.inf)  # tests only
        yield step, to_global(run, make(run, local) if make else {"acts": local["acts"]}, batch)


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
