"""The disk fills up while a checkpoint or a store commit is being written (a small tmpfs, filled
to a few KB while the writer is held at a fault point): the run stops with one line naming the
full disk and what was being written, the previous checkpoint / the committed rows stay valid,
and after space is freed the same command resumes and ends bit for bit where an uninterrupted
run ends. Needs root to mount the tmpfs; skipped (with the reason) otherwise.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from . import _util as U


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield str(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: str, leave: int) -> str:
    """Allocate all but `leave` bytes of the disk to a filler file; returns its path."""
    path = os.path.join(disk, "filler")
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(free - leave, 1))
    finally:
        os.close(fd)
    return path


def test_disk_full_during_checkpoint_named_previous_checkpoint_valid(small_disk, ref_store, reference, tmp_path):
    wd = os.path.join(small_disk, "w")
    go = str(tmp_path / "go")
    cmd = U.train_cmd(ref_store, wd, "--stages", "sft_av", *U.FAULT_TRAIN[2:], "--config.train.keep=10")
    p = U.popen(cmd, faults=f"train.sft_av.step@3:wait={go}")
    d = os.path.join(wd, "sft_av")
    try:
        U.wait_for(lambda: 3 in U.train_steps_logged(U.metric_lines(wd, strict=False), "sft_av")
                   and U.steps_of(d) == [2] and not U.tmp_dirs(d), "step 3, with step 2 committed", p)
        filler = fill(small_disk, 64 * 1024)  # room for log lines, not for a checkpoint (~1 MB)
    finally:
        open(go, "w").close()
    _, err = p.communicate(timeout=300)
    r = subprocess.CompletedProcess(p.args, p.returncode, "", err)
    line = U.error_line(r, alone=False)
    assert line == (f"error: no space left on device while writing checkpoint step 4 in {d} (the last complete "
                    f"step, 2, is intact); free space and rerun the same command: it resumes from what was committed")
    assert U.steps_of(d) == [2] and not os.path.exists(os.path.join(d, "DONE"))
    U.assert_same_params(os.path.join(reference, "sft_av", "2"), os.path.join(d, "2"))
    os.remove(filler)
    n = len(U.metric_lines(wd))
    U.ok(U.run(cmd))
    assert U.train_steps_logged(U.metric_lines(wd)[n:], "sft_av") == [3, 4, 5, 6]
    U.assert_same_as_reference(reference, wd, ("sft_av",))


def test_disk_full_during_store_commit_named_committed_rows_valid(small_disk, ref_store, corpus, tmp_path):
    store = os.path.join(small_disk, "store")
    go = str(tmp_path / "go")
    stops = [c["stop"] for c in U.ledger(ref_store)["commits"]]
    p = U.popen(U.extract_cmd(store, corpus), faults=f"extract.batch@4:wait={go}")
    try:
        U.wait_for(lambda: U.committed_rows(store) == stops[2], "3 committed batches", p)
        filler = fill(small_disk, 4 * 1024)
    finally:
        open(go, "w").close()
    _, err = p.communicate(timeout=300)
    r = subprocess.CompletedProcess(p.args, p.returncode, "", err)
    line = U.error_line(r, alone=False)
    part = os.path.join(store, "part-00000")
    assert line == (f"error: no space left on device while writing rows {stops[2]}:{stops[3]} of store part {part} "
                    f"({stops[2]} rows committed before); free space and rerun the same command: it resumes from "
                    f"what was committed")
    assert U.ledger(store)["commits"] == U.ledger(ref_store)["commits"][:3]  # the committed rows, untouched
    os.remove(filler)
    U.ok(U.run(U.extract_cmd(store, corpus)))
    U.assert_same_store(ref_store, store)
