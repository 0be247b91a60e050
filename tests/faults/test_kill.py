"""kill -9 at seeded moments of `python -m nla_jax.extract` and of `python -m nla_jax.train` (every
stage), then the same command again: the final store / parameters equal an uninterrupted run's,
bit for bit, and each rerun resumes from what was committed before the kill (no step is redone
before the last checkpoint, none is skipped).

The moments are fault points (nla_jax/faults.py): the process SIGKILLs itself there, which is a
kill -9 at exactly that instruction (other threads, e.g. an async checkpoint writer or the store's
write pool, die wherever they are). The seed picks the moment kinds and the step / batch counts,
so every failure is reproducible. benchmarks/soak.py kills from outside on a timer instead.
"""
from __future__ import annotations

import json
import os
import random

import pytest

from . import _util as U

# ----------------------------------------------------------------------------- extraction

X_KINDS = ("store.append.data",    # rows written, ledger not yet: the rows are garbage to overwrite
           "store.append.stats",   # stats sidecar written, ledger not yet
           "store.append.ledger",  # commit done, the next batch not started
           "extract.batch")        # between batches (a write may still be in flight)


def extract_plan(seed: int) -> list[tuple[str, int]]:
    """Two kills at seeded points; seed 2 also kills after the last batch, before the manifest."""
    rng = random.Random(seed)
    plan = [(kind, rng.randint(2, 4)) for kind in rng.sample(X_KINDS, 2)]
    if seed == 2:
        plan.append(("extract.before_manifest", 1))
    return plan


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_extract_at_seeded_moments_then_resume_equals_clean(seed, ref_store, corpus, tmp_path):
    store = str(tmp_path / "store")
    stops = [c["stop"] for c in U.ledger(ref_store)["commits"]]  # rows after each batch of the clean run
    for kind, hit in extract_plan(seed):
        before = U.committed_rows(store)
        done_before = stops.index(before) + 1 if before else 0  # batches committed before this process
        r = U.run(U.extract_cmd(store, corpus), faults=f"{kind}@{hit}")
        U.killed(r)
        assert not os.path.exists(os.path.join(store, "manifest.json"))
        after = U.committed_rows(store)
        if kind == "extract.before_manifest":
            assert after == stops[-1]
        elif kind == "store.append.ledger":
            assert after == stops[done_before + hit - 1]      # the hit-th commit of this process landed
        elif kind == "extract.batch":                          # the previous batch's write may be in flight
            assert after in {before, *stops[max(0, done_before + hit - 3):done_before + hit - 1]}
        else:
            assert after == (stops[done_before + hit - 2] if done_before + hit >= 2 else 0)  # not the hit-th
        # an unfinished store is refused by its readers, named
        from nla_jax.data import store as store_lib
        from nla_jax.errors import UserError
        with pytest.raises(UserError, match="manifest.json: missing; the store was not finalized"):
            store_lib.open_store(store)
    U.ok(U.run(U.extract_cmd(store, corpus)))
    U.assert_same_store(ref_store, store)
    v = U.run(U.extract_cmd(store, corpus, "--verify"))
    assert v.returncode == 0 and "OK (320 rows" in v.stdout, v.stdout + v.stderr


# ----------------------------------------------------------------------------- training

T_KINDS = ("step",         # after a training step and its metrics line, before its checkpoint
           "saving",       # an async checkpoint save started and is being written
           "before_done",  # the final checkpoint is committed, DONE not yet written
           "torn")         # half a metrics line reached the disk


def train_plan(seed: int) -> list[tuple[str, str, str]]:
    """One kill in each stage; over seeds 0..2 every kind hits at least two different stages."""
    rng = random.Random(100 + seed)
    plan = []
    for i, stage in enumerate(U.TRAIN_STAGES):
        kind = T_KINDS[(seed + i) % len(T_KINDS)]
        rule = {"step": f"train.{stage}.step@{rng.randint(1, U.STEPS - 1)}",
                "saving": f"train.{stage}.saving@{rng.randint(1, 3)}",
                "before_done": f"train.{stage}.before_done@1",
                "torn": f"metrics.write.{stage}@{rng.randint(1, 5)}:torn"}[kind]
        plan.append((stage, kind, rule))
    return plan


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_training_at_seeded_moments_then_resume_equals_uninterrupted(seed, ref_store, reference, tmp_path):
    wd = str(tmp_path / "w")
    cmd = U.train_cmd(ref_store, wd, *U.FAULT_TRAIN)
    pending = None  # (stage, committed step) of the previous kill, checked after the next run
    for stage, kind, rule in train_plan(seed) + [(None, None, None)]:
        n_before = len(U.metric_lines(wd, strict=False))
        r = U.run(cmd, faults=rule)
        if rule is None:
            U.ok(r)
        else:
            U.killed(r)
        new = U.metric_lines(wd, strict=False)[n_before:]
        if pending is not None:
            # the rerun resumed the killed stage right after its newest committed checkpoint
            pstage, committed = pending
            redone = U.train_steps_logged(new, pstage)
            assert redone == list(range(committed + 1, U.STEPS + 1)), (pstage, committed, redone)
            assert os.path.exists(os.path.join(wd, pstage, "DONE"))
            assert not U.tmp_dirs(os.path.join(wd, pstage))  # an interrupted save's leftovers are gone
        if rule is None:
            break
        d = os.path.join(wd, stage)
        assert not os.path.exists(os.path.join(d, "DONE")), (stage, kind)
        committed = max(U.steps_of(d), default=0)
        logged = U.train_steps_logged(U.metric_lines(wd, strict=False), stage)
        if kind == "before_done":
            assert committed == U.STEPS
        elif kind == "saving":
            step = 2 * int(rule.rsplit("@", 1)[1])  # the step whose save was in flight
            assert committed < step and U.tmp_dirs(d), (committed, step, os.listdir(d))
        elif kind == "step":
            assert max(logged) == int(rule.rsplit("@", 1)[1]) and committed <= max(logged)
        else:  # the torn line is the last thing in the file: no newline at its end
            with open(os.path.join(wd, "metrics.jsonl"), "rb") as f:
                assert not f.read().endswith(b"\n")
        pending = (stage, committed)
    U.assert_same_as_reference(reference, wd)


def test_train_plans_cover_every_kind_and_stage():
    """The seeds above are not redundant: each kind of moment hits at least two stages."""
    seen = {(kind, stage) for seed in (0, 1, 2) for stage, kind, _ in train_plan(seed)}
    for kind in T_KINDS:
        assert len({s for k, s in seen if k == kind}) >= 2, kind
    assert {k for seed in (0, 1, 2) for k, _ in extract_plan(seed)} >= set(X_KINDS)


def test_torn_metrics_line_is_cut_off_on_resume(tmp_path):
    """The writer's repair on its own: a torn last line is cut back to the last newline, so the next
    record starts a line of its own (else both would be unreadable)."""
    from nla_jax import metrics
    wd = str(tmp_path)
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"stage": "rl", "step": 1}) + "\n" + '{"stage": "rl", "st')
    w = metrics.MetricsWriter(wd, tensorboard=False)
    w.write("rl", 2, {"x": 1.0})
    assert [(r["stage"], r["step"]) for r in U.metric_lines(wd)] == [("rl", 1), ("rl", 2)]
