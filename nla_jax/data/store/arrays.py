"""The row arrays of a store part on disk: names, dtypes, zarr3 specs, shard files, row checks.

Every part has the five arrays of ARRAYS; a part created with `top_k` > 0 in its ledger config also
holds PREDICTIONS: the target's top_k most likely next tokens at each row (ids, most likely first)
and their probabilities, from extraction's own forward pass (data.top_k).

Everything here is about the array data alone; which rows of it count (the ledger) and what
they sum to (the norm statistics) live in their own modules. The writer creates arrays with
`create_arrays`; the writer, the reader and `verify` open them with `open_arrays`, which checks
them against the ledger's config so a store written for another shape never reads back as
silently wrong numbers.
"""
from __future__ import annotations

import hashlib
import re

import ml_dtypes
import numpy as np
import tensorstore as ts

from nla_jax import paths
from nla_jax.errors import UserError

ARRAYS = ("acts", "doc_id", "position", "split", "tokens")
PREDICTIONS = ("top_ids", "top_probs")   # [rows, top_k] each, only in a part whose config has top_k > 0
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
INT_DTYPES = {"doc_id": np.dtype("<i8"), "position": np.dtype("<i4"), "split": np.dtype("u1"),
              "tokens": np.dtype("<i4"), "top_ids": np.dtype("<i4")}
PROB_DTYPE = np.dtype("<f4")             # top_probs
PAD = -1  # tokens after the position
PART_RE = re.compile(r"^part-(\d{5})$")
# zarr skips writing a chunk whose values all equal the fill value (a single-split store's split
# array is all 0); this open option (not stored in the metadata) makes the writer keep them
WRITE_FILL = {"store_data_equal_to_fill_value": True}


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def top_k_of(cfg: dict) -> int:
    """How many next-token predictions a part stores per row (0: none; older parts have no key)."""
    return int(cfg.get("top_k", 0))


def array_names(cfg: dict) -> tuple[str, ...]:
    """The arrays of a part with ledger config `cfg`, in commit order."""
    return ARRAYS + (PREDICTIONS if top_k_of(cfg) else ())


def part_dirs(root: str) -> list[str]:
    """Names of the part directories of store `root`, in part order (hidden temp files ignored)."""
    if not paths.isdir(root):
        raise UserError(f"store {root}: not a directory")
    return sorted(f for f in paths.listdir(root) if PART_RE.match(f) and paths.isdir(paths.join(root, f)))


