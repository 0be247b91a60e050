"""Checkpointer (orbax) and WorkdirLock.

Covers: round trip + keep-N + latest_step; restore onto other meshes (8 fake devices, subprocess);
two real processes falling back together; damaged newest step -> previous good one (and set
aside, not deleted); orbax's tmp dir from an interrupted save; fingerprint / shape mismatches
-> UserError; the work-directory lock across processes (kill -9 frees it); async save.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nla_jax import checkpoint as ckpt_lib
from nla_jax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# When a damaged step fails mid-read, tensorstore completes the other pending reads after orbax's
# asyncio loop has closed; Python reports that as an unraisable "Event loop is closed". Harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def state_at(step: int) -> dict:
    return {"params": {"w": jnp.full((4, 3), float(step), jnp.float32),
                       "b": jnp.arange(3, dtype=jnp.float32) * step},
            "opt": (jnp.arange(5, dtype=jnp.int32) + step, {"mu": jnp.ones((2, 2)) * step}),
            "step": jnp.int32(step)}


def abstract_of(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def assert_tree_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def saved_dir(tmp_path, steps, keep=5, fp="fp0"):
    d = str(tmp_path / "checkpoints")
    with ckpt_lib.Checkpointer(d, keep=keep, fingerprint=fp) as mgr:
        for s in steps:
            assert mgr.save(s, state_at(s), {"step": s, "config": {"lr": 1e-3}})
        mgr.wait()
    return d


def test_fingerprint_is_order_independent_and_short():
    a = ckpt_lib.fingerprint({"model": {"d": 64, "layers": 2}, "seq": 128})
    assert a == ckpt_lib.fingerprint({"seq": 128, "model": {"layers": 2, "d": 64}})
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != ckpt_lib.fingerprint({"model": {"d": 64, "layers": 3}, "seq": 128})


def test_round_trip_keep_and_latest(tmp_path):
    d = str(tmp_path / "ck")
    mgr = ckpt_lib.Checkpointer(d, keep=2, async_save=False, fingerprint="fp0")
    assert mgr.latest_step() is None
    with pytest.raises(UserError, match="no checkpoints in"):
        mgr.restore(abstract_of(state_at(0)))
    meta = {"config": {"model": "tiny", "lr": 0.001}, "data": {"epoch": 1, "offset": [3, 4]}, "stage": "sft"}
    for s in range(1, 6):
        assert mgr.save(s, state_at(s), dict(meta, step=s))
    mgr.wait()
    assert mgr.all_steps() == [4, 5] and mgr.latest_step() == 5
    assert sorted(os.listdir(d)) == ["4", "5"]
    state, got = mgr.restore(abstract_of(state_at(0)))
    assert mgr.restored_step == 5 and got == dict(meta, step=5)
    assert_tree_equal(state, state_at(5))
    state, got = mgr.restore(abstract_of(state_at(0)), step=4)
    assert_tree_equal(state, state_at(4)) and got["step"] == 4
    with pytest.raises(UserError, match="no checkpoint step 2 in .*available: \\[4, 5\\]"):
        mgr.restore(abstract_of(state_at(0)), step=2)
    assert mgr.save(5, state_at(5), meta) is False  # already saved: a no-op, as in orbax
    with pytest.raises(UserError, match="already has the later step 5"):
        mgr.save(3, state_at(3), meta)  # orbax would skip it silently
    with pytest.raises(TypeError, match="JSON"):
        mgr.save(6, state_at(6), {"bad": object()})
    mgr.close()


def test_keep_every_keeps_multiples_beside_the_newest(tmp_path):
    d = str(tmp_path / "ck")
    with ckpt_lib.Checkpointer(d, keep=2, keep_every=3, async_save=False, fingerprint="fp0") as mgr:
        for s in range(1, 9):
            assert mgr.save(s, state_at(s), {"step": s})
        mgr.wait()
        assert mgr.all_steps() == [3, 6, 7, 8]
        state, got = mgr.restore(abstract_of(state_at(0)), step=3)
        assert_tree_equal(state, state_at(3)) and got["step"] == 3
    with ckpt_lib.Checkpointer(str(tmp_path / "ck0"), keep=2, keep_every=0, async_save=False) as mgr:
        for s in range(1, 5):
            mgr.save(s, state_at(s), {"step": s})
        mgr.wait()
        assert mgr.all_steps() == [3, 4]                 # 0: only the newest `keep`
    with pytest.raises(UserError, match="keep_every must be >= 0"):
        ckpt_lib.Checkpointer(str(tmp_path / "bad"), keep=2, keep_every=-1)


def test_async_save_seen_by_a_new_checkpointer(tmp_path):
    d = str(tmp_path / "ck")
    big = {"w": jnp.arange(512 * 512, dtype=jnp.float32).reshape(512, 512), "n": jnp.int32(9)}
    mgr = ckpt_lib.Checkpointer(d, keep=3, async_save=True, fingerprint="fp0")
    assert mgr.save(7, big, {"k": "v"})
    mgr.wait()
    assert os.path.isdir(os.path.join(d, "7")) and not glob.glob(os.path.join(d, "*tmp*"))
    other = ckpt_lib.Checkpointer(d, keep=3, fingerprint="fp0", read_only=True)
    assert other.latest_step() == 7
    state, meta = other.restore(abstract_of(big))
    assert_tree_equal(state, big) and meta == {"k": "v"}
    # latest_step on the writer waits for an in-flight save instead of reporting it early
    assert mgr.save(8, big, {"k": "w"})
    assert mgr.latest_step() == 8 and os.path.isdir(os.path.join(d, "8"))
    mgr.close()
    other.close()


def _damage(d, step, how):
    root = os.path.join(d, str(step))
    if how == "truncated_arrays":
        files = glob.glob(os.path.join(root, "state", "d", "*"))
        assert files
        for f in files:
            os.truncate(f, os.path.getsize(f) // 2)
    elif how == "deleted_array_metadata":
        os.remove(os.path.join(root, "state", "_METADATA"))
    elif how == "deleted_meta":
        os.remove(os.path.join(root, "meta", "metadata"))


@pytest.mark.parametrize("how", ["truncated_arrays", "deleted_array_metadata", "deleted_meta"])
def test_damaged_newest_step_falls_back(tmp_path, caplog, how):
    d = saved_dir(tmp_path, [1, 2, 3], keep=3)
    _damage(d, 3, how)
    mgr = ckpt_lib.Checkpointer(d, keep=3, fingerprint="fp0")
    with caplog.at_level("WARNING", logger="nla_jax.checkpoint"):
        state, meta = mgr.restore(abstract_of(state_at(0)))
    assert mgr.restored_step == 2 and meta["step"] == 2
    assert_tree_equal(state, state_at(2))
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint step 3" in r.getMessage()]
    assert len(skipped) == 1 and "\n" not in skipped[0] and d in skipped[0]
    # the damaged step is kept for inspection, but out of orbax's way
    aside = glob.glob(os.path.join(d, "3.unreadable-*"))
    assert len(aside) == 1 and mgr.all_steps() == [1, 2] and mgr.latest_step() == 2
    # training resumes: step 3 is saved again and keep=3 prunes step 1, not the set-aside copy
    assert mgr.save(3, state_at(3), {"step": 3})
    assert mgr.save(4, state_at(4), {"step": 4})
    mgr.wait()
    assert mgr.all_steps() == [2, 3, 4] and os.path.isdir(aside[0])
    mgr.close()


def test_latest_step_skips_unreadable_metadata(tmp_path, caplog):
    d = saved_dir(tmp_path, [1, 2])
    _damage(d, 2, "deleted_meta")
    mgr = ckpt_lib.Checkpointer(d, fingerprint="fp0", read_only=True)
    with caplog.at_level("WARNING", logger="nla_jax.checkpoint"):
        assert mgr.latest_step() == 1
    assert any("skipping checkpoint step 2" in r.getMessage() for r in caplog.records)
    _, meta = mgr.restore(abstract_of(state_at(0)))
    assert meta["step"] == 1 and os.path.isdir(os.path.join(d, "2"))  # read-only: nothing moved


def test_all_steps_damaged_is_a_user_error_and_moves_nothing(tmp_path):
    d = saved_dir(tmp_path, [1, 2])
    _damage(d, 1, "truncated_arrays")
    _damage(d, 2, "truncated_arrays")
    mgr = ckpt_lib.Checkpointer(d, fingerprint="fp0")
    with pytest.raises(UserError, match=r"no checkpoint in .* restores \(tried steps 2, 1"):
        mgr.restore(abstract_of(state_at(0)))
    assert sorted(os.listdir(d)) == ["1", "2"]
    with pytest.raises(UserError, match="checkpoint step 2 in .* does not restore"):
        mgr.restore(abstract_of(state_at(0)), step=2)


def test_interrupted_save_tmp_dir_is_ignored(tmp_path):
    d = saved_dir(tmp_path, [1, 2])
    # what a save killed mid-write leaves: orbax's tmp dir, partly written, never renamed
    tmp = os.path.join(d, "3.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(d, "2"), tmp)
    _damage(d, "3.orbax-checkpoint-tmp", "truncated_arrays")
    reader = ckpt_lib.Checkpointer(d, fingerprint="fp0", read_only=True)
    assert reader.latest_step() == 2 and os.path.isdir(tmp)  # a reader leaves a trainer's tmp alone
    mgr = ckpt_lib.Checkpointer(d, keep=5, fingerprint="fp0")
    assert mgr.latest_step() == 2
    state, meta = mgr.restore(abstract_of(state_at(0)))
    assert meta["step"] == 2 and mgr.restored_step == 2
    assert mgr.save(3, state_at(3), {"step": 3})
    mgr.wait()
    assert mgr.all_steps() == [1, 2, 3] and not os.path.exists(tmp)
    assert_tree_equal(mgr.restore(abstract_of(state_at(0)))[0], state_at(3))


def test_different_fingerprint_is_refused(tmp_path):
    d = saved_dir(tmp_path, [1], fp="aaaa")
    mgr = ckpt_lib.Checkpointer(d, fingerprint="bbbb")
    want = f"checkpoints in {d} were written by a different config \\(fingerprint aaaa != bbbb\\); use a fresh"
    with pytest.raises(UserError, match=want):
        mgr.latest_step()
    with pytest.raises(UserError, match=want):
        mgr.restore(abstract_of(state_at(0)))
    with pytest.raises(UserError, match=want):  # a fresh start does not mix configs either
        mgr.save(2, state_at(2), {})
    assert os.listdir(d) == ["1"]


def test_mismatched_state_is_a_user_error(tmp_path):
    d = saved_dir(tmp_path, [1, 2])
    mgr = ckpt_lib.Checkpointer(d, fingerprint="fp0")
    wrong = state_at(0)
    wrong["params"]["w"] = jnp.zeros((4, 5))
    with pytest.raises(UserError, match=r"does not match .*\[params\]\[w\] saved \(4, 3\) float32, requested \(4, 5\)"):
        mgr.restore(abstract_of(wrong))
    extra = state_at(0)
    extra["params"]["new"] = jnp.zeros(2)
    del extra["step"]
    with pytest.raises(UserError, match=r"\[params\]\[new\] missing from the checkpoint.*\[step\] in the checkpoint"):
        mgr.restore(abstract_of(extra))
    wrong_dtype = state_at(0)
    wrong_dtype["step"] = jnp.float32(0)
    with pytest.raises(UserError, match=r"\[step\] saved \(\) int32, requested \(\) float32"):
        mgr.restore(abstract_of(wrong_dtype), step=1)
    assert sorted(os.listdir(d)) == ["1", "2"]  # a caller mistake sets nothing aside


# ----------------------------------------------------------------------------- meshes

def _xla_env(n):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu",
                PYTHONPATH=REPO, NLA_DIST_INIT_TIMEOUT="60")


def _records(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_restore_onto_other_meshes(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_checkpoint_mesh.py"), "single", str(tmp_path / "ck")],
                          env=_xla_env(8), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(proc.stdout)
    assert [r["mesh"] for r in recs] == [[8], [4, 2]]
    for r in recs:
        assert r["equal"] and r["shards_ok"] and r["sharding_ok"] and r["meta_ok"] and r["step"] == 3, r


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_restore_and_fall_back_together(tmp_path):
    d, port = str(tmp_path / "ck"), _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_checkpoint_mesh.py"), "multi", d,
                               f"127.0.0.1:{port}", "2", str(i)],
                              env=_xla_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    for i, (out, err) in enumerate(outs):
        restore, resaved = _records(out)
        assert restore["step"] == 1 and restore["process"] == i, restore
        assert restore["shards_ok"] and restore["sharding_ok"] and restore["meta_ok"], restore
        assert resaved["steps"] == [1, 2] and any(e.startswith("2.unreadable-") for e in resaved["entries"])
        assert "skipping checkpoint step 2" in err


# ----------------------------------------------------------------------------- lock

_TRY_LOCK = """
import sys
from nla_jax.checkpoint import WorkdirLock
from nla_jax.errors import UserError
try:
    lock = WorkdirLock(sys.argv[1]).acquire()
