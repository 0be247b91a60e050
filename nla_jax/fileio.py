"""Crash-safe local file writes and JSONL reads: the one copy every module uses.

Two policies live here so that they cannot drift apart between the store, the metrics log, the
teacher summaries and the CLIs' outputs:

- **Atomic replace**: a file is written to a temporary name beside it, fsynced, renamed over the
  target, and the directory fsynced. A reader (or a crash) sees the old file or the new one,
  never a torn one. `replace_together` commits several files only after all of them are written.
- **Torn tail**: append-only JSONL files are written a whole line at a time and fsynced; a kill
  in the middle of a write can leave a last line without its newline. Readers ignore that
  fragment (`read_jsonl`); writers that will append again cut it off first (`drop_torn_tail`).

On an object store (a `gs://` path, see `nla_jax.paths`) one object is replaced whole by
one put, which is already atomic; there is nothing to fsync or rename, `replace_together` writes its
objects one after the other (the last one named is the commit point), and an append rewrites the
object (an object is never torn, so there is no tail to drop).
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Callable, Iterable

from nla_jax import paths
from nla_jax.errors import UserError


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


def write_temp(path: str, data: bytes | str) -> str:
    """Write `data` to a fsynced temporary file beside `path` and return its name (rename it to
    commit; on any error the temporary file is removed)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_encode(data))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def write_atomic(path: str, data: bytes | str) -> None:
    """Replace `path` with `data` atomically (temporary file, fsync, rename, directory fsync)."""
    if paths.is_url(path):
        paths.write_bytes(path, _encode(data))
        return
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(path))


def replace_together(files: dict[str, bytes | str]) -> None:
    """Write every file of `files` ({path: data}) to a temporary name first and rename them into
    place only once all are written: a failure part-way leaves every old file as it was."""
    if any(paths.is_url(p) for p in files):
        for path, data in files.items():
            paths.write_bytes(path, _encode(data))
        return
    tmps: list[tuple[str, str]] = []
    try:
        for path, data in files.items():
            tmps.append((write_temp(path, data), path))
        for tmp, path in tmps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
    for d in {os.path.dirname(p) for p in files}:
        fsync_dir(d)


def json_text(obj: Any, **kw) -> str:
    """Indented JSON with a final newline (how every JSON file of the project is written)."""
    return json.dumps(obj, indent=1, **kw) + "\n"


def read_json(path: str) -> dict:
    """A JSON object from `path`; a missing, unparsable or non-object file is a one-line UserError."""
    try:
        out = json.loads(paths.read_bytes(path))
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot parse ({e})") from None
    if not isinstance(out, dict):
        raise UserError(f"{path}: expected a JSON object")
    return out


# ----------------------------------------------------------------------------- JSONL

def append_jsonl(path: str, records: Iterable[dict]) -> None:
    """Append whole lines and fsync (the torn-tail policy's writer side)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not text:
        return
    if paths.is_url(path):
        old = paths.read_text(path) if paths.exists(path) else ""
        paths.write_bytes(path, (old + text).encode("utf-8"))
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def drop_torn_tail(path: str) -> None:
    """Truncate a file to its last newline: what a kill in the middle of a write leaves behind.
    Reads backwards in blocks, so a long file costs only its tail. (An object is never torn.)"""
    if paths.is_url(path):
        return
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            pos = size
            while pos > 0:
                step = min(4096, pos)
                f.seek(pos - step)
                i = f.read(step).rfind(b"\n")
                if i >= 0:
                    f.truncate(pos - step + i + 1)
                    return
                pos -= step
            f.truncate(0)
    except FileNotFoundError:
        pass


def read_jsonl(path: str, check: Callable[[dict], Any] | None = None, what: str = "record") -> list[Any]:
    """The complete lines of a JSONL file, parsed (a last line without its newline is a torn
    write and is ignored; blank lines are skipped). `check(rec)` may convert each record and raise
    KeyError/TypeError/ValueError for a bad one, which becomes `UserError("PATH:LINE: not a WHAT")`.
    A missing file reads as []."""
    if not paths.exists(path):
        return []
    out = []
    lines = io.StringIO(paths.read_text(path), newline=None)  # "\n" lines, as open() in text mode reads them
    for n, line in enumerate(lines, 1):
        if not line.endswith("\n"):
            break
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append(check(rec) if check is not None else rec)
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: not a {what}") from None
    return out