def _spec(path: str, shape: list[int], dtype: str, chunk_rows: int, shard_rows: int,
          compress: bool) -> dict:
    """zarr3 array of shards of [shard_rows, ...] holding inner chunks of [chunk_rows, ...].

    Inner chunks carry crc32c so a corrupted shard fails to read instead of returning wrong
    numbers; acts are stored uncompressed (float activations barely compress), ints zstd.
    Chunks equal to the fill value are written too (`WRITE_FILL`), so every shard of committed
    rows has its file and a missing one is damage.
    """
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compress:
        inner.append({"name": "zstd", "configuration": {"level": 3}})
    inner.append({"name": "crc32c"})
    return {"driver": "zarr3", "kvstore": paths.kvstore_spec(path), **WRITE_FILL,
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
    """{array: full shape} of a part with the ledger config `cfg` (capacity rows each)."""
    c = cfg["capacity"]
    out = {"acts": [c, cfg["d"]], "doc_id": [c], "position": [c], "split": [c], "tokens": [c, cfg["ctx_len"]]}
    if top_k_of(cfg):
        out.update({name: [c, top_k_of(cfg)] for name in PREDICTIONS})
    return out


def _dtype_name(cfg: dict, name: str) -> str:
    if name == "acts":
        return cfg["dtype"]
    return PROB_DTYPE.name if name == "top_probs" else INT_DTYPES[name].name


def create_arrays(part_dir: str, cfg: dict) -> None:
    """(Re)create the empty arrays of a part, replacing any left by an uncommitted attempt."""
    for name, shape in _shapes(cfg).items():
        ts.open(_spec(paths.join(part_dir, name), shape, _dtype_name(cfg, name), cfg["chunk_rows"],
                      cfg["shard_rows"], compress=name != "acts"), create=True, delete_existing=True).result()


def open_arrays(part_dir: str, cfg: dict) -> dict[str, ts.TensorStore]:
    """Open the existing arrays and check their shapes/dtypes against the ledger config."""
    out = {}
    for name, shape in _shapes(cfg).items():
        path = paths.join(part_dir, name)
        try:
            arr = ts.open({"driver": "zarr3", "kvstore": paths.kvstore_spec(path), **WRITE_FILL},
                          open=True).result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/OSError variants
            raise UserError(f"{path}: cannot open zarr3 array ({str(e).splitlines()[0]})")
        want = _dtype_name(cfg, name)
        if list(arr.shape) != shape or arr.dtype.numpy_dtype != np.dtype(DTYPES.get(want, want)):
            raise UserError(f"{path}: shape {list(arr.shape)} dtype {arr.dtype.name}, "
                            f"ledger expects {shape} {want}")
        out[name] = arr
    return out


def shard_keys(cfg: dict, name: str, rows: int) -> list[str]:
    """Relative paths of the shard files that hold rows [0, rows) (default chunk key encoding)."""
    extra = "/0" if name in ("acts", "tokens") + PREDICTIONS else ""   # 2-D arrays
    return [f"c/{i}{extra}" for i in range(-(-rows // cfg["shard_rows"]))]


def missing_shards(part_dir: str, cfg: dict, rows: int) -> list[tuple[str, str, int, int]]:
    """(array, shard key, first row, end row) of every shard file of rows [0, rows) not on disk.

    A missing shard reads back as fill values without any error, so readers look before they
    trust the ledger's row count.
    """
    out = []
    for arr in array_names(cfg):
        for i, key in enumerate(shard_keys(cfg, arr, rows)):
            if not paths.exists(paths.join(part_dir, arr, key)):
                out.append((arr, key, i * cfg["shard_rows"], min((i + 1) * cfg["shard_rows"], rows)))
    return out


def unexplained_missing(part_dir: str, cfg: dict, rows: int, commits: list[dict],
                        arrays: dict[str, ts.TensorStore]) -> list[tuple[str, str, int, int]]:
    """The entries of `missing_shards(rows)` that are damage, not all-fill data; most suspect first.

    Stores written before `WRITE_FILL` have no file for a shard whose values all equal the fill
    value (e.g. every split shard of a single-split store). A missing file is legitimate exactly
    when commits cover all its rows and each of them reads back (fill values in its place) with
    the ledger's sha256; only arrays with a missing file are read, so a complete store costs no
    reads. A commit spanning a deleted shard and a legitimately absent one fails for both, so
    entries are ordered by the share of their commits that fail (the deleted one: all of them).
    """
    out, ok = [], {}
    for arr, key, lo, hi in missing_shards(part_dir, cfg, rows):
        covered, bad, n = 0, 0, 0
        for c in commits:
            a, b = int(c["start"]), int(c["stop"])
            if b <= lo or a >= hi:
                continue
            covered, n = covered + min(b, hi) - max(a, lo), n + 1
            if (arr, a) not in ok:
                try:
                    got = rows_sha(arrays[arr][a:b].read().result())
                except Exception:  # noqa: BLE001 - a damaged neighbour shard: not explained either
                    got = None
                ok[arr, a] = got == c.get("sha256", {}).get(arr)
            bad += not ok[arr, a]
        if bad or covered != hi - lo:
            out.append((-(bad / n if n and covered == hi - lo else 1.0), len(out), (arr, key, lo, hi)))
    return [e for *_, e in sorted(out)]


def rows_sha(a: np.ndarray) -> str:
    """sha256 of an array's bytes: the per-commit checksum the ledger keeps for each array."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def row_problems(rows: dict[str, np.ndarray | None], ctx_len: int, num_splits: int,
                 base: int = 0) -> list[str]:
    """Range checks on rows base.. of a part; each entry: "<array>: <what> (first at row r)".

    Arrays that are None (unreadable) are skipped. The writer refuses such rows before writing
    them; `verify` reports them in rows already stored.
    """
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
            tok = rows["tokens"]                                      # [n, ctx_len]
            report("tokens", ((col <= p) & (tok == PAD)).any(axis=1), "with -1 at or before the position")
            report("tokens", ((col > p) & (tok != PAD)).any(axis=1), "not -1 after the position")
    if rows.get("top_ids") is not None:
        report("top_ids", (rows["top_ids"] < 0).any(axis=1), "with a negative id")
    if rows.get("top_probs") is not None:
        q = rows["top_probs"]                                         # [n, top_k]
        report("top_probs", ~((q >= 0) & (q <= 1)).all(axis=1) | (np.diff(q, axis=1) > 0).any(axis=1),
               "not probabilities in [0, 1], most likely first")
    return out
