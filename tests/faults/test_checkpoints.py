"""Damaged checkpoints and checkpoints of another config, seen through `python -m nla_jax.train`.

Starting point of every case (fixture `mid_sft_ar`): the reference's finished sft_av, and sft_ar
killed -9 after its 5th step with steps 2 and 4 committed (synchronous saves, so both are
complete). A damaged newest step is skipped with a named warning, set aside (not deleted), and
the stage resumes from the last good step to the same final parameters as the uninterrupted run.
Nothing damaged is ever deleted, and a stage never starts over on top of steps that do not read.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from . import _util as U

SFT_AR = ("--stages", "sft_ar", *U.FAULT_TRAIN[2:])


@pytest.fixture(scope="module")
def mid_sft_ar(ref_store, reference, tmp_path_factory) -> str:
    wd = U.copy_stages(reference, str(tmp_path_factory.mktemp("mid_sft_ar") / "w"), ["sft_av"])
    r = U.run(U.train_cmd(ref_store, wd, *SFT_AR, "--config.train.async_checkpoint=False"),
              faults="train.sft_ar.step@5")
    U.killed(r)
    assert U.steps_of(os.path.join(wd, "sft_ar")) == [2, 4]
    return wd


def _copy(src: str, tmp_path) -> str:
    dst = str(tmp_path / "w")
    shutil.copytree(src, dst)
    return dst


def _damage(step_dir: str, how: str) -> None:
    state = os.path.join(step_dir, "state")
    if how == "truncated":            # e.g. a copy cut short, a disk that filled up after the commit
        files = [f for f in glob.glob(os.path.join(state, "**", "*"), recursive=True)
                 if os.path.isfile(f) and "/d/" in f]
        assert files
        for f in files:
            os.truncate(f, os.path.getsize(f) // 2)
    elif how == "half_copied":        # e.g. an rsync that stopped after the metadata: no array data
        for d in glob.glob(os.path.join(state, "**", "d"), recursive=True):
            shutil.rmtree(d)
    elif how == "no_meta":            # the step's meta item lost
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "half_copied"])
def test_damaged_newest_checkpoint_skipped_last_good_restored(how, mid_sft_ar, ref_store, reference, tmp_path):
    wd = _copy(mid_sft_ar, tmp_path)
    d = os.path.join(wd, "sft_ar")
    _damage(os.path.join(d, "4"), how)
    n = len(U.metric_lines(wd))
    r = U.run(U.train_cmd(ref_store, wd, *SFT_AR))
    U.ok(r)
    assert f"skipping checkpoint step 4 in {d}: it does not read" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]  # a warning line, not background-thread noise
    assert len(glob.glob(os.path.join(d, "4.unreadable-*"))) == 1  # kept for inspection, out of the way
    assert U.train_steps_logged(U.metric_lines(wd)[n:], "sft_ar") == [3, 4, 5, 6]  # resumed from step 2
    U.assert_same_params(os.path.join(reference, "sft_ar", "6"), os.path.join(d, "6"))
    U.assert_same_records(reference, wd, ("sft_ar",))


def test_every_checkpoint_damaged_refused_nothing_moved(mid_sft_ar, ref_store, tmp_path):
    wd = _copy(mid_sft_ar, tmp_path)
    d = os.path.join(wd, "sft_ar")
    _damage(os.path.join(d, "4"), "truncated")
    _damage(os.path.join(d, "2"), "no_meta")
    before = U.tree_digest(d)
    r = U.run(U.train_cmd(ref_store, wd, *SFT_AR))
    line = U.error_line(r, alone=False)
    assert f"no checkpoint in {d} reads (steps 2, 4); move that directory aside to start stage sft_ar over" in line
    assert U.tree_digest(d) == before  # neither deleted, nor moved, nor overwritten by a fresh start


@pytest.mark.parametrize("args,needle", [
    (("--config.sft_ar.optim.lr=0.001",), "sft_ar.optim.lr is 3e-05 there, 0.001 now"),
    (("--config.sft_ar.batch=8",), "sft_ar.batch is 4 there, 8 now"),
    (("--config.data.seed=1",), "data.seed is 0 there, 1 now"),
    (("--config.ar.head_init=identity",), 'ar.head_init is "ridge" there, "identity" now'),
], ids=["optimizer_lr", "batch", "data_seed", "ar_section"])
def test_checkpoints_of_another_config_refused_before_compute(args, needle, mid_sft_ar, ref_store, tmp_path):
    wd = _copy(mid_sft_ar, tmp_path)
    before = U.tree_digest(wd)
    r = U.run(U.train_cmd(ref_store, wd, *SFT_AR, *args))
    line = U.error_line(r)
    assert f"checkpoints in {os.path.join(wd, 'sft_ar')} were written by a different config" in line, line
    assert needle in line and "use a fresh work directory" in line, line
    assert U.tree_digest(wd) == before


def test_checkpoints_of_another_model_refused(mid_sft_ar, ref_store, tmp_path):
    """A work directory pointed at by another model's config (tiny:qwen2, same width)."""
    wd = _copy(mid_sft_ar, tmp_path)
    before = U.tree_digest(wd)
    cmd = U.train_cmd(ref_store, wd, *SFT_AR)
    cmd[cmd.index(U.TINY)] = U.TINY + ":qwen2"
    line = U.error_line(U.run(cmd))
    assert "were written by a different config" in line and 'model.arch.family is "llama" there, "qwen2" now' in line
    assert U.tree_digest(wd) == before


