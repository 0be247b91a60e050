"""PartWriter: one process's crash-safe appends to its own store part.

`append` follows the commit protocol of the package docstring: rows past the committed count
first, then a fresh stats sidecar under a new name, then the atomic replace of ledger.json.
The part directory is locked while a writer has it open, so two processes never append to the same
part: a flock on a local disk (it goes with the process, kill -9 included), a lease on an object
store (a crashed writer's successor takes it over within one lease; `nla_jax.locks`).
"""
from __future__ import annotations

import json

import numpy as np
import tensorstore as ts

from nla_jax import faults, locks, paths
from nla_jax.data.store import arrays as arrays_lib
from nla_jax.data.store import ledger as ledger_lib
from nla_jax.data.store import normstats
from nla_jax.data.store.arrays import ARRAYS, DTYPES, INT_DTYPES, PREDICTIONS, PROB_DTYPE
from nla_jax.errors import UserError, disk_full, disk_full_error

# what a crash while writing a part can leave beside its ledger: stats sidecars (current or not)
# and the temporary files of fileio.write_atomic (".<name>.tmp-<pid>") of a sidecar or the ledger
_OWN_FILE_PREFIXES = (normstats.SIDECAR_PREFIX, ledger_lib.LEDGER,
                      "." + normstats.SIDECAR_PREFIX, f".{ledger_lib.LEDGER}.tmp-")


def _is_stale(fname: str, keep: str) -> bool:
    """A sidecar the ledger no longer names, or a temporary file of a write a crash cut short."""
    if fname.startswith(normstats.SIDECAR_PREFIX):
        return fname != keep
    return fname.startswith(("." + normstats.SIDECAR_PREFIX, f".{ledger_lib.LEDGER}.tmp-"))


