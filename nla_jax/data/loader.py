"""Batches of one split of the activation store, as global jax arrays on the mesh.

The rows of global batch `step` are a pure function of (seed, step): epoch e = step*B // n
uses permutation(seed, e) of the split's rows (rows in canonical (doc_id, position) order, so
the store's part layout does not matter). Resuming at step N therefore needs no iterator
state, and 1 process or P processes see the same global batches. Each process reads the positions
of each global batch that its devices hold (`sharding.BatchLayout.local_positions`: processes
holding replicas of one batch shard read the same rows) and `jax.make_array_from_process_local_data`
joins them; without a layout, process p reads rows [p*B/P, (p+1)*B/P). grain runs the reads ahead
of the consumer on a thread pool.
"""
from __future__ import annotations

from typing import Iterator

import grain
import jax
import numpy as np

from nla_jax import sharding
from nla_jax.data import store as store_lib
from nla_jax.errors import UserError


class SplitOrder:
    """Pure index arithmetic: which split rows make up global batch `step`."""

    def __init__(self, store: store_lib.Store, split: str, batch: int, seed: int,
                 only: np.ndarray | None = None):
        rows = store.rows_of_split(split)  # global row ids, ascending
        if only is not None:  # e.g. the rows that have teacher summaries
            rows = rows[np.isin(rows, only)]
        if len(rows) == 0:
            raise UserError(f"split {split!r} of store {store.root} is empty"
                            + (" (after keeping only the rows asked for)" if only is not None else ""))
        if batch > len(rows):
            raise UserError(f"batch {batch} is larger than split {split!r} ({len(rows)} rows)")
        doc, pos = _columns(store, rows)
        self.rows = rows[np.lexsort((pos, doc))]  # canonical order, independent of parts
        self.batch, self.seed, self.n = batch, seed, len(rows)
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = {epoch: rng.permutation(self.n)}
        return self._perm_cache[epoch]

    def global_rows(self, step: int) -> np.ndarray:
        """Store row ids [batch] of global batch `step` (batches never straddle epochs)."""
        per_epoch = self.n // self.batch
        epoch, i = divmod(step, per_epoch)
        return self.rows[self._perm(epoch)[i * self.batch:(i + 1) * self.batch]]

    def local_rows(self, step: int, positions: np.ndarray) -> np.ndarray:
        """The store rows at `positions` of global batch `step`."""
        return self.global_rows(step)[positions]


def even_positions(batch: int, process: int, num_processes: int) -> np.ndarray:
    """Process p's positions when every process holds its own equal slice of the batch."""
    if batch % num_processes:
        raise UserError(f"global batch {batch} is not divisible by {num_processes} processes")
    k = batch // num_processes
    return np.arange(process * k, (process + 1) * k)


def _columns(store: store_lib.Store, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """doc_id and position of `rows`, reading only those two arrays."""
    got = store.read(None, rows, fields=("doc_id", "position"))
    return got["doc_id"].astype(np.int64), got["position"].astype(np.int64)


def iterate(store_root: str, split: str, *, batch: int, seed: int, start_step: int = 0,
            process: int | None = None, num_processes: int | None = None, prefetch: int = 2,
            fields: tuple[str, ...] = ("acts", "doc_id", "position", "tokens"),
            only: np.ndarray | None = None, positions: np.ndarray | None = None,
            batch_rows: bool = False) -> Iterator[tuple[int, dict]]:
    """(step, host-local numpy batch) from `start_step` on, read ahead by grain threads.

    The batch also holds "row" (global store row ids); `only` restricts the split to those rows.
    `positions`: the positions of each global batch this process reads (BatchLayout.local_positions);
    default an even split by process. batch_rows: also "batch_rows", the whole global batch's row
    ids (every process's), for what every process must decide alike (the batch's padded width).
    """
    if positions is None:
        process = jax.process_index() if process is None else process
        num_processes = jax.process_count() if num_processes is None else num_processes
        positions = even_positions(batch, process, num_processes)
    store = store_lib.open_store(store_root)
    order = SplitOrder(store, split, batch, seed, only)

    def read(step: int) -> tuple[int, dict]:
        rows = order.local_rows(step, positions)
        out = store.read(None, rows, fields=fields)
        out["row"] = rows.astype(np.int64)
        if batch_rows:
            out["batch_rows"] = order.global_rows(step).astype(np.int64)
        return step, out

    ds = grain.MapDataset.range(start_step, 2 ** 62).map(read)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
    yield from it


def to_global(local: dict, mesh, rules, global_batch: int | None = None) -> dict:
    """Host-local batch -> global arrays sharded along the batch axis of the mesh. `global_batch`:
    the global row count (required when processes hold replicas of a batch shard, where it cannot
    be inferred from the local rows)."""
    out = {}
    for k, v in local.items():
        axes = ("batch",) + (None,) * (v.ndim - 1)
        shape = None if global_batch is None else (global_batch,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding.named_sharding(axes, None, mesh, rules), v, shape)
    return out
