"""From documents to an extraction plan: token ids, positions, split, and per-process batches.

Everything here is a pure function of (corpus, tokenizer, seed, data config): each process of a
multi-process extraction computes the same plan and takes its own slice, and a resumed run
recomputes the plan and continues at its stored cursor.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from nla_jax.data import positions as positions_lib
from nla_jax.data.corpus import CorpusStats, Document


@dataclasses.dataclass(frozen=True)
class PlannedDoc:
    doc_id: str
    doc_key: int            # 63-bit integer id stored with each row
    tokens: np.ndarray      # [n] int32, truncated to max_len
    positions: np.ndarray   # [k'] int64, sorted
    split: int              # index into split names


def plan_documents(docs: Sequence[Document], tokenizer, *, seed: int, k: int, min_position: int, max_len: int,
                   splits: Sequence[tuple[str, float]], stats: CorpusStats) -> list[PlannedDoc]:
    """Tokenise, truncate, choose positions and split; documents without a usable position are
    skipped and counted (never silently dropped)."""
    names = [n for n, _ in splits]
    out = []
    special = tokenizer.special_ids
    for d in sorted(docs, key=lambda d: d.doc_id):
        toks = np.asarray(d.render(tokenizer)[:max_len], np.int32)
        pos = positions_lib.sample_positions(toks, k=k, min_position=min_position, special_ids=special,
                                             seed=seed, doc_id=d.doc_id)
        if len(pos) == 0:
            stats.skip(f"shorter than min_position={min_position} tokens")
            continue
        split = positions_lib.split_of(seed, d.doc_id, splits)
        key = positions_lib.doc_key(0, d.doc_id, "doc_id") >> 1
        out.append(PlannedDoc(d.doc_id, key, toks, pos, names.index(split)))
    return out


def process_slice(plan: Sequence[PlannedDoc], process: int, num_processes: int) -> list[PlannedDoc]:
    """This process's documents: a strided slice of the sorted plan."""
    return list(plan[process::num_processes])


def pad_batch(docs: Sequence[PlannedDoc], batch: int, seq_multiple: int, k: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded arrays for a batch of documents (padded up to `batch` rows with empty rows).

    Returns tokens [B, L] int32, valid [B, L] bool, positions [B, k] int32 (0 where unused),
    position_valid [B, k] bool. L is the longest document rounded up to `seq_multiple`, so
    only a few shapes are ever compiled.
    """
    longest = max((len(d.tokens) for d in docs), default=1)
    L = -(-longest // seq_multiple) * seq_multiple
    toks = np.zeros((batch, L), np.int32)
    valid = np.zeros((batch, L), bool)
    pos = np.zeros((batch, k), np.int32)
    pos_valid = np.zeros((batch, k), bool)
    for i, d in enumerate(docs):
        n = len(d.tokens)
        toks[i, :n] = d.tokens
        valid[i, :n] = True
        pos[i, :len(d.positions)] = d.positions
        pos_valid[i, :len(d.positions)] = True
    return toks, valid, pos, pos_valid


def batches(docs: Sequence[PlannedDoc], start: int, batch: int) -> Iterator[tuple[int, list[PlannedDoc]]]:
    """(index of the first doc, docs) for consecutive batches from `start`."""
    for i in range(start, len(docs), batch):
        yield i, list(docs[i:i + batch])
