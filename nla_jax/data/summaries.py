"""Warm-start texts of store rows: STORE/summaries.jsonl, one {row, text, ...} record per line.

`python -m nla_jax.summarize` writes the file (append-only, resumable); the trainer's SFT stages
and `evaluate` read it. Reading follows the torn-tail policy of `nla_jax.fileio`: a last line
without its newline is a write cut short by a crash and is not a record.
"""
from __future__ import annotations


from nla_jax import fileio, paths

FILE = "summaries.jsonl"


def path_in(store_root: str) -> str:
    return paths.join(store_root, FILE)


def _record(rec: dict) -> dict:
    rec["row"] = int(rec["row"])
    rec["text"] = str(rec["text"])
    return rec


def read_records(path: str) -> dict[int, dict]:
    """{row: record} of a summaries file ({} when it does not exist); the last record of a row wins."""
    return {r["row"]: r for r in fileio.read_jsonl(path, _record, what="summary record ({row, text})")}


def read_texts(path: str) -> dict[int, str]:
    """{row: text} of a summaries file ({} when it does not exist)."""
    return {row: r["text"] for row, r in read_records(path).items()}
