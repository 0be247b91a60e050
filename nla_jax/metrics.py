"""Metrics sinks for long-running jobs: JSONL (always) and TensorBoard (when tensorboardX is there).

Only process 0 writes. JSONL lines are appended and flushed per record, so a crash loses at
most the line being written; a resumed run appends after the old lines (records carry their
step, so a reader keeps the last record per (stage, step)).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np


def _plain(v: Any):
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist() if v.ndim else v.item()
    if hasattr(v, "shape") and hasattr(v, "dtype"):  # jax arrays
        return _plain(np.asarray(v))
    return v


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter
                    self.tb = SummaryWriter(os.path.join(workdir, "tb"))
                except ImportError:
                    self.tb = None

    def write(self, stage: str, step: int, values: dict[str, Any]) -> dict:
        rec = {"stage": stage, "step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in values.items()})
        if not self.enabled:
            return rec
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{stage}/{k}", v, step)
        return rec

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
