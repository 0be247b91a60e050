"""Non-finite activations reaching a training step (the batch poisoned by a fault rule: NaN or inf
activations make the loss and every gradient non-finite). A non-finite step's update is dropped
inside the compiled step and counted (`skipped`); `train.max_nonfinite` of them in a row stop the
run with one error line, and no checkpoint is written inside such a run of bad steps, so the last
checkpoint is the last good state. Rerun once the cause is gone: it resumes from there and ends
where an uninterrupted run ends, bit for bit.
"""
from __future__ import annotations

import os

import numpy as np

from . import _util as U


def test_one_nonfinite_step_is_skipped_and_counted(ref_store, tmp_path):
    wd = str(tmp_path / "w")
    r = U.run(U.train_cmd(ref_store, wd, "--stages", "sft_av", "--config.sft_av.steps=5",
                          "--config.train.ckpt_every=1", "--config.train.keep=10"),
              faults="train.sft_av.batch@3:nan")
    U.ok(r)
    recs = {s: rec for (st, s, kind), rec in U.records(wd, ("sft_av",)).items() if kind is None}
    assert [recs[s]["skipped"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert np.isnan(recs[3]["loss"]) and all(np.isfinite(recs[s]["loss"]) for s in (1, 2, 4, 5))
    d = os.path.join(wd, "sft_av")
    # every step is checkpointed except the bad one (no checkpoint inside a run of bad steps)
    assert U.steps_of(d) == [1, 2, 4, 5] and os.path.exists(os.path.join(d, "DONE"))
    p2, p4 = U.params(os.path.join(d, "2")), U.params(os.path.join(d, "4"))
    assert (int(p4["['step']"]), int(p4["['skipped']"]), int(p4["['streak']"])) == (4, 1, 0)
    # the optimizer saw 3 updates in 4 steps: step 3's was dropped whole (Adam's step counts)
    counts = [k for k in p4 if k.startswith("['opt']") and k.endswith("['count']")]
    assert counts and all(int(p2[k]) == 2 and int(p4[k]) == 3 for k in counts), {k: (p2[k], p4[k]) for k in counts}
    # and the parameters moved again at step 4
    assert any(p2[k].tobytes() != p4[k].tobytes() for k in p2 if k.startswith("['av']"))


def test_nonfinite_streak_stops_with_last_good_checkpoint_then_resume_equals_uninterrupted(
        ref_store, reference, tmp_path):
    wd = U.copy_stages(reference, str(tmp_path / "w"), ["sft_av", "sft_ar"])
    cmd = U.train_cmd(ref_store, wd, *U.FAULT_TRAIN, "--config.train.max_nonfinite=3")
    r = U.run(cmd, faults="train.rl.batch@3+:inf")  # every rl batch from the 3rd on
    line = U.error_line(r, alone=False)
    d = os.path.join(wd, "rl")
    assert line == (f"error: stage rl: 3 non-finite steps in a row up to step 5; stopped. "
                    f"Last good checkpoint: step 2 in {d}"), line
    assert U.steps_of(d) == [2] and not U.tmp_dirs(d) and not os.path.exists(os.path.join(d, "DONE"))
    recs = {s: rec for (st, s, kind), rec in U.records(wd, ("rl",)).items()}
    assert [recs[s]["skipped"] for s in range(1, 6)] == [0, 0, 1, 2, 3] and 6 not in recs
    U.assert_same_params(os.path.join(reference, "rl", "2"), os.path.join(d, "2"))  # intact, and the good one
    U.ok(U.run(cmd))  # the cause is gone
    U.assert_same_as_reference(reference, wd)
