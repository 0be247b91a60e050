"""Metrics sinks for long-running jobs: JSONL (always) and TensorBoard (when tensorboardX is there).

Only process 0 writes. JSONL lines are appended and flushed per record, so a crash loses at
most the line being written; a resumed run first cuts such a torn last line off (else the next
record would be glued to it and lost too), then appends after the old lines (records carry their
step, so a reader keeps the last record per (stage, step)).
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import numpy as np

from nla_jax import faults, fileio


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
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            fileio.drop_torn_tail(self.path)
            if tensorboard:
                try:
                    # imported here, not at the top: tensorboardX is optional (metrics.jsonl is the
                    # record, TensorBoard only a view of it) and its import (protobuf, ~0.1-0.3 s) is
                    # only worth paying in the one process that writes events, not in every program
                    # that imports this module to read metrics.jsonl
                    from tensorboardX import SummaryWriter
                    self.tb = SummaryWriter(os.path.join(workdir, "tb"))
                except ImportError:
                    self.tb = None

    def write(self, stage: str, step: int, values: dict[str, Any]) -> dict:
        rec = {"stage": stage, "step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in values.items()})
        if not self.enabled:
            return rec
        line = json.dumps(rec) + "\n"
        with open(self.path, "a") as f:
            if faults.point(f"metrics.write.{stage}") == "torn":  # tests: half a line reaches the disk, then kill -9
                f.write(line[:len(line) // 2])
                f.flush()
                faults.kill()
            f.write(line)
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{stage}/{k}", v, step)
        return rec

    def close(self) -> None:
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
    if not os.path.exists(path):
        return []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a torn last line after a crash
                continue
            out[(r.get("stage"), r.get("step"), r.get("kind"))] = r
    return list(out.values())