except UserError as e:
    print("refused:", e, flush=True); sys.exit(3)
print("locked", flush=True)
if len(sys.argv) > 2:
    sys.stdin.read()  # hold until killed
"""


def _try_lock(workdir, hold=False):
    args = [sys.executable, "-c", _TRY_LOCK, workdir] + (["hold"] if hold else [])
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    if hold:
        return subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)


def test_workdir_lock_refuses_a_second_trainer(tmp_path):
    workdir = str(tmp_path / "run")
    with ckpt_lib.WorkdirLock(workdir) as lock:
        assert lock.held and os.path.exists(os.path.join(workdir, ".lock"))
        other = _try_lock(workdir)
        assert other.returncode == 3, other.stdout + other.stderr
        assert f"refused: work directory {workdir} is in use by another trainer (pid {os.getpid()})" in other.stdout
    assert not lock.held
    ok = _try_lock(workdir)
    assert ok.returncode == 0 and "locked" in ok.stdout, ok.stdout + ok.stderr
    lock.acquire()
    lock.release()


def test_workdir_lock_dies_with_its_holder(tmp_path):
    workdir = str(tmp_path / "run")
    holder = _try_lock(workdir, hold=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"work directory {workdir} is in use by another trainer "
                                            f"\\(pid {holder.pid}\\)"):
            ckpt_lib.WorkdirLock(workdir).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    lock = ckpt_lib.WorkdirLock(workdir).acquire()  # kill -9 released it
    assert lock.held
    lock.release()
    # one lock file per process of a multi-process run: process 1 does not collide with process 0
    with ckpt_lib.WorkdirLock(workdir, process_index=0), ckpt_lib.WorkdirLock(workdir, process_index=1) as p1:
        assert p1.path.endswith(".lock.1")