class PartWriter:
    """Appends rows to one part; `append` is the commit point (see the package docstring)."""

    def __init__(self, part_dir: str, ledger: dict, arrays: dict[str, ts.TensorStore],
                 stats: dict[str, np.ndarray], lock: locks.Lock):
        self.part_dir, self._ledger, self._arrays, self._stats = part_dir, ledger, arrays, stats
        self._lock: locks.Lock | None = lock
        self.config: dict = ledger["config"]

    @classmethod
    def create_or_resume(cls, root: str, part: int, *, d: int, dtype: str, capacity: int,
                         ctx_len: int, chunk_rows: int = 256, shard_chunks: int = 8,
                         meta: dict, top_k: int = 0) -> "PartWriter":
        """Open part `part` of store `root`, creating it if new; refuse one made for other data.

        meta (JSON) must hold "fingerprint" (a string naming model, weights and layer) and
        "split_names"; a resumed part must match (d, dtype, ctx_len, capacity, fingerprint,
        split_names, top_k) exactly. chunk_rows (rows per inner chunk) and shard_chunks (inner chunks
        per shard file) only apply at creation: an append rewrites the shard files it touches, so
        append in batches that are large next to chunk_rows * shard_chunks. top_k > 0 adds the
        arrays of the target's top_k next-token predictions per row (arrays.PREDICTIONS).
        """
        if dtype not in DTYPES:
            raise UserError(f"store dtype {dtype!r} not supported; expected one of {sorted(DTYPES)}")
        for key in ("fingerprint", "split_names"):
            if key not in meta:
                raise UserError(f"store meta lacks {key!r} (got keys {sorted(meta)})")
        names = list(meta["split_names"])
        if not 0 < len(names) <= 255:
            raise UserError(f"store meta split_names must have 1..255 names, got {names}")
        for key, v in (("d", d), ("capacity", capacity), ("ctx_len", ctx_len),
                       ("chunk_rows", chunk_rows), ("shard_chunks", shard_chunks)):
            if int(v) <= 0:
                raise UserError(f"store {key} must be > 0, got {v}")
        if int(top_k) < 0:
            raise UserError(f"store top_k must be >= 0, got {top_k}")
        part_dir = paths.join(root, arrays_lib.part_name(part))
        paths.makedirs(part_dir)
        lock = locks.Lock(paths.join(part_dir, ".lock"))
        try:
            lock.acquire()
        except locks.Busy as e:
            raise UserError(f"{part_dir} is being written by another process (lock held by {e})") from None
        try:
            want = {"d": int(d), "dtype": dtype, "ctx_len": int(ctx_len), "capacity": int(capacity),
                    "fingerprint": meta["fingerprint"], "split_names": names}
            if int(top_k):   # absent when 0, so parts without predictions keep their old ledger config
                want["top_k"] = int(top_k)
            if paths.exists(ledger_lib.path_in(part_dir)):
                ledger, arrays, stats = cls._resume(part_dir, want)
            else:
                shard_rows = min(chunk_rows * shard_chunks, -(-capacity // chunk_rows) * chunk_rows)
                cfg = dict(want, chunk_rows=int(chunk_rows), shard_rows=int(shard_rows))
                ledger, arrays, stats = cls._create(part_dir, int(part), cfg, meta)
            keep = ledger["stats"]["file"]
            for f in paths.listdir(part_dir):  # leftovers of crashed or superseded commits
                if _is_stale(f, keep):
                    paths.remove(paths.join(part_dir, f))
        except BaseException:
            lock.release()
            raise
        return cls(part_dir, ledger, arrays, stats, lock)

    @staticmethod
    def _resume(part_dir: str, want: dict) -> tuple[dict, dict[str, ts.TensorStore], dict[str, np.ndarray]]:
        """Ledger, arrays and running sums of an existing part, once its config matches `want`."""
        ledger = ledger_lib.read(part_dir)
        cfg = ledger.get("config", {})
        have, k = arrays_lib.top_k_of(cfg), arrays_lib.top_k_of(want)
        if have != k:
            raise UserError(f"store part {part_dir} stores {have} next-token predictions per row, this run "
                            f"{k} (config key data.top_k must stay as it was to resume; or extract into a "
                            f"fresh data.store)")
        for key in ledger_lib.CHECKED_KEYS:
            if cfg.get(key) != want[key]:
                raise UserError(
                    f"store part {part_dir} was written by another model/layer: {key} is "
                    f"{cfg.get(key)!r} in the store, {want[key]!r} requested")
        arrays = arrays_lib.open_arrays(part_dir, cfg)
        stats = normstats.load_sidecar(paths.join(part_dir, ledger["stats"]["file"]),
                                       ledger["stats"]["sha256"])
        return ledger, arrays, stats

    @staticmethod
    def _create(part_dir: str, part: int, cfg: dict,
                meta: dict) -> tuple[dict, dict[str, ts.TensorStore], dict[str, np.ndarray]]:
        """A new part with no rows committed: empty arrays, zero sums, then its first ledger.

        With no ledger nothing was ever committed, so (re)creating is safe, but only over our
        own leftovers, never over a directory holding something else.
        """
        ours = set(ARRAYS + PREDICTIONS) | {".lock"}
        alien = [f for f in paths.listdir(part_dir) if f not in ours and not f.startswith(_OWN_FILE_PREFIXES)]
        if alien:
            raise UserError(f"{part_dir} has no {ledger_lib.LEDGER} but holds {sorted(alien)[:5]}; "
                            f"expected an empty or new store part directory")
        arrays_lib.create_arrays(part_dir, cfg)
        arrays = arrays_lib.open_arrays(part_dir, cfg)
        stats = normstats.empty_stats(len(cfg["split_names"]), cfg["d"])
        ledger = {"format": ledger_lib.FORMAT, "part": part, "config": cfg,
                  "meta": meta, "committed": 0, "cursor": {}, "commits": []}
        ledger["stats"] = normstats.write_sidecar(part_dir, 0, stats)
        ledger_lib.write(part_dir, ledger)
        return ledger, arrays, stats

    @property
    def committed(self) -> int:
        """Rows [0, committed) are durable and covered by the ledger."""
        return int(self._ledger["committed"])

    @property
    def cursor(self) -> dict:
        """The caller's resume point, as passed to the last successful append."""
        return dict(self._ledger["cursor"])

    @property
    def capacity(self) -> int:
        return int(self.config["capacity"])

    def close(self) -> None:
        """Release the part lock (also released by process exit, kill -9 included)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_ledger(self, ledger: dict) -> None:
        """The commit point (a method of its own so tests can crash right before it)."""
        ledger_lib.write(self.part_dir, ledger)

    def append(self, acts: np.ndarray, doc_id: np.ndarray, position: np.ndarray,
               split: np.ndarray, tokens: np.ndarray, cursor: dict, top_ids: np.ndarray | None = None,
               top_probs: np.ndarray | None = None) -> None:
        """Write rows [committed, committed + n) of all arrays, then commit them with `cursor`.

        acts [n, d] (cast to the store dtype; stats use the cast values), doc_id [n] >= 0,
        position [n] in [0, ctx_len), split [n] index into split_names, tokens [n, ctx_len]
        (tokens[:position+1] real ids, then -1); in a part with top_k > 0 also top_ids [n, top_k]
        and top_probs [n, top_k] (the target's most likely next tokens, most likely first).
        """
        cfg = self.config
        d, ctx_len, S, k = cfg["d"], cfg["ctx_len"], len(cfg["split_names"]), arrays_lib.top_k_of(cfg)
        acts = np.asarray(acts)
        n = acts.shape[0] if acts.ndim == 2 else -1
        rows = {"acts": np.ascontiguousarray(acts.astype(DTYPES[cfg["dtype"]]))}       # [n, d]
        for name, x in (("doc_id", doc_id), ("position", position), ("split", split), ("tokens", tokens)):
            rows[name] = np.ascontiguousarray(np.asarray(x).astype(INT_DTYPES[name]))
        want = {"acts": (n, d), "doc_id": (n,), "position": (n,), "split": (n,), "tokens": (n, ctx_len)}
        if (top_ids is None) != (top_probs is None) or (top_ids is not None) != bool(k):
            raise ValueError(f"append: part {self.part_dir} stores top_k={k} predictions per row; "
                             f"top_ids and top_probs must be given exactly when top_k > 0")
        if k:
            rows["top_ids"] = np.ascontiguousarray(np.asarray(top_ids).astype(INT_DTYPES["top_ids"]))
            rows["top_probs"] = np.ascontiguousarray(np.asarray(top_probs).astype(PROB_DTYPE))
            want.update(top_ids=(n, k), top_probs=(n, k))
        for name, shape in want.items():
            if rows[name].shape != shape or n < 0:
                raise ValueError(f"append: {name} has shape {rows[name].shape}, expected {shape}")
        start, stop = self.committed, self.committed + n
        if stop > self.capacity:
            raise UserError(f"store part {self.part_dir}: appending {n} rows at {start} exceeds "
                            f"capacity {self.capacity}")
        bad = arrays_lib.row_problems(rows, ctx_len, S, start)
        if bad and bad[0].startswith("acts"):  # the model produced inf/nan: not a caller bug
            raise UserError(f"store part {self.part_dir} rows {start}:{stop}: {bad[0]}; "
                            f"refusing to store them (try a float32 model dtype)")
        if bad:
            raise ValueError(f"append to {self.part_dir} rows {start}:{stop}: " + "; ".join(bad))
        if n == 0:
            return
        json.dumps(cursor)  # fail before writing anything if the cursor is not JSON
        try:
            names = arrays_lib.array_names(cfg)
            futures = [self._arrays[name][start:stop].write(rows[name]) for name in names]
            for f in futures:
                f.result()
            faults.point("store.append.data")
            stats = {k: v.copy() for k, v in self._stats.items()}
            normstats.add_stats(stats, rows["acts"], rows["split"])
            commits = self._ledger["commits"] + [
                {"start": start, "stop": stop, "sha256": {name: arrays_lib.rows_sha(rows[name]) for name in names}}]
            ledger = dict(self._ledger, committed=stop, cursor=dict(cursor), commits=commits)
            ledger["stats"] = normstats.write_sidecar(self.part_dir, len(commits), stats)
            faults.point("store.append.stats")
            self._write_ledger(ledger)  # the commit point
        except Exception as e:
            if disk_full(e):  # nothing was committed: the old ledger still describes the part
                raise disk_full_error(f"rows {start}:{stop} of store part {self.part_dir} "
                                      f"({self.committed} rows committed before)", e) from None
            raise
        faults.point("store.append.ledger")
        old = self._ledger["stats"]["file"]
        self._ledger, self._stats = ledger, stats
        try:
            paths.remove(paths.join(self.part_dir, old))
        except OSError:
            pass
