"""Exclusive locks that hold on a local disk and on an object store.

Local path: `flock` on the lock file, as always: the kernel releases it when the process dies
(kill -9 included), and the file names the holder (pid, host) for the refusal message.

Object store (gs://): there is no flock, so a lock is a **lease**: a small JSON object naming
its owner (pid, host, a random token) and when it expires. The holder renews it every third of the
lease in a background thread. Taking the lock:
  - no lock object, or an expired one: write ours (conditional on the generation just read, so two
    takers cannot both win on a store that honours preconditions), then read it back after a short
    settle and hold it only if the token is ours (which also decides a race on an emulator that
    ignores preconditions);
  - a live lease of someone else: wait until it expires (at most one lease), then look again; a
    holder that renewed in the meantime is alive and the lock is refused, naming it; one that did
    not (a process killed -9) is taken over. So a crashed run's restart waits at most one lease.
The lease is `LEASE_S` seconds (env NLA_LOCK_LEASE_S). Clocks of the hosts sharing a bucket are
assumed to agree to well under a lease.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

import tensorstore as ts

from nla_jax import paths

log = logging.getLogger(__name__)

LEASE_S = float(os.environ.get("NLA_LOCK_LEASE_S", "30"))
_SETTLE_S = 0.3


class Busy(Exception):
    """The lock is held by another live process; str() names it."""


def _me() -> str:
    return f"{os.getpid()} {socket.gethostname()}"


def describe_owner(owner: str) -> str:
    parts = owner.split()
    if not parts:
        return "pid unknown"
    host = parts[1] if len(parts) > 1 else None
    return f"pid {parts[0]}" if host in (None, socket.gethostname()) else f"pid {parts[0]} on {host}"


class Lock:
    """Take with `acquire()` (raises Busy), give back with `release()`; also a context manager."""

    def __init__(self, path: str, lease_s: float | None = None) -> None:
        self.path = path
        self.lease_s = LEASE_S if lease_s is None else float(lease_s)
        self._fd: int | None = None
        self._kv = None
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self._token is not None

    def acquire(self) -> "Lock":
        if self.held:
            return self
        if paths.is_url(self.path):
            self._acquire_lease()
        else:
            self._acquire_flock()
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        if self._token is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            try:
                r = self._kv.read(self._key).result()
                if r.state == "value" and _parse(r.value).get("token") == self._token:
                    self._kv.write(self._key, None, if_equal=r.stamp.generation).result()
            except Exception as e:  # noqa: BLE001 - an unreleased lease expires on its own
                log.warning("could not release lock %s (it expires in %.0fs): %s", self.path, self.lease_s, e)
            self._token = None

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local: flock

    def _acquire_flock(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.pread(fd, 256, 0).decode(errors="replace")
            except OSError:
                owner = ""
            os.close(fd)
            raise Busy(describe_owner(owner)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_me()}\n".encode(), 0)
        self._fd = fd

    # -- object store: lease

    @property
    def _key(self) -> str:
        return paths.basename(self.path)

    def _record(self) -> bytes:
        return json.dumps({"owner": _me(), "token": self._token, "expires": time.time() + self.lease_s}).encode()

    def _acquire_lease(self) -> None:
        self._kv = ts.KvStore.open(paths.kvstore_spec(paths.dirname(self.path))).result()
        token = uuid.uuid4().hex
        seen: dict | None = None       # the other holder's record when we started waiting
        told = False
        while True:
            r = self._kv.read(self._key).result()
            rec = _parse(r.value) if r.state == "value" else {}
            live = rec and rec.get("token") != token and float(rec.get("expires", 0)) > time.time()
            if live:
                if seen is not None and (rec.get("token") != seen.get("token") or rec.get("expires") != seen.get("expires")):
                    raise Busy(describe_owner(str(rec.get("owner", ""))))   # renewed (or retaken): alive
                if seen is None:
                    seen = rec
                wait = min(float(rec["expires"]) - time.time(), self.lease_s) + 0.5
                if not told:
                    told = True
                    print(f"note: {self.path} is leased by {describe_owner(str(rec.get('owner', '')))}; waiting "
                          f"{wait:.0f}s to see whether it renews (a crashed holder's lease lapses)", file=sys.stderr)
                time.sleep(max(0.1, wait))
                continue
            self._token = token
            self._kv.write(self._key, self._record(), if_equal=r.stamp.generation).result()
            time.sleep(_SETTLE_S)
            back = self._kv.read(self._key).result()
            if back.state == "value" and _parse(back.value).get("token") == token:
                break
            self._token = None             # another taker won the race; look again
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.path}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                r = self._kv.read(self._key).result()
                if r.state != "value" or _parse(r.value).get("token") != self._token:
                    log.error("lock %s was taken by another process while held by this one", self.path)
                    return
                self._kv.write(self._key, self._record(), if_equal=r.stamp.generation).result()
            except Exception as e:  # noqa: BLE001 - a transient store error: retry at the next tick
                log.warning("could not renew lock %s: %s", self.path, e)


def _parse(value: bytes) -> dict:
    try:
        out = json.loads(value)
        return out if isinstance(out, dict) else {}
    except ValueError:
        return {}
