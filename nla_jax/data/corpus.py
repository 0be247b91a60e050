"""Corpus readers: plain-text folders, JSONL (`text` or chat `messages`), parquet.

Every document gets a stable `doc_id` derived from where it came from (relative path, line or
row number, or an explicit `id` field), so splits and positions keyed on it never move when
files are re-read. Chat documents stay as messages until the tokenizer renders them with the
target model's own template (`render`).

Bad input never mixes silently into the data: a missing or unreadable source is a UserError;
undecodable bytes or malformed records are skipped, counted per reason in `CorpusStats`, and
reported by the caller.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

from nla_jax.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclasses.dataclass(frozen=True)
class Document:
    doc_id: str
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    source: str = ""

    def render(self, tokenizer) -> list[int]:
        """Token ids: plain text as is (BOS by the model's policy), chats through the template."""
        if self.messages is not None:
            return tokenizer.encode_chat(list(self.messages), add_generation_prompt=False)
        return tokenizer.bos(tokenizer.encode(self.text or ""))


@dataclasses.dataclass
class CorpusStats:
    documents: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.documents} documents"
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
        return f"{self.documents} documents ({sum(self.skipped.values())} skipped: {parts})"


def _read_utf8(path: str, stats: CorpusStats) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"corpus file {path!r} cannot be read: {e.strerror}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("not UTF-8")
        return None


def read_text_folder(path: str, stats: CorpusStats) -> Iterator[Document]:
    """One document per *.txt / *.md file under `path`, in sorted path order."""
    if not os.path.isdir(path):
        raise UserError(f"corpus folder {path!r} does not exist")
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if n.endswith(TEXT_SUFFIXES)]
    for fn in sorted(files):
        text = _read_utf8(fn, stats)
        if text is None:
            continue
        if not text.strip():
            stats.skip("empty")
            continue
        stats.documents += 1
        yield Document(doc_id=os.path.relpath(fn, path), text=text, source=path)


def _record_to_doc(rec: Any, default_id: str, source: str, stats: CorpusStats) -> Document | None:
    if not isinstance(rec, dict):
        stats.skip("record is not an object")
        return None
    doc_id = str(rec["id"]) if rec.get("id") is not None else default_id
    if isinstance(rec.get("text"), str):
        if not rec["text"].strip():
            stats.skip("empty")
            return None
        return Document(doc_id=doc_id, text=rec["text"], source=source)
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        return Document(doc_id=doc_id, messages=tuple({"role": m["role"], "content": m["content"]} for m in msgs),
                        source=source)
    stats.skip("no 'text' string or 'messages' list")
    return None


def read_jsonl(path: str, stats: CorpusStats) -> Iterator[Document]:
    """One document per line: {"text": ...} or {"messages": [{"role", "content"}, ...]}, optional "id"."""
    if not os.path.isfile(path):
        raise UserError(f"corpus file {path!r} does not exist")
    base = os.path.basename(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"corpus file {path!r} cannot be read: {e.strerror}") from e
    with f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.skip("not UTF-8")
                continue
            except json.JSONDecodeError:
                stats.skip("invalid JSON line")
                continue
            doc = _record_to_doc(rec, f"{base}:{i}", path, stats)
            if doc is not None:
                stats.documents += 1
                yield doc


def read_parquet(path: str, stats: CorpusStats) -> Iterator[Document]:
    """Rows with a `text` column (or `messages`), optional `id`; read batch by batch."""
    if not os.path.isfile(path):
        raise UserError(f"corpus file {path!r} does not exist")
    try:
        # imported here, not at the top: only parquet sources need pyarrow (an optional
        # dependency, refused with a one-line error when absent) and its import costs ~0.3 s
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError("reading parquet needs pyarrow: pip install pyarrow") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"corpus file {path!r} is not a readable parquet file: {e}") from e
    cols = set(pf.schema_arrow.names)
    if not cols & {"text", "messages"}:
        raise UserError(f"parquet file {path!r} has no 'text' or 'messages' column (columns: {sorted(cols)})")
    base = os.path.basename(path)
    row = 0
    for batch in pf.iter_batches():
        for rec in batch.to_pylist():
            doc = _record_to_doc(rec, f"{base}:{row}", path, stats)
            row += 1
            if doc is not None:
                stats.documents += 1
                yield doc


READERS = {"text_dir": read_text_folder, "jsonl": read_jsonl, "parquet": read_parquet}


def read_sources(sources: Sequence[dict[str, str]], stats: CorpusStats) -> Iterator[Document]:
    """Documents from a list of {"kind": text_dir|jsonl|parquet, "path": ..., "name"?: ...}.

    doc_ids are prefixed with the source name (default: its kind and basename) so two sources
    never collide.
    """
    if not sources:
        raise UserError("the corpus config lists no sources")
    for src in sources:
        kind, path = src.get("kind"), src.get("path")
        if kind not in READERS:
            raise UserError(f"corpus source kind {kind!r} is not one of {', '.join(READERS)}")
        if not path:
            raise UserError(f"corpus source {dict(src)} has no path")
        name = src.get("name") or f"{kind}:{os.path.basename(os.path.normpath(path))}"
        for doc in READERS[kind](path, stats):
            yield dataclasses.replace(doc, doc_id=f"{name}/{doc.doc_id}")


def load_corpus(sources: Sequence[dict[str, str]]) -> tuple[list[Document], CorpusStats]:
    """All documents of all sources, checked: empty corpora and duplicate ids are errors."""
    stats = CorpusStats()
    docs = list(read_sources(sources, stats))
    if not docs:
        raise UserError(f"the corpus is empty: no usable documents in {[s.get('path') for s in sources]} "
                        f"({stats.summary()})")
    seen: set[str] = set()
    for d in docs:
        if d.doc_id in seen:
            raise UserError(f"duplicate document id {d.doc_id!r} in the corpus (give records unique 'id's)")
        seen.add(d.doc_id)
    return docs, stats
