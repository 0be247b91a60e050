"""On-disk activation store: one crash-safe writer per part, parts joined by a manifest.

Layout of a store directory ROOT::

    ROOT/manifest.json          finalize_manifest: meta, part row counts + checksums, split stats
    ROOT/stats.npz              summed norm statistics of all parts (referenced by the manifest)
    ROOT/part-00000/            one per writer process
        acts/ doc_id/ position/ split/ tokens/     zarr3 arrays, sharding_indexed codec
        ledger.json             committed row count, caller cursor, per-commit sha256, config
        stats-<ncommits>.npz    per-split running sums (referenced by the ledger with its sha256)

Crash safety: `append` writes the rows past the committed count first and waits for them, then
writes a fresh stats sidecar under a new name, then atomically replaces ledger.json (temp file,
fsync, rename, fsync dir). The ledger is the only commit point, so a kill -9 anywhere leaves the
old or the new ledger; rows past it are garbage the next append overwrites. tensorstore's file
kvstore replaces each shard file by rename, so committed rows sharing a shard with the rows being
written are never torn.

Rows are global in part order: global row = part offset + local row.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import re
from typing import Any, Sequence

import ml_dtypes
import numpy as np
import tensorstore as ts

from nla_jax import faults
from nla_jax.errors import UserError, disk_full, disk_full_error

ARRAYS = ("acts", "doc_id", "position", "split", "tokens")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
INT_DTYPES = {"doc_id": np.dtype("<i8"), "position": np.dtype("<i4"), "split": np.dtype("u1"),
              "tokens": np.dtype("<i4")}
PAD = -1  # tokens after the position
LEDGER, MANIFEST = "ledger.json", "manifest.json"
PART_RE = re.compile(r"^part-(\d{5})$")
CHECKED_KEYS = ("d", "dtype", "ctx_len", "capacity", "fingerprint", "split_names")
_STATS_BLOCK = 512  # rows per float64 block when summing v_nrm (bounds memory at large d)


def part_name(part: int) -> str:
    return f"part-{part:05d}"


# ----------------------------------------------------------------------------- small helpers

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    """Temp file + fsync + rename + dir fsync: readers (and a crash) see old or new, never torn."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _load_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            out = json.loads(f.read())
    except FileNotFoundError:
        raise UserError(f"{path}: missing")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot parse ({e})")
    if not isinstance(out, dict):
        raise UserError(f"{path}: expected a JSON object")
    return out


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _commits_sha(commits: list[dict]) -> str:
    """Per-part data checksum: sha256 of the canonical JSON of its commit records."""
    return hashlib.sha256(json.dumps(commits, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------- norm statistics

def empty_stats(num_splits: int, d: int) -> dict[str, np.ndarray]:
    """Per-split running sums; v_nrm = v / ||v|| * sqrt(d) (zero rows give v_nrm = 0)."""
    return {"count": np.zeros(num_splits, np.int64),       # [S]
            "sum_norm": np.zeros(num_splits),              # [S] sum ||v||
            "sum_norm_sq": np.zeros(num_splits),           # [S] sum ||v||^2
            "sum_nrm_sq": np.zeros(num_splits),            # [S] sum ||v_nrm||^2 (= d per nonzero row)
            "sum_nrm": np.zeros((num_splits, d))}          # [S, d] sum v_nrm


def add_stats(stats: dict[str, np.ndarray], acts: np.ndarray, split: np.ndarray) -> None:
    """Accumulate rows into `stats` in place, in float64, in a fixed order (bit-reproducible).

    No BLAS (its reduction order may depend on the thread count): a resumed run must reproduce
    a clean run's sums exactly.
    """
    d, num_splits = acts.shape[1], stats["count"].shape[0]
    for b in range(0, len(acts), _STATS_BLOCK):
        order = np.argsort(split[b:b + _STATS_BLOCK], kind="stable")   # rows grouped by split
        s = split[b:b + _STATS_BLOCK][order]                           # [n] ascending
        v = acts[b:b + _STATS_BLOCK][order].astype(np.float64)        # [n, d]
        norm = np.sqrt(np.einsum("ij,ij->i", v, v))                   # [n]
        w = np.where(norm > 0, math.sqrt(d) / np.where(norm > 0, norm, 1.0), 0.0)
        v *= w[:, None]                                               # [n, d] v_nrm
        nrm_sq = (w * norm) ** 2                                      # [n] ||v_nrm||^2
        edges = np.searchsorted(s, np.arange(num_splits + 1))
        for k in range(num_splits):
            lo, hi = edges[k], edges[k + 1]
            if hi > lo:
                stats["count"][k] += hi - lo
                stats["sum_norm"][k] += norm[lo:hi].sum()
                stats["sum_norm_sq"][k] += (norm[lo:hi] ** 2).sum()
                stats["sum_nrm_sq"][k] += nrm_sq[lo:hi].sum()
                stats["sum_nrm"][k] += v[lo:hi].sum(axis=0)


def summarize_stats(stats: dict[str, np.ndarray], split_names: Sequence[str]) -> dict[str, dict]:
    """{split: {rows, mean_norm, var_nrm}} with Var(v_nrm) = E||v_nrm - E v_nrm||^2 / d."""
    d = stats["sum_nrm"].shape[1]
    out = {}
    for k, name in enumerate(split_names):
        n = int(stats["count"][k])
        if n == 0:
            out[name] = {"rows": 0, "mean_norm": None, "var_nrm": None}
            continue
        mu = stats["sum_nrm"][k] / n
        out[name] = {"rows": n, "mean_norm": float(stats["sum_norm"][k] / n),
                     "var_nrm": float((stats["sum_nrm_sq"][k] / n - float(mu @ mu)) / d)}
    return out


def _stats_bytes(stats: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **stats)
    return buf.getvalue()


def _load_stats(path: str, sha256: str) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read stats sidecar ({e})")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path}: sha256 differs from the one in the ledger")
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- tensorstore arrays

def _spec(path: str, shape: list[int], dtype: str, chunk_rows: int, shard_rows: int,
          compress: bool) -> dict:
    """zarr3 array of shards of [shard_rows, ...] holding inner chunks of [chunk_rows, ...].

    Inner chunks carry crc32c so a corrupted shard fails to read instead of returning wrong
    numbers; acts are stored uncompressed (float activations barely compress), ints zstd.
    """
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compress:
        inner.append({"name": "zstd", "configuration": {"level": 3}})
    inner.append({"name": "crc32c"})
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": path},
            "metadata": {
                "shape": shape, "data_type": dtype,
                "chunk_grid": {"name": "regular",
                               "configuration": {"chunk_shape": [shard_rows] + shape[1:]}},
                "codecs": [{"name": "sharding_indexed", "configuration": {
                    "chunk_shape": [chunk_rows] + shape[1:], "codecs": inner,
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                     {"name": "crc32c"}],
                    "index_location": "end"}}],
                "fill_value": 0 if dtype in ("float32", "bfloat16", "uint8") else PAD}}


