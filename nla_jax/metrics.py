"""Metrics sinks for long-running jobs: JSONL (always) and TensorBoard (when tensorboardX is there).

Only process 0 writes. JSONL lines are appended and flushed per record, so a crash loses at
most the line being written; a resumed run first cuts such a torn last line off (else the next
record would be glued to it and lost too), then appends after the old lines (records carry their
step, so a reader keeps the last record per (stage, step)).

On an object store (a gs:// work directory) an object cannot be appended to: the writer keeps the
file's text and puts it whole at most every FLUSH_S seconds and at close, so a crash loses at most
that many seconds of records (the resumed run recomputes the steps after its checkpoint anyway).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import numpy as np

from nla_jax import faults, fileio, paths

FLUSH_S = 30.0  # object stores: how often the metrics object is rewritten


def _plain(v: Any):
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist() if v.ndim else v.item()
    if hasattr(v, "shape") and hasattr(v, "dtype"):  # jax arrays
        return _plain(np.asarray(v))
    return v


class MetricsWriter:
    """Appends one JSON line per record to WORKDIR/metrics.jsonl (and scalars to WORKDIR/tb);
    enabled=False (processes other than 0) keeps the interface and writes nothing."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = paths.join(workdir, "metrics.jsonl")
        self.tb = None
        self._remote: list[str] | None = None   # object store: the text so far, put whole
        self._flushed = time.time()
        if enabled:
            paths.makedirs(workdir)
            fileio.drop_torn_tail(self.path)
            if paths.is_url(self.path):
                text = paths.read_text(self.path) if paths.exists(self.path) else ""
                self._remote = [text[:text.rfind("\n") + 1]]
            if tensorboard:
                try:
                    # imported here, not at the top: tensorboardX is optional (metrics.jsonl is the
                    # record, TensorBoard only a view of it) and its import (protobuf, ~0.1-0.3 s) is
                    # only worth paying in the one process that writes events, not in every program
                    # that imports this module to read metrics.jsonl
                    from tensorboardX import SummaryWriter
                    self.tb = SummaryWriter(paths.join(workdir, "tb"))
                except ImportError:
                    self.tb = None
                except Exception as e:  # noqa: BLE001 - e.g. gs:// without google-cloud-storage credentials
                    print(f"note: no TensorBoard events in {workdir} ({str(e).splitlines()[0] if str(e) else type(e).__name__});"
                          f" metrics.jsonl is written", file=sys.stderr)
                    self.tb = None

    def write(self, stage: str, step: int, values: dict[str, Any]) -> dict:
        rec = {"stage": stage, "step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in values.items()})
        if not self.enabled:
            return rec
        line = json.dumps(rec) + "\n"
        if self._remote is not None:
            self._remote.append(line)
            if time.time() - self._flushed >= FLUSH_S:
                self.flush()
        else:
            self._append_local(stage, line)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{stage}/{k}", v, step)
        return rec

    def _append_local(self, stage: str, line: str) -> None:
        with open(self.path, "a") as f:
            if faults.point(f"metrics.write.{stage}") == "torn":  # tests: half a line reaches the disk, then kill -9
                f.write(line[:len(line) // 2])
                f.flush()
                faults.kill()
            f.write(line)

    def flush(self) -> None:
        """Object store: put the whole text now (local files are appended per record)."""
        if self._remote is not None:
            paths.write_bytes(self.path, "".join(self._remote).encode("utf-8"))
            self._flushed = time.time()

    def close(self) -> None:
        if self.enabled:
            self.flush()
        tb, self.tb = self.tb, None
        if tb is None:
            return
        try:
            tb.close()
        except Exception:  # noqa: BLE001 - e.g. a full disk; metrics.jsonl is the record, TensorBoard a view
            # its atexit hook would retry the failing flush, and its writer thread die on the half-closed
            # queue, each printing a traceback after the one-line error: disarm both
            for w in (getattr(tb, "all_writers", None) or {}).values():
                ew = getattr(w, "event_writer", None)
                if ew is not None:
                    ew._closed = True
            _silence_tensorboard_threads()


def _silence_tensorboard_threads() -> None:
    """Drop uncaught exceptions of tensorboardX's threads (once per process): after a failed close
    they would only repeat the error already reported, as tracebacks."""
    previous = threading.excepthook
    if getattr(previous, "_nla_tb", False):
        return

    def hook(args):
        if type(args.thread).__module__.startswith("tensorboardX"):
            return
        previous(args)
    hook._nla_tb = True
    threading.excepthook = hook


def read(path: str) -> list[dict]:
    """Records of a metrics file, last write wins per (stage, step)."""
    out: dict[tuple, dict] = {}
    if not paths.exists(path):
        return []
    for line in paths.read_text(path).split("\n"):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a torn last line after a crash (or the empty tail)
            continue
        out[(r.get("stage"), r.get("step"), r.get("kind"))] = r
    return list(out.values())
