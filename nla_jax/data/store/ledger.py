"""A part's ledger.json: its file name, format, checksum, and how it is read and replaced.

The ledger is the only commit point of a part (see the package docstring): it records the
committed row count, the caller's cursor, one {start, stop, sha256 per array} record per commit,
the stats sidecar of those rows, and the config the part was created with. The writer replaces
it atomically; the reader, `finalize_manifest` and `verify` only read it.
"""
from __future__ import annotations

import hashlib
import json

from nla_jax import fileio, paths

LEDGER = "ledger.json"
FORMAT = "nla_jax.store.part/1"
# config entries a resumed part must match exactly (else it holds another model's or layer's rows)
CHECKED_KEYS = ("d", "dtype", "ctx_len", "capacity", "fingerprint", "split_names")


def path_in(part_dir: str) -> str:
    return paths.join(part_dir, LEDGER)


def read(part_dir: str) -> dict:
    """The ledger of a part; missing or unparsable is a one-line UserError naming the file."""
    return fileio.read_json(path_in(part_dir))


def write(part_dir: str, ledger: dict) -> None:
    """Replace the ledger atomically: a crash leaves the old one or the new one, never a torn one."""
    fileio.write_atomic(path_in(part_dir), fileio.json_text(ledger, sort_keys=True))


def commits_sha(commits: list[dict]) -> str:
    """Per-part data checksum: sha256 of the canonical JSON of its commit records."""
    return hashlib.sha256(json.dumps(commits, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
