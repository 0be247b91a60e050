"""Per-split running sums of activation norms, and the .npz sidecar files that hold them.

The trainer normalises activations with per-split statistics (mean ||v|| and the variance of
v_nrm = v / ||v|| * sqrt(d)). Summing them while the rows are written saves a pass over the
whole store: each part keeps its running sums in a sidecar `stats-<ncommits>.npz` that the
ledger names with its sha256, and `finalize_manifest` adds the parts' sums into ROOT/stats.npz.
Sums rather than means, so parts (and resumed appends) combine by plain addition.
"""
from __future__ import annotations

import hashlib
import io
import math
from typing import Sequence

import numpy as np

from nla_jax import fileio, paths
from nla_jax.errors import UserError

_STATS_BLOCK = 512  # rows per float64 block when summing v_nrm (bounds memory at large d)
SIDECAR_PREFIX = "stats-"  # a part's sidecars: stats-<ncommits, 8 digits>.npz


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
        w = np.where(norm > 0, math.sqrt(d) / np.where(norm > 0, norm, 1.0), 0.0)   # [n]
        v *= w[:, None]                                               # [n, d] v_nrm
        nrm_sq = (w * norm) ** 2                                      # [n] ||v_nrm||^2
        edges = np.searchsorted(s, np.arange(num_splits + 1))         # [S+1] split k is rows edges[k]:edges[k+1]
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
        mu = stats["sum_nrm"][k] / n                                   # [d]
        out[name] = {"rows": n, "mean_norm": float(stats["sum_norm"][k] / n),
                     "var_nrm": float((stats["sum_nrm_sq"][k] / n - float(mu @ mu)) / d)}
    return out


def add_together(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sums of two parts combined (`a` None: nothing summed yet)."""
    return b if a is None else {k: a[k] + b[k] for k in a}


def stats_bytes(stats: dict[str, np.ndarray]) -> bytes:
    """The .npz file content of `stats` (what the ledger's or manifest's sha256 is taken of)."""
    buf = io.BytesIO()
    np.savez(buf, **stats)
    return buf.getvalue()


def write_file(path: str, stats: dict[str, np.ndarray]) -> str:
    """Atomically write `stats` to `path`; returns the sha256 of the bytes written."""
    data = stats_bytes(stats)
    fileio.write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def write_sidecar(part_dir: str, ncommits: int, stats: dict[str, np.ndarray]) -> dict:
    """Write a part's sums after `ncommits` commits under a name of their own (never over the
    sidecar the current ledger names); returns the ledger's {"file", "sha256"} entry for it."""
    fname = f"{SIDECAR_PREFIX}{ncommits:08d}.npz"
    return {"file": fname, "sha256": write_file(paths.join(part_dir, fname), stats)}


def load_sidecar(path: str, sha256: str) -> dict[str, np.ndarray]:
    """A sidecar's sums, refused unless its bytes match the sha256 the ledger recorded."""
    try:
        data = paths.read_bytes(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read stats sidecar ({e})")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path}: sha256 differs from the one in the ledger")
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}
