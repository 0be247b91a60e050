"""Fault injection for the fault-tolerance tests (tests/faults) and benchmarks/soak.py.

Inert unless the environment variable NLA_FAULTS is set (one dict lookup per call). It holds
comma-separated rules `POINT@HITS[:ACTION]`:

    HITS    N (the N-th pass through POINT in this process, 1-based), N-M (passes N..M), N+ (N on)
    ACTION  kill      (default) SIGKILL this process: no cleanup, no atexit, no flush; exactly
                      what a preempted machine or `kill -9` does at that instruction
            torn      the caller writes part of its record, then the process is killed
            wait=PATH block until PATH exists (at most 300 s): a deterministic window in which
                      a test can start a second process against the same files
            error     raise InjectedError (a UserError): a user-facing error at that moment
            nan, inf  returned to the caller, which poisons its data with that value

    NLA_FAULTS="train.sft_ar.step@3"                     kill after the 3rd sft_ar step
    NLA_FAULTS="store.append.data@2,extract.batch@1:wait=/tmp/go"

Points (where `point()` is called): `store.append.data` (rows written, ledger not yet),
`store.append.stats` (stats sidecar written, ledger not yet), `store.append.ledger` (commit
done), `extract.batch` (each extraction batch), `extract.before_manifest`,
`train.<stage>.batch` (each training batch, before the step), `train.<stage>.step` (after the
step and its metrics, before a checkpoint), `train.<stage>.saving` (a checkpoint save started;
with async checkpoints it is being written in the background), `train.<stage>.before_done`
(final checkpoint committed, DONE not yet written), `metrics.write.<stage>` (a metrics line).
"""
from __future__ import annotations

import os
import signal
import sys
import time

from nla_jax.errors import UserError

ENV = "NLA_FAULTS"


class InjectedError(UserError):
    """The `error` action: stands for any user-facing error raised at that point."""

_counts: dict[str, int] = {}
_rules: list[tuple[str, int, float, str]] | None = None


def _parse(spec: str) -> list[tuple[str, int, float, str]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, action = item.partition(":")
        name, at, hits = where.partition("@")
        if not at or not name:
            raise ValueError(f"{ENV}: rule {item!r} must look like POINT@HITS[:ACTION]")
        if hits.endswith("+"):
            lo, hi = int(hits[:-1]), float("inf")
        elif "-" in hits:
            a, b = hits.split("-", 1)
            lo, hi = int(a), float(b)
        else:
            lo = int(hits)
            hi = float(lo)
        out.append((name, lo, hi, action or "kill"))
    return out


def active() -> bool:
    return bool(os.environ.get(ENV))


def kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached: SIGKILL is not deliverable late


def point(name: str) -> str | None:
    """Count a pass through `name`; kill / wait if a rule says so; else return the rule's
    action for the caller (nan, inf, torn) or None."""
    global _rules
    spec = os.environ.get(ENV)
    if not spec:
        return None
    if _rules is None:
        _rules = _parse(spec)
    n = _counts[name] = _counts.get(name, 0) + 1
    for rule_name, lo, hi, action in _rules:
        if rule_name != name or not lo <= n <= hi:
            continue
        if action == "kill":
            kill()
        if action == "error":
            raise InjectedError(f"injected fault at {name} (pass {n})")
        if action.startswith("wait="):
            path, deadline = action[5:], time.time() + 300
            while not os.path.exists(path) and time.time() < deadline:
                time.sleep(0.02)
            return None
        return action
    return None
