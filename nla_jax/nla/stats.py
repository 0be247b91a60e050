"""Normalised-activation statistics, the AR loss and fve_nrm (WORKSPACE.md, "The method in brief").

Stored activations stay raw. At train time a vector v becomes v_nrm = sqrt(d) * u/|u| with
u = v (or v - mean with centring). mse_nrm is the mean squared error over dimensions between
normalised prediction and target (= 2(1 - cos)); fve_nrm = 1 - mse_nrm / Var(v_nrm), where
Var(v_nrm) is the predict-the-mean error of the normalised vectors on the dataset.
The floor, the fve_nrm of the best constant direction (the renormalised mean), is not 0 when the
normalised vectors share a large mean (SmolLM2 block 20: about -0.15); it is computed, not assumed.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats


@dataclasses.dataclass(frozen=True)
class ActStats:
    """Dataset statistics the losses and the injection need (saved with every checkpoint)."""
    d: int
    mean: tuple                 # raw mean vector [d]
    mean_norm: float            # mean |v|
    var_nrm: float              # Var(v_nrm) without centring
    var_nrm_centered: float     # Var(v_nrm) of v - mean
    floor_fve: float            # fve_nrm of the renormalised mean (no centring)
    floor_fve_centered: float
    rows: int
    mean_nrm: tuple = ()        # mean of v_nrm [d]: its renormalised direction is the floor's prediction
    mean_nrm_centered: tuple = ()

    def var(self, center: bool) -> float:
        return self.var_nrm_centered if center else self.var_nrm

    def floor(self, center: bool) -> float:
        return self.floor_fve_centered if center else self.floor_fve

    def mean_array(self) -> np.ndarray:
        return np.asarray(self.mean, np.float32)

    def floor_prediction(self, center: bool) -> np.ndarray:
        """The renormalised mean of the normalised training vectors [d]."""
        return normalise_np(np.asarray(self.mean_nrm_centered if center else self.mean_nrm)[None])[0]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ActStats":
        d = dict(d)
        for k in ("mean", "mean_nrm", "mean_nrm_centered"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)


def normalise_np(v: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    u = v.astype(np.float64) - (0 if mean is None else mean)
    return np.sqrt(v.shape[-1]) * u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), 1e-12)


def _var_and_floor(nrm: np.ndarray) -> tuple[float, float]:
    mu = nrm.mean(0)
    var = float(((nrm - mu) ** 2).mean())
    const = normalise_np(mu[None])[0]                       # the renormalised mean as a prediction
    mse = float(((nrm - const) ** 2).mean())
    return var, 1.0 - mse / var


def compute(acts: np.ndarray) -> ActStats:
    """Statistics of a sample of raw activations [n, d] (float64 accumulation)."""
    a = acts.astype(np.float64)
    mean = a.mean(0)
    n, nc = normalise_np(a), normalise_np(a, mean)
    var, floor = _var_and_floor(n)
    var_c, floor_c = _var_and_floor(nc)
    vec = lambda x: tuple(float(y) for y in x)
    return ActStats(d=a.shape[1], mean=vec(mean), mean_norm=float(np.linalg.norm(a, axis=1).mean()),
                    var_nrm=var, var_nrm_centered=var_c, floor_fve=floor, floor_fve_centered=floor_c, rows=len(a),
                    mean_nrm=vec(n.mean(0)), mean_nrm_centered=vec(nc.mean(0)))


def from_store(store, splits, max_rows: int, seed: int) -> ActStats:
    """Stats of up to max_rows rows drawn (seeded) from the given splits of a store."""
    rows = np.concatenate([store.rows_of_split(s) for s in splits])
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    return compute(store.read(None, rows, fields=("acts",))["acts"])


# ----------------------------------------------------------------------------- jax side

def normalise(v: jax.Array, mean: jax.Array | None = None) -> jax.Array:
    """[..., d] -> same direction (after optional centring), norm sqrt(d), float32."""
    u = v.astype(jnp.float32)
    if mean is not None:
        u = u - mean
    n = jnp.sqrt(jnp.sum(u * u, axis=-1, keepdims=True))
    return u * (u.shape[-1] ** 0.5) / jnp.maximum(n, 1e-12)


def mse_nrm(pred: jax.Array, target_nrm: jax.Array) -> jax.Array:
    """Per-row mse between normalised prediction and an already normalised target. [b, d] -> [b]."""
    p = normalise(pred)
    return jnp.mean((p - target_nrm) ** 2, axis=-1)


def fve(mse: jax.Array | float, var: float) -> jax.Array | float:
    return 1.0 - mse / var


def cluster_t_ci(values: np.ndarray, groups: np.ndarray, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of per-row values and a cluster-robust t-interval over *documents*.

    Rows of one document are not independent, so the unit of replication is the document. With
    G documents, per-document sums s_j and row counts n_j: m = sum s / sum n (the row mean), its
    CR1 sandwich variance se^2 = G/(G-1) * sum_j (s_j - m n_j)^2 / (sum n)^2, and m -/+ t_{G-1} se.
    With equal counts this is exactly the Student t-interval over document means. Why not the
    percentile bootstrap over documents (`bootstrap_ci`): with few documents it is too narrow
    (about 0.90 coverage at 8 documents; tests/test_nla.py simulates both). A paired difference
    (real - floor on the same rows) is this interval of the per-row differences. Fewer than two
    documents give no interval: lo = hi = nan.
    """
    values = np.asarray(values, np.float64)                                 # [n]
    uniq, inv = np.unique(groups, return_inverse=True)
    G = len(uniq)
    sums = np.bincount(inv, values, minlength=G)                            # [G]
    counts = np.bincount(inv, minlength=G).astype(np.float64)               # [G]
    m = float(sums.sum() / counts.sum())
    if G < 2:
        return m, float("nan"), float("nan")
    se = np.sqrt(G / (G - 1) * np.sum((sums - m * counts) ** 2)) / counts.sum()
    h = float(scipy.stats.t.ppf(1 - alpha / 2, G - 1) * se)
    return m, m - h, m + h


def bootstrap_ci(values: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of per-row values and a percentile CI resampling *documents*.

    Kept as the baseline of the coverage test: it under-covers with few documents, so means use
    `cluster_t_ci`."""
    values = np.asarray(values, np.float64)
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, values, minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    boots = sums[idx].sum(1) / counts[idx].sum(1)
    return float(values.mean()), float(np.quantile(boots, alpha / 2)), float(np.quantile(boots, 1 - alpha / 2))


def dumps(stats: ActStats) -> str:
    return json.dumps(stats.to_json())
