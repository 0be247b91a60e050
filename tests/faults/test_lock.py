"""Two processes pointed at the same work directory / store: the second is refused by the lock
with one line naming the holder, touches nothing, and the first finishes with exactly the result
it has alone. The first is held at a fault point (`wait=FILE`) until the second has been refused,
so the overlap is certain, not a matter of timing.
"""
from __future__ import annotations

import os

from . import _util as U


def test_second_trainer_refused_first_unharmed(ref_store, reference, tmp_path):
    wd = U.copy_stages(reference, str(tmp_path / "w"), ["sft_av"])
    go = str(tmp_path / "go")
    first = U.popen(U.train_cmd(ref_store, wd, *U.FAULT_TRAIN), faults=f"train.sft_ar.step@3:wait={go}")
    try:
        d = os.path.join(wd, "sft_ar")
        U.wait_for(lambda: 3 in U.train_steps_logged(U.metric_lines(wd, strict=False), "sft_ar")
                   and U.steps_of(d) == [2] and not U.tmp_dirs(d),
                   "the first trainer's 3rd sft_ar step, with step 2's async save committed", first)
        digest = lambda: {k: v for k, v in U.tree_digest(wd).items() if not k.startswith("tb/")}  # tb: its own thread
        before = digest()
        second = U.run(U.train_cmd(ref_store, wd, *U.FAULT_TRAIN))  # the same command, a second time
        line = U.error_line(second)
        assert line == f"error: work directory {wd} is in use by another trainer (pid {first.pid})", line
        assert digest() == before
        assert first.poll() is None
    finally:
        open(go, "w").close()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    U.assert_same_as_reference(reference, wd)


def test_second_extractor_refused_first_unharmed(ref_store, corpus, tmp_path):
    store = str(tmp_path / "store")
    go = str(tmp_path / "go")
    first = U.popen(U.extract_cmd(store, corpus), faults=f"extract.batch@4:wait={go}")
    try:
        stops = [c["stop"] for c in U.ledger(ref_store)["commits"]]
        part = os.path.join(store, "part-00000")

        def settled() -> bool:
            # the 3rd batch committed *and* its writer thread done: after the commit point it removes the
            # superseded stats sidecar, so until only the ledger's own sidecar is left the first extractor
            # still writes (the main thread is parked at batch 4 by then; nothing else writes)
            led = U.ledger(store)
            return int(led.get("committed", 0)) == stops[2] and \
                sorted(f for f in os.listdir(part) if f.startswith("stats-")) == [led["stats"]["file"]]
        U.wait_for(settled, "3 committed batches, the superseded statistics removed", first)
        before = U.tree_digest(store)
        second = U.run(U.extract_cmd(store, corpus))
        line = U.error_line(second, alone=False)  # after the corpus summary line
        assert line == (f"error: {os.path.join(store, 'part-00000')} is being written by another process "
                        f"(lock held by pid {first.pid})")
        assert U.tree_digest(store) == before
        assert first.poll() is None
    finally:
        open(go, "w").close()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    U.assert_same_store(ref_store, store)