def _shapes(cfg: dict) -> dict[str, list[int]]:
    c = cfg["capacity"]
    return {"acts": [c, cfg["d"]], "doc_id": [c], "position": [c], "split": [c],
            "tokens": [c, cfg["ctx_len"]]}


def _open_arrays(part_dir: str, cfg: dict) -> dict[str, ts.TensorStore]:
    """Open the five existing arrays and check their shapes/dtypes against the ledger config."""
    out = {}
    for name, shape in _shapes(cfg).items():
        path = os.path.join(part_dir, name)
        try:
            arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}},
                          open=True).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/OSError variants
            raise UserError(f"{path}: cannot open zarr3 array ({str(e).splitlines()[0]})")
        want = cfg["dtype"] if name == "acts" else INT_DTYPES[name].name
        if list(arr.shape) != shape or arr.dtype.numpy_dtype != np.dtype(DTYPES.get(want, want)):
            raise UserError(f"{path}: shape {list(arr.shape)} dtype {arr.dtype.name}, "
                            f"ledger expects {shape} {want}")
        out[name] = arr
    return out


def _shard_keys(cfg: dict, name: str, rows: int) -> list[str]:
    """Relative paths of the shard files that hold rows [0, rows) (default chunk key encoding)."""
    extra = "/0" if name in ("acts", "tokens") else ""
    return [f"c/{i}{extra}" for i in range(-(-rows // cfg["shard_rows"]))]


# ----------------------------------------------------------------------------- writer

class PartWriter:
    """Appends rows to one part; `append` is the commit point (see module docstring)."""

    def __init__(self, part_dir: str, ledger: dict, arrays: dict[str, ts.TensorStore],
                 stats: dict[str, np.ndarray], lock_fd: int):
        self.part_dir, self._ledger, self._arrays, self._stats = part_dir, ledger, arrays, stats
        self._lock_fd: int | None = lock_fd
        self.config: dict = ledger["config"]

    @classmethod
    def create_or_resume(cls, root: str, part: int, *, d: int, dtype: str, capacity: int,
                         ctx_len: int, chunk_rows: int = 256, shard_chunks: int = 8,
                         meta: dict) -> "PartWriter":
        """Open part `part` of store `root`, creating it if new; refuse one made for other data.

        meta (JSON) must hold "fingerprint" (a string naming model, weights and layer) and
        "split_names"; a resumed part must match (d, dtype, ctx_len, capacity, fingerprint,
        split_names) exactly. chunk_rows (rows per inner chunk) and shard_chunks (inner chunks
        per shard file) only apply at creation: an append rewrites the shard files it touches, so
        append in batches that are large next to chunk_rows * shard_chunks.
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
        part_dir = os.path.join(root, part_name(part))
        os.makedirs(part_dir, exist_ok=True)
        lock_fd = os.open(os.path.join(part_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise UserError(f"{part_dir} is being written by another process (lock held)")
        try:
            want = {"d": int(d), "dtype": dtype, "ctx_len": int(ctx_len), "capacity": int(capacity),
                    "fingerprint": meta["fingerprint"], "split_names": names}
            ledger_path = os.path.join(part_dir, LEDGER)
            if os.path.exists(ledger_path):
                ledger = _load_json(ledger_path)
                cfg = ledger.get("config", {})
                for key in CHECKED_KEYS:
                    if cfg.get(key) != want[key]:
                        raise UserError(
                            f"store part {part_dir} was written by another model/layer: {key} is "
                            f"{cfg.get(key)!r} in the store, {want[key]!r} requested")
                arrays = _open_arrays(part_dir, cfg)
                stats = _load_stats(os.path.join(part_dir, ledger["stats"]["file"]),
                                    ledger["stats"]["sha256"])
            else:
                # No ledger: nothing was ever committed, so (re)creating is safe, but only over
                # our own leftovers, never over a directory holding something else.
                ours = set(ARRAYS) | {".lock"}
                alien = [f for f in os.listdir(part_dir)
                         if f not in ours and not f.startswith(("stats-", LEDGER))]
                if alien:
                    raise UserError(f"{part_dir} has no {LEDGER} but holds {sorted(alien)[:5]}; "
                                    f"expected an empty or new store part directory")
                shard_rows = min(chunk_rows * shard_chunks, -(-capacity // chunk_rows) * chunk_rows)
                cfg = dict(want, chunk_rows=int(chunk_rows), shard_rows=int(shard_rows))
                for name, shape in _shapes(cfg).items():
                    dt = dtype if name == "acts" else INT_DTYPES[name].name
                    ts.open(_spec(os.path.join(part_dir, name), shape, dt, chunk_rows, shard_rows,
                                  compress=name != "acts"), create=True, delete_existing=True).result()
                arrays = _open_arrays(part_dir, cfg)
                stats = empty_stats(len(names), d)
                ledger = {"format": "nla_jax.store.part/1", "part": int(part), "config": cfg,
                          "meta": meta, "committed": 0, "cursor": {}, "commits": []}
                ledger["stats"] = cls._write_stats(part_dir, 0, stats)
                _write_atomic(ledger_path, _json_bytes(ledger))
            keep = ledger["stats"]["file"]
            for f in os.listdir(part_dir):  # sidecars of crashed or superseded commits
                if f.startswith("stats-") and f != keep:
                    os.remove(os.path.join(part_dir, f))
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(part_dir, ledger, arrays, stats, lock_fd)

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
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _write_stats(part_dir: str, ncommits: int, stats: dict[str, np.ndarray]) -> dict:
        data = _stats_bytes(stats)
        fname = f"stats-{ncommits:08d}.npz"
        _write_atomic(os.path.join(part_dir, fname), data)
        return {"file": fname, "sha256": hashlib.sha256(data).hexdigest()}

    def _write_ledger(self, ledger: dict) -> None:
        _write_atomic(os.path.join(self.part_dir, LEDGER), _json_bytes(ledger))

    def append(self, acts: np.ndarray, doc_id: np.ndarray, position: np.ndarray,
               split: np.ndarray, tokens: np.ndarray, cursor: dict) -> None:
        """Write rows [committed, committed + n) of all arrays, then commit them with `cursor`.

        acts [n, d] (cast to the store dtype; stats use the cast values), doc_id [n] >= 0,
        position [n] in [0, ctx_len), split [n] index into split_names, tokens [n, ctx_len]
        (tokens[:position+1] real ids, then -1).
        """
        cfg = self.config
        d, ctx_len, S = cfg["d"], cfg["ctx_len"], len(cfg["split_names"])
        acts = np.asarray(acts)
        n = acts.shape[0] if acts.ndim == 2 else -1
        rows = {"acts": np.ascontiguousarray(acts.astype(DTYPES[cfg["dtype"]]))}
        for name, x in (("doc_id", doc_id), ("position", position), ("split", split), ("tokens", tokens)):
            rows[name] = np.ascontiguousarray(np.asarray(x).astype(INT_DTYPES[name]))
        want = {"acts": (n, d), "doc_id": (n,), "position": (n,), "split": (n,), "tokens": (n, ctx_len)}
        for name, shape in want.items():
            if rows[name].shape != shape or n < 0:
                raise ValueError(f"append: {name} has shape {rows[name].shape}, expected {shape}")
        start, stop = self.committed, self.committed + n
        if stop > self.capacity:
            raise UserError(f"store part {self.part_dir}: appending {n} rows at {start} exceeds "
                            f"capacity {self.capacity}")
        bad = _row_problems(rows, ctx_len, S, start)
        if bad and bad[0].startswith("acts"):  # the model produced inf/nan: not a caller bug
            raise UserError(f"store part {self.part_dir} rows {start}:{stop}: {bad[0]}; "
                            f"refusing to store them (try a float32 model dtype)")
        if bad:
            raise ValueError(f"append to {self.part_dir} rows {start}:{stop}: " + "; ".join(bad))
        if n == 0:
            return
        json.dumps(cursor)  # fail before writing anything if the cursor is not JSON
        try:
            futures = [self._arrays[name][start:stop].write(rows[name]) for name in ARRAYS]
            for f in futures:
                f.result()
            faults.point("store.append.data")
            stats = {k: v.copy() for k, v in self._stats.items()}
            add_stats(stats, rows["acts"], rows["split"])
            commits = self._ledger["commits"] + [
                {"start": start, "stop": stop, "sha256": {name: _sha(rows[name]) for name in ARRAYS}}]
            ledger = dict(self._ledger, committed=stop, cursor=dict(cursor), commits=commits)
            ledger["stats"] = self._write_stats(self.part_dir, len(commits), stats)
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
            os.remove(os.path.join(self.part_dir, old))
        except OSError:
            pass


def _row_problems(rows: dict[str, np.ndarray | None], ctx_len: int, num_splits: int,
                  base: int = 0) -> list[str]:
    """Range checks on rows base.. of a part; each entry: "<array>: <what> (first at row r)"."""
    out = []

    def report(name: str, mask: np.ndarray, what: str) -> None:
        if mask.any():
            out.append(f"{name}: {int(mask.sum())} rows {what} (first at row {base + int(np.argmax(mask))})")

    if rows.get("acts") is not None:
        report("acts", ~np.isfinite(rows["acts"].astype(np.float32)).all(axis=1), "non-finite")
    if rows.get("doc_id") is not None:
        report("doc_id", rows["doc_id"] < 0, "negative")
    if rows.get("split") is not None:
        report("split", rows["split"] >= num_splits, f"not in [0, {num_splits})")
    pos = rows.get("position")
    if pos is not None:
        report("position", (pos < 0) | (pos >= ctx_len), f"not in [0, {ctx_len})")
        if rows.get("tokens") is not None:
            col = np.arange(ctx_len)[None, :]                         # [1, ctx_len]
            p = np.clip(pos, -1, ctx_len - 1)[:, None]                # [n, 1]
            tok = rows["tokens"]
            report("tokens", ((col <= p) & (tok == PAD)).any(axis=1), "with -1 at or before the position")
            report("tokens", ((col > p) & (tok != PAD)).any(axis=1), "not -1 after the position")
    return out


# ----------------------------------------------------------------------------- manifest + reader

def _part_dirs(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise UserError(f"store {root}: not a directory")
    return sorted(f for f in os.listdir(root) if PART_RE.match(f) and os.path.isdir(os.path.join(root, f)))


def finalize_manifest(root: str, meta: dict, *, num_parts: int | None = None) -> dict:
    """Join all parts of `root` into manifest.json (+ stats.npz); returns the manifest.

    Call once every writer is done. meta (JSON) is recorded as given; it must hold "split_names"
    and, if it holds "fingerprint", every part must have been written with the same one.
    """
    if "split_names" not in meta:
        raise UserError(f"store meta lacks 'split_names' (got keys {sorted(meta)})")
    names = _part_dirs(root)
    if not names:
        raise UserError(f"store {root}: no part-NNNNN directories")
    expect = [part_name(i) for i in range(num_parts if num_parts is not None else len(names))]
    if names != expect:
        raise UserError(f"store {root}: parts {names}, expected {expect}")
    parts, total, first = [], None, None
    for name in names:
        pdir = os.path.join(root, name)
        ledger = _load_json(os.path.join(pdir, LEDGER))
        cfg = ledger["config"]
        ref = first or dict(cfg, fingerprint=meta.get("fingerprint", cfg["fingerprint"]),
                            split_names=list(meta["split_names"]))
        first = first or ref
        for key in ("d", "dtype", "ctx_len", "fingerprint", "split_names"):
            if cfg[key] != ref[key]:
                raise UserError(f"store part {pdir} was written by another model/layer: {key} is "
                                f"{cfg[key]!r} there, {ref[key]!r} expected")
        stats = _load_stats(os.path.join(pdir, ledger["stats"]["file"]), ledger["stats"]["sha256"])
        total = stats if total is None else {k: total[k] + stats[k] for k in total}
        parts.append({"name": name, "rows": ledger["committed"], "capacity": cfg["capacity"],
                      "commits": len(ledger["commits"]), "sha256": _commits_sha(ledger["commits"])})
    data = _stats_bytes(total)
    _write_atomic(os.path.join(root, "stats.npz"), data)
    manifest = {"format": "nla_jax.store/1", "meta": meta, "d": first["d"], "dtype": first["dtype"],
                "ctx_len": first["ctx_len"], "split_names": list(meta["split_names"]),
                "parts": parts, "num_rows": sum(p["rows"] for p in parts),
                "splits": summarize_stats(total, meta["split_names"]),
                "stats": {"file": "stats.npz", "sha256": hashlib.sha256(data).hexdigest()}}
    _write_atomic(os.path.join(root, MANIFEST), _json_bytes(manifest))
    return manifest


class Store:
    """Read side of a finalized store; rows are global (parts concatenated in part order)."""

    def __init__(self, root: str):
        self.root = root
        self.manifest: dict = _load_json(os.path.join(root, MANIFEST))
        m = self.manifest
        self.split_names: list[str] = list(m["split_names"])
        self.d, self.dtype, self.ctx_len = m["d"], m["dtype"], m["ctx_len"]
        self._rows = np.array([p["rows"] for p in m["parts"]], np.int64)           # [P]
        self._offsets = np.concatenate([[0], np.cumsum(self._rows)])               # [P+1]
        self._arrays = []
        if m.get("num_rows") != int(self._rows.sum()):
            raise UserError(f"store {root}: manifest.json says {m.get('num_rows')} rows but its parts list "
                            f"{int(self._rows.sum())}; {_VERIFY}")
        for p in m["parts"]:
            pdir = os.path.join(root, p["name"])
            ledger = _load_json(os.path.join(pdir, LEDGER))
            _check_part(root, p, ledger)
            self._arrays.append(_open_arrays(pdir, ledger["config"]))
        self._split_rows: dict[str, np.ndarray] = {}

    def _result(self, fut, part: int, name: str, local: np.ndarray) -> np.ndarray:
        """A read's numpy result; a damaged shard (crc32c, truncated index) becomes a one-line
        UserError naming the part, array and rows."""
        try:
            return fut.result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/OSError variants
            first = " ".join(str(e).split())[:200]
            lo, hi = self._bad_chunk(part, name, local)
            raise UserError(f"store {self.root}: {self.manifest['parts'][part]['name']} {name} rows {lo}:{hi} "
                            f"do not read ({first}); {_VERIFY}") from None

    def _bad_chunk(self, part: int, name: str, local: np.ndarray) -> tuple[int, int]:
        """On the error path only: the first inner chunk among `local`'s rows that fails to read."""
        arr = self._arrays[part][name]
        step = int(arr.chunk_layout.read_chunk.shape[0] or 1)
        if len(local) == 0:
            return 0, 0
        for c in np.unique(np.asarray(local) // step):
            lo, hi = int(c) * step, min(int(c + 1) * step, int(self._rows[part]))
            try:
                arr[lo:hi].read().result()
            except Exception:  # noqa: BLE001
                return lo, hi
        return int(local.min()), int(local.max()) + 1

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    def rows_of_split(self, name: str) -> np.ndarray:
        """Global row ids [n_split] of split `name`, ascending (reads only the uint8 split array)."""
        if name not in self.split_names:
            raise UserError(f"split {name!r} not in store {self.root} (has {self.split_names})")
        if name not in self._split_rows:
            k = self.split_names.index(name)
            sp = np.concatenate([self._result(a["split"][:n].read(), i, "split", np.arange(n))
                                 for i, (a, n) in enumerate(zip(self._arrays, self._rows))]
                                + [np.zeros(0, np.uint8)])
            self._split_rows[name] = np.flatnonzero(sp == k).astype(np.int64)
        return self._split_rows[name]

    def read(self, split: str | None, rows: np.ndarray,
             fields: Sequence[str] = ARRAYS) -> dict[str, np.ndarray]:
        """Arrays for `rows` (global row ids if split is None, else indices into that split).

        Returns {acts [n, d], doc_id [n], position [n], split [n], tokens [n, ctx_len]} (or just
        `fields` of them: only those are read from disk), in the order of `rows` (duplicates
        allowed).
        """
        unknown = set(fields) - set(ARRAYS)
        if unknown:
            raise KeyError(f"unknown store fields {sorted(unknown)}; expected some of {ARRAYS}")
        rows = np.asarray(rows, np.int64).reshape(-1)
        if split is not None:
            rows = self.rows_of_split(split)[rows]
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row ids must be in [0, {self.num_rows}), got {rows.min()}..{rows.max()}")
        n = len(rows)
        shapes = {"acts": ((n, self.d), DTYPES[self.dtype]), "tokens": ((n, self.ctx_len), np.int32)}
        shapes.update({k: ((n,), INT_DTYPES[k]) for k in ("doc_id", "position", "split")})
        out = {k: np.empty(*shapes[k]) for k in fields}
        part = np.searchsorted(self._offsets, rows, side="right") - 1                # [n]
        pending = []
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            local = rows[sel] - self._offsets[p]
            uniq, inv = np.unique(local, return_inverse=True)  # sorted reads, then scatter back
            for name in fields:
                pending.append((name, sel, inv, p, uniq, self._arrays[p][name][uniq].read()))
        for name, sel, inv, p, uniq, fut in pending:
            out[name][sel] = self._result(fut, p, name, uniq)[inv]
        return out


_VERIFY = "run: python -m nla_jax.extract --config ... --verify"


def _check_part(root: str, mpart: dict, ledger: dict) -> None:
    """Cheap open-time checks of one part against the manifest (no array data read): the row
    count and data checksum the manifest recorded, and every shard file of the committed rows
    (a missing shard would otherwise read back as fill values, silently)."""
    name = mpart["name"]
    committed = int(ledger.get("committed", -1))
    if mpart.get("rows") != committed:
        raise UserError(f"store {root}: manifest.json says {name} has {mpart.get('rows')} rows, its {LEDGER} "
                        f"{committed}; {_VERIFY}")
    if mpart.get("sha256") != _commits_sha(ledger.get("commits", [])):
        raise UserError(f"store {root}: {name}'s commits differ from the checksum in manifest.json; {_VERIFY}")
    cfg = ledger["config"]
    for arr in ARRAYS:
        for i, key in enumerate(_shard_keys(cfg, arr, committed)):
            if not os.path.exists(os.path.join(root, name, arr, key)):
                lo, hi = i * cfg["shard_rows"], min((i + 1) * cfg["shard_rows"], committed)
                raise UserError(f"store {root}: {name} {arr} rows {lo}:{hi}: shard file {arr}/{key} is missing; "
                                f"{_VERIFY}")


def open_store(root: str) -> Store:
    """Open a finalized store (ROOT/manifest.json must exist: run finalize_manifest first)."""
    if not os.path.exists(os.path.join(root, MANIFEST)):
        raise UserError(f"{os.path.join(root, MANIFEST)}: missing; the store was not finalized")
    return Store(root)


# ----------------------------------------------------------------------------- verify

def verify(root: str) -> list[str]:
    """Recheck a store against its ledgers and manifest; one line per problem, [] if good."""
    problems: list[str] = []
    manifest = None
    try:
        manifest = _load_json(os.path.join(root, MANIFEST))
    except UserError as e:
        problems.append(str(e))
    try:
        names = _part_dirs(root)
    except UserError as e:
        return problems + [str(e)]
    mparts = {p.get("name"): p for p in manifest.get("parts", [])} if manifest else {}
    if manifest is not None and sorted(mparts) != names:
        problems.append(f"manifest.json: lists parts {sorted(mparts)}, directory holds {names}")
    total_stats, split_names = None, manifest.get("split_names") if manifest else None
    for name in names:
        pdir = os.path.join(root, name)
        try:
            ledger = _load_json(os.path.join(pdir, LEDGER))
            cfg, commits, committed = ledger["config"], ledger["commits"], int(ledger["committed"])
            stats = _load_stats(os.path.join(pdir, ledger["stats"]["file"]), ledger["stats"]["sha256"])
            arrays = _open_arrays(pdir, cfg)
        except UserError as e:
            problems.append(f"{name}: {e}")
            continue
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{name}: malformed {LEDGER} ({e.__class__.__name__}: {e})")
            continue
        split_names = split_names or cfg["split_names"]
        total_stats = stats if total_stats is None else {k: total_stats[k] + stats[k] for k in stats}
        if name in mparts:
            mp = mparts[name]
            if mp.get("rows") != committed:
                problems.append(f"{name}: manifest says {mp.get('rows')} rows, ledger {committed}")
            if mp.get("sha256") != _commits_sha(commits):
                problems.append(f"{name}: manifest checksum differs from the ledger's commits")
        if commits and commits[-1]["stop"] != committed or not commits and committed:
            problems.append(f"{name}: ledger committed {committed} but commits end at "
                            f"{commits[-1]['stop'] if commits else 0}")
        for arr in ARRAYS:
            for i, key in enumerate(_shard_keys(cfg, arr, committed)):
                if not os.path.exists(os.path.join(pdir, arr, key)):
                    lo, hi = i * cfg["shard_rows"], min((i + 1) * cfg["shard_rows"], committed)
                    problems.append(f"{name} {arr} rows {lo}:{hi}: shard file {arr}/{key} missing")
        recomputed = empty_stats(len(cfg["split_names"]), cfg["d"])
        n_before, prev = len(problems), 0
        for c in commits:
            a, b = c["start"], c["stop"]
            if a != prev:
                problems.append(f"{name}: commit {a}:{b} does not start at {prev}")
            prev = b
            rows: dict[str, np.ndarray | None] = {}
            for arr in ARRAYS:
                try:
                    rows[arr] = arrays[arr][a:b].read().result()
                except Exception as e:  # noqa: BLE001 - corrupt shard (crc32c, index) errors
                    rows[arr] = None
                    problems.append(f"{name} {arr} rows {a}:{b}: unreadable ({str(e).splitlines()[0][:200]})")
                    continue
                if _sha(rows[arr]) != c["sha256"].get(arr):
                    problems.append(f"{name} {arr} rows {a}:{b}: sha256 differs from the ledger")
            for p in _row_problems(rows, cfg["ctx_len"], len(cfg["split_names"]), a):
                arr, rest = p.split(": ", 1)
                problems.append(f"{name} {arr} rows {a}:{b}: {rest}")
            if len(problems) == n_before:
                add_stats(recomputed, rows["acts"], rows["split"])
        if len(problems) == n_before:  # sums are only comparable when every row read back clean
            for k in stats:
                if not np.allclose(stats[k], recomputed[k], rtol=1e-9, atol=1e-9):
                    problems.append(f"{name}: stats sidecar {k} differs from the stored rows")
                    break
    if manifest is not None and total_stats is not None:
        if manifest.get("num_rows") != int(sum(mp.get("rows") or 0 for mp in mparts.values())):
            problems.append(f"manifest.json: num_rows {manifest.get('num_rows')} is not the sum of part rows")
        got = summarize_stats(total_stats, split_names)
        for s, v in got.items():
            mv = manifest.get("splits", {}).get(s, {})
            same = mv.get("rows") == v["rows"] and all(
                (mv.get(k) is None and v[k] is None) or (mv.get(k) is not None and v[k] is not None
                                                         and math.isclose(mv[k], v[k], rel_tol=1e-9))
                for k in ("mean_norm", "var_nrm"))
            if not same:
                problems.append(f"manifest.json: split {s} stats {mv} differ from the ledgers' {v}")
    return problems
