"""From documents to an extraction plan: token ids, positions, split, and global batches.

Everything here is a pure function of (corpus, tokenizer, seed, data config): each process of a
multi-process extraction computes the same plan, global batch `step` is documents
[step*B, (step+1)*B) of it, and each process feeds the batch shards its devices hold (processes
holding replicas of a shard feed the same documents) and writes those it owns
(sharding.BatchLayout.owned). A resumed run recomputes the plan and continues at its stored step.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

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


def num_steps(n_docs: int, batch: int) -> int:
    """Global extraction batches of `batch` documents that cover the plan."""
    return -(-n_docs // batch)


def step_docs(plan: Sequence[PlannedDoc], step: int, batch: int) -> list[PlannedDoc]:
    """The documents of global batch `step` (fewer than `batch` in the last one)."""
    return list(plan[step * batch:(step + 1) * batch])


def block_docs(docs: Sequence[PlannedDoc], blocks: Sequence[int], batch: int, shards: int) -> list[PlannedDoc]:
    """The documents of a global batch (`docs`, padded to `batch` rows) that fall in batch shards
    `blocks`: rows [s * batch/shards, (s+1) * batch/shards) of each, in order."""
    per = batch // shards
    return [docs[i] for s in blocks for i in range(s * per, (s + 1) * per) if i < len(docs)]


@dataclasses.dataclass(frozen=True)
class Ownership:
    """What one process of an extraction writes: the documents of its owned batch shards."""
    rows: int                 # store rows it writes in all (its part's capacity)
    last_step: int            # 1 + the last global batch in which it writes anything (0: none)


def ownership(plan: Sequence[PlannedDoc], batch: int, shards: int, owned: Sequence[int]) -> Ownership:
    rows, last = 0, 0
    for step in range(num_steps(len(plan), batch)):
        n = sum(len(d.positions) for d in block_docs(step_docs(plan, step, batch), owned, batch, shards))
        rows += n
        last = step + 1 if n else last
    return Ownership(rows, last)


def pad_batch(docs: Sequence[PlannedDoc], batch: int, seq_multiple: int, k: int, longest: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded arrays for a batch of documents (padded up to `batch` rows with empty rows).

    Returns tokens [B, L] int32, valid [B, L] bool, positions [B, k] int32 (0 where unused),
    position_valid [B, k] bool. L is the longest document (or `longest`: of the whole global batch,
    when `docs` is one process's share) rounded up to `seq_multiple`, so only a few shapes are
    ever compiled.
    """
    longest = longest or max((len(d.tokens) for d in docs), default=1)
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