def test_more_steps_extend_the_run(mid_sft_ar, ref_store, tmp_path):
    """`steps` is not fingerprinted (nor eval/checkpoint cadence): a rerun with more steps continues."""
    wd = _copy(mid_sft_ar, tmp_path)
    n = len(U.metric_lines(wd))
    r = U.run(U.train_cmd(ref_store, wd, *SFT_AR, "--config.sft_ar.steps=8", "--config.sft_ar.eval_every=4",
                          "--config.train.ckpt_every=3"))
    U.ok(r)
    assert U.train_steps_logged(U.metric_lines(wd)[n:], "sft_ar") == [5, 6, 7, 8]
    d = os.path.join(wd, "sft_ar")
    assert os.path.exists(os.path.join(d, "DONE")) and U.steps_of(d)[-1] == 8
    with open(os.path.join(d, "DONE")) as f:
        assert json.load(f)["step"] == 8


def test_error_while_an_async_save_is_in_flight_one_line_and_the_save_completes(ref_store, reference, tmp_path):
    """A user error raised in a stage while its checkpoint is being written in the background (here
    injected right after the save starts): one line, no orbax/asyncio traceback from the writer
    threads, and the save that was under way completes instead of being left half-written."""
    wd = str(tmp_path / "w")
    r = U.run(U.train_cmd(ref_store, wd, "--stages", "sft_av", *U.FAULT_TRAIN[2:]),
              faults="train.sft_av.saving@1:error")
    line = U.error_line(r, alone=False)
    assert line == "error: injected fault at train.sft_av.saving (pass 1)", line
    d = os.path.join(wd, "sft_av")
    assert U.steps_of(d) == [2] and not U.tmp_dirs(d)
    U.assert_same_params(os.path.join(reference, "sft_av", "2"), os.path.join(d, "2"))


def test_checkpoints_fingerprinted_by_an_older_trainer_accepted_when_their_config_agrees(
        mid_sft_ar, ref_store, reference, tmp_path):
    """The fingerprint is a shortcut; the config saved with each step decides. Steps whose fingerprint
    was computed by another version of the trainer (here: overwritten) but whose saved config agrees
    on every fingerprinted key resume as usual."""
    wd = _copy(mid_sft_ar, tmp_path)
    for step in ("2", "4"):
        path = os.path.join(wd, "sft_ar", step, "meta", "metadata")
        with open(path) as f:
            payload = json.load(f)
        payload["fingerprint"] = "0123456789abcdef"
        with open(path, "w") as f:
            json.dump(payload, f)
    r = U.run(U.train_cmd(ref_store, wd, *SFT_AR))
    U.ok(r)
    U.assert_same_params(os.path.join(reference, "sft_ar", "6"), os.path.join(wd, "sft_ar", "6"))
