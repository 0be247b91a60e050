"""Local paths and object-store URLs behind one set of functions, so that work directories, stores,
checkpoints, metrics and model sources may be `gs://bucket/...` URLs as well as local paths.

Why a module: `os.path` on a URL silently makes a local directory (`os.path.abspath("gs://b/run")` is
`$PWD/gs:/b/run`), so every program would write per-host files nobody can read back. Here a local
path goes through `os` exactly as before (absolute, fsync, rename), and a URL through `etils.epath`
(gcsfs) for files and listings and a tensorstore kvstore for arrays (`kvstore_spec`). Orbax
takes the URL itself: it writes `gs://` through tensorstore's `gcs` driver.

The endpoint is the Google client libraries' standard environment variable `STORAGE_EMULATOR_HOST`
(gcsfs and google-cloud-storage read it; `configure_emulators` passes it on to tensorstore as
`TENSORSTORE_GCS_HTTP_URL`, with a placeholder token since emulators take no credentials). Without it
the real service and the machine's default credentials are used.

`s3://` is refused in one line: orbax-checkpoint 0.12.8 writes checkpoint arrays only to local disks
and `gs://` (its tensorstore spec builder raises "Checkpoint path should be absolute" for s3), and a
work directory whose checkpoints cannot be written is not worth half-supporting.

Object stores have no rename and no flock: a single-object write is atomic on its own (a reader sees
the old object or the new one), so `fileio.write_atomic` is one put there, and the locks are leases
(`nla_jax.locks`).
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
from typing import Iterator

import fsspec.config
from etils import epath

from nla_jax.errors import UserError

_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$")
SCHEMES = ("gs",)


def scheme(path: str) -> str | None:
    """'gs' / 's3' for a URL, None for a local path ("file://x" is the local path x)."""
    m = _URL.match(str(path))
    if m is None or m.group(1) == "file":
        return None
    if m.group(1) not in SCHEMES:
        why = " (orbax-checkpoint 0.12.8 writes checkpoints only to local disks and gs://)" if m.group(1) == "s3" else ""
        raise UserError(f"{path}: unsupported storage scheme {m.group(1)}:// (expected a local path or "
                        f"{', '.join(s + '://' for s in SCHEMES)}){why}")
    return m.group(1)


def is_url(path: str) -> bool:
    return scheme(path) is not None


def _local(path: str) -> str:
    m = _URL.match(str(path))
    return m.group(2) if m is not None and m.group(1) == "file" else str(path)


def absolute(path: str) -> str:
    """The canonical form: an absolute local path, or the URL without a trailing slash."""
    if is_url(path):
        head, rest = str(path).split("://", 1)
        return f"{head}://{rest.rstrip('/')}"
    return os.path.abspath(_local(path))


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if is_url(path) else os.path.join(_local(path), *parts)


def dirname(path: str) -> str:
    if is_url(path):
        head, rest = path.split("://", 1)
        return f"{head}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(_local(path))


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(_local(path))


# ----------------------------------------------------------------------------- emulators

def configure_emulators() -> None:
    """Point tensorstore (and through it orbax) at a GCS emulator when the standard
    STORAGE_EMULATOR_HOST names one. Idempotent; must run before the first gs:// array is opened."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        url = host if "://" in host else f"http://{host}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # an emulator takes any token
    # gcsfs logs a warning for every path of a bucket whose type it cannot query (emulators, and
    # buckets without the storage-control permission): it falls back to plain GCS, which is right
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    # gcsfs caches directory listings per process; other processes (the trainer's other hosts, a
    # checkpoint being written while a tool polls) change the bucket under it, so never cache
    for proto in ("gs", "gcs"):
        fsspec.config.conf.setdefault(proto, {})["use_listings_cache"] = False


configure_emulators()


def _epath(path: str):
    return epath.Path(path)   # gcsfs itself loads on the first gs:// path


# ----------------------------------------------------------------------------- files and directories

def exists(path: str) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.exists(_local(path))


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(_local(path))


def listdir(path: str) -> list[str]:
    """Names directly under `path` ([] for a missing directory on an object store, which has no
    empty directories)."""
    if is_url(path):
        p = _epath(path)
        return sorted(c.name for c in p.iterdir()) if p.exists() else []
    return os.listdir(_local(path))


def makedirs(path: str) -> None:
    """Local: os.makedirs(exist_ok=True). Object stores have no directories: nothing to do."""
    if not is_url(path):
        os.makedirs(_local(path), exist_ok=True)


def remove(path: str) -> None:
    if is_url(path):
        _epath(path).unlink()
    else:
        os.remove(_local(path))


def rmtree(path: str) -> None:
    if is_url(path):
        _epath(path).rmtree()
    else:
        shutil.rmtree(_local(path))


def rename(src: str, dst: str) -> None:
    """Local: os.rename. Object store: copy then delete, object by object (not atomic)."""
    if is_url(src):
        _epath(src).rename(dst)
    else:
        os.rename(_local(src), _local(dst))


def read_bytes(path: str) -> bytes:
    if is_url(path):
        return _epath(path).read_bytes()
    with open(_local(path), "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """One put on an object store (atomic there); a plain write locally (use fileio.write_atomic
    for crash safety on a local disk)."""
    if is_url(path):
        _epath(path).write_bytes(data)
    else:
        with open(_local(path), "wb") as f:
            f.write(data)


def walk_files(path: str) -> Iterator[str]:
    """Relative paths of every file under `path`."""
    if is_url(path):
        bare = lambda p: str(p).split("://", 1)[-1].rstrip("/")   # walk may drop the scheme
        root = bare(path)
        for d, _, files in _epath(path).walk():
            for f in files:
                yield posixpath.relpath(posixpath.join(bare(d), f), root)
        return
    base = _local(path)
    for d, _, files in os.walk(base):
        for f in files:
            yield os.path.relpath(os.path.join(d, f), base)


def _fetch(src, dst: str) -> None:
    """Copy one object to a local file unless a file of its size is already there; through a
    per-process temporary name, since processes sharing a host may fetch at once."""
    if os.path.exists(dst) and os.path.getsize(dst) == src.stat().length:
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.part-{os.getpid()}"
    with src.open("rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 24)
    os.replace(tmp, dst)


def local_copy(path: str, cache: str) -> str:
    """`path` itself when local; else the file or directory copied once into `cache` (a local
    directory; kept between runs, refreshed when the object sizes change) and its local path.
    Model sources are read by mmap and many small reads, which an object store does not serve."""
    if not is_url(path):
        return _local(path)
    src = _epath(path)
    dst = os.path.join(cache, re.sub(r"[^A-Za-z0-9._-]+", "_", absolute(path)))
    if not src.is_dir():
        _fetch(src, dst)
        return dst
    for rel in walk_files(path):
        _fetch(src / rel, os.path.join(dst, rel))
    return dst


# ----------------------------------------------------------------------------- tensorstore

def kvstore_spec(path: str) -> dict:
    """The tensorstore kvstore of a directory (trailing slash included, so keys are its files)."""
    if scheme(path) is None:
        return {"driver": "file", "path": _local(path)}
    bucket, _, key = path.split("://", 1)[1].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": key.rstrip("/") + "/" if key.strip("/") else ""}
