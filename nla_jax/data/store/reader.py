"""Store and open_store: the read side of a finalized store, rows numbered globally.

Opening checks every part against the manifest without reading array data (row counts, commit
checksums, shard files present), so a damaged or half-replaced store is refused before any
compute starts; a shard whose bytes are damaged is caught by its crc32c when it is read, and
reported as one line naming the part, array and rows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nla_jax import fileio, paths
from nla_jax.data.store import arrays as arrays_lib
from nla_jax.data.store import ledger as ledger_lib
from nla_jax.data.store.arrays import ARRAYS, DTYPES, INT_DTYPES, PREDICTIONS, PROB_DTYPE
from nla_jax.data.store.manifest import MANIFEST
from nla_jax.errors import UserError

VERIFY_HINT = "run: python -m nla_jax.extract --config ... --verify"


class Store:
    """Read side of a finalized store; rows are global (parts concatenated in part order)."""

    def __init__(self, root: str):
        self.root = root
        self.manifest: dict = fileio.read_json(paths.join(root, MANIFEST))
        m = self.manifest
        self.split_names: list[str] = list(m["split_names"])
        self.d, self.dtype, self.ctx_len = m["d"], m["dtype"], m["ctx_len"]
        self._rows = np.array([p["rows"] for p in m["parts"]], np.int64)           # [P]
        self._offsets = np.concatenate([[0], np.cumsum(self._rows)])               # [P+1]
        self._arrays = []
        self.top_k = 0   # next-token predictions stored per row (arrays.PREDICTIONS), set below from the parts
        if m.get("num_rows") != int(self._rows.sum()):
            raise UserError(f"store {root}: manifest.json says {m.get('num_rows')} rows but its parts list "
                            f"{int(self._rows.sum())}; {VERIFY_HINT}")
        ks = set()
        for p in m["parts"]:
            pdir = paths.join(root, p["name"])
            ledger = ledger_lib.read(pdir)
            arrays = arrays_lib.open_arrays(pdir, ledger["config"])
            _check_part(root, p, ledger, arrays)
            self._arrays.append(arrays)
            ks.add(arrays_lib.top_k_of(ledger["config"]))
        if len(ks) > 1:
            raise UserError(f"store {root}: its parts store different numbers of predictions per row {sorted(ks)}; "
                            f"{VERIFY_HINT}")
        self.top_k = ks.pop() if ks else 0
        self.fields: tuple[str, ...] = ARRAYS + (PREDICTIONS if self.top_k else ())
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
                            f"do not read ({first}); {VERIFY_HINT}") from None

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
            sp = np.concatenate([self._result(a["split"][:n].read(), i, "split", np.arange(n))   # [num_rows]
                                 for i, (a, n) in enumerate(zip(self._arrays, self._rows))]
                                + [np.zeros(0, np.uint8)])
            self._split_rows[name] = np.flatnonzero(sp == k).astype(np.int64)
        return self._split_rows[name]

    def read(self, split: str | None, rows: np.ndarray,
             fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays for `rows` (global row ids if split is None, else indices into that split).

        Returns {acts [n, d], doc_id [n], position [n], split [n], tokens [n, ctx_len]} and, in a
        store with predictions, {top_ids [n, top_k], top_probs [n, top_k]} (or just `fields` of
        them: only those are read from disk; default all), in the order of `rows` (duplicates allowed).
        """
        fields = self.fields if fields is None else fields
        unknown = set(fields) - set(self.fields)
        if unknown:
            raise KeyError(f"unknown store fields {sorted(unknown)}; this store has {self.fields}")
        rows = np.asarray(rows, np.int64).reshape(-1)                                # [n]
        if split is not None:
            rows = self.rows_of_split(split)[rows]
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"row ids must be in [0, {self.num_rows}), got {rows.min()}..{rows.max()}")
        n = len(rows)
        shapes = {"acts": ((n, self.d), DTYPES[self.dtype]), "tokens": ((n, self.ctx_len), np.int32)}
        shapes.update({k: ((n,), INT_DTYPES[k]) for k in ("doc_id", "position", "split")})
        shapes.update({"top_ids": ((n, self.top_k), INT_DTYPES["top_ids"]), "top_probs": ((n, self.top_k), PROB_DTYPE)})
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


def _check_part(root: str, mpart: dict, ledger: dict, arrays: dict) -> None:
    """Cheap open-time checks of one part against the manifest: the row count and data checksum
    the manifest recorded, and every shard file of the committed rows (a missing shard would
    otherwise read back as fill values, silently). No array data is read unless a shard file is
    missing: then its commits are, to tell all-fill rows an older writer skipped from damage."""
    name = mpart["name"]
    committed = int(ledger.get("committed", -1))
    if mpart.get("rows") != committed:
        raise UserError(f"store {root}: manifest.json says {name} has {mpart.get('rows')} rows, its "
                        f"{ledger_lib.LEDGER} {committed}; {VERIFY_HINT}")
    if mpart.get("sha256") != ledger_lib.commits_sha(ledger.get("commits", [])):
        raise UserError(f"store {root}: {name}'s commits differ from the checksum in manifest.json; {VERIFY_HINT}")
    missing = arrays_lib.unexplained_missing(paths.join(root, name), ledger["config"], committed,
                                              ledger.get("commits", []), arrays)
    if missing:
        arr, key, lo, hi = missing[0]
        raise UserError(f"store {root}: {name} {arr} rows {lo}:{hi}: shard file {arr}/{key} is missing; "
                        f"{VERIFY_HINT}")


def open_store(root: str) -> Store:
    """Open a finalized store (ROOT/manifest.json must exist: run finalize_manifest first)."""
    if not paths.exists(paths.join(root, MANIFEST)):
        raise UserError(f"{paths.join(root, MANIFEST)}: missing; the store was not finalized")
    return Store(root)
