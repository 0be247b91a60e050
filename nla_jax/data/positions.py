"""Which documents go to which split, and which token positions of a document are used.

Both are pure functions of (seed, doc_id): a rerun, a resumed run, a run on more processes, or
a corpus read in a different order gives every document the same split and the same positions,
so splits never leak rows between reruns (a bug the public NLA scripts had: they reseeded on
re-run).
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Sequence

import numpy as np

from nla_jax.errors import UserError

DEFAULT_SPLITS = (("av_sft", 0.25), ("ar_sft", 0.25), ("rl", 0.45), ("eval", 0.05))


def doc_key(seed: int, doc_id: str, purpose: str) -> int:
    """A 64-bit integer from (seed, doc_id, purpose); stable across Python versions and runs."""
    h = hashlib.sha256(f"{seed}\x00{purpose}\x00{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")


def check_fractions(fractions: Sequence[tuple[str, float]]) -> None:
    names = [n for n, _ in fractions]
    if len(set(names)) != len(names):
        raise UserError(f"split names must be unique, got {names}")
    if any(f < 0 for _, f in fractions):
        raise UserError(f"split fractions must be >= 0, got {dict(fractions)}")
    total = sum(f for _, f in fractions)
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"split fractions must sum to 1, got {total:.6f} ({dict(fractions)})")


def split_of(seed: int, doc_id: str, fractions: Sequence[tuple[str, float]]) -> str:
    """The split a document belongs to (fractions: ordered (name, fraction) pairs summing to 1)."""
    u = doc_key(seed, doc_id, "split") / 2.0 ** 64  # uniform in [0, 1)
    acc = 0.0
    for name, frac in fractions:
        acc += frac
        if u < acc:
            return name
    return fractions[-1][0]


def sample_positions(tokens: Sequence[int], *, k: int, min_position: int, special_ids: Iterable[int],
                     seed: int, doc_id: str) -> np.ndarray:
    """Up to k distinct positions >= min_position whose token is not special, sorted ascending.

    Position p means "the activation at token p", reading the context tokens[0..p] inclusive.
    Fewer than k are returned when the document is short; none when it is shorter than
    min_position (the caller counts and reports such documents).
    """
    special = set(int(s) for s in special_ids)
    toks = np.asarray(tokens)
    cand = np.arange(min_position, len(toks))
    if special and len(cand):
        cand = cand[~np.isin(toks[cand], list(special))]
    if len(cand) == 0:
        return np.zeros((0,), np.int64)
    rng = np.random.default_rng(doc_key(seed, doc_id, "positions"))
    pick = rng.choice(len(cand), size=min(k, len(cand)), replace=False)
    return np.sort(cand[pick]).astype(np.int64)


def split_counts(seed: int, doc_ids: Iterable[str], fractions: Sequence[tuple[str, float]]) -> Mapping[str, int]:
    out = {name: 0 for name, _ in fractions}
    for d in doc_ids:
        out[split_of(seed, d, fractions)] += 1
    return out
