"""Helpers of the fault suite: run the real CLIs as subprocesses (the user's view), kill them at
named moments (nla_jax/faults.py), and compare what they leave with an uninterrupted run.

Training settings of the suite (FAULT_TRAIN): the tiny model, sft_av / sft_ar / rl 6 steps each,
a checkpoint every 2 steps, async checkpoints (the default of real configs, so a kill can land
while a step is being written), and RL settings under which rollouts differ within groups so both
models really move (see tests/test_train.py RL_LIVE).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.py")
TRAIN_STAGES = ("sft_av", "sft_ar", "rl")
STEPS = 6
WORDS = ("the a cat dog river mountain city night music paper window quietly ran said because "
         "under over green old new bright small ancient people letter garden").split()

RL_LIVE = ("--config.av.closer=8", "--config.rl.temperature=0.5")
FAULT_TRAIN = ("--stages", ",".join(TRAIN_STAGES), f"--config.sft_av.steps={STEPS}", f"--config.sft_ar.steps={STEPS}",
               f"--config.rl.steps={STEPS}", "--config.train.ckpt_every=2", "--config.train.async_checkpoint=True",
               *RL_LIVE)
# extraction: 80 documents x 4 positions, 8 documents a batch -> 10 commits of 32 rows; 32-row chunks
EXTRACT_ARGS = ("--config.data.max_len=128", "--config.data.min_position=16", "--config.data.k=4",
                "--config.data.chunk_rows=32",
                "--config.data.splits=(('av_sft',0.3),('ar_sft',0.3),('rl',0.25),('eval',0.15))")


# ----------------------------------------------------------------------------- processes

def env(faults: str | None = None, devices: int | None = None) -> dict:
    e = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", NLA_DIST_INIT_TIMEOUT="60",
             NLA_COMPILE_CACHE=os.environ.get("NLA_COMPILE_CACHE", os.path.join(REPO, "build", "jax_cache")))
    for k in ("XLA_FLAGS", "NLA_FAULTS", "NLA_TRACEBACK"):
        e.pop(k, None)
    if devices:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if faults:
        e["NLA_FAULTS"] = faults
    return e


def train_cmd(store: str, workdir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nla_jax.train", "--config", TINY, f"--config.data.store={store}",
            f"--config.train.workdir={workdir}", *extra]


def extract_cmd(store: str, corpus: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nla_jax.extract", "--config", TINY, f"--config.data.store={store}",
            f"--config.data.sources=[{{'kind':'jsonl','path':'{corpus}','name':'t'}}]", *EXTRACT_ARGS, *extra]


def run(cmd: list[str], faults: str | None = None, timeout: int = 300, devices: int | None = None):
    return subprocess.run(cmd, cwd=REPO, env=env(faults, devices), capture_output=True, text=True, timeout=timeout)


def popen(cmd: list[str], faults: str | None = None, **kw) -> subprocess.Popen:
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(cmd, cwd=REPO, env=env(faults), text=True, **kw)


def ok(r) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr[-4000:]}"


def killed(r) -> None:
    """The fault rule fired: the process died of SIGKILL (not of an error, not by finishing)."""
    assert r.returncode == -signal.SIGKILL, f"expected kill -9, got exit {r.returncode}\n{r.stderr[-4000:]}"


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]


def error_line(r, alone: bool = True) -> str:
    """The run failed as a user error should: exit 2, no traceback, exactly one `error:` line, and
    it is the last thing printed (alone=True: the only thing printed, e.g. before any compute)."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    lines = _lines(r.stderr)
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith("error: ") and lines[-1] == errors[0], r.stderr[-4000:]
    if alone:
        assert lines == errors, r.stderr[-4000:]
    return errors[0]


def wait_for(cond, what: str, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}: "
                                 f"{(proc.stderr.read() if proc.stderr else '')[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- corpus, store

def write_corpus(path: str, n: int = 80, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")


def ledger(store: str, part: int = 0) -> dict:
    try:
        with open(os.path.join(store, f"part-{part:05d}", "ledger.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def committed_rows(store: str) -> int:
    return int(ledger(store).get("committed", 0))


def store_arrays(store: str) -> dict[str, np.ndarray]:
    from nla_jax.data import store as store_lib
    s = store_lib.open_store(store)
    return s.read(None, np.arange(s.num_rows))


def assert_same_store(ref: str, got: str) -> None:
    """Every row of every array bitwise, and manifest, ledgers and statistics equal."""
    a, b = store_arrays(ref), store_arrays(got)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"array {k} differs"
    for name in ("manifest.json", "part-00000/ledger.json"):
        with open(os.path.join(ref, name)) as f1, open(os.path.join(got, name)) as f2:
            assert json.load(f1) == json.load(f2), name
    with open(os.path.join(ref, "stats.npz"), "rb") as f1, open(os.path.join(got, "stats.npz"), "rb") as f2:
        assert f1.read() == f2.read()


def copy_store(src: str, dst: str) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ----------------------------------------------------------------------------- checkpoints, metrics

def steps_of(stage_dir: str) -> list[int]:
    """Committed checkpoint steps of a stage directory."""
    if not os.path.isdir(stage_dir):
        return []
    return sorted(int(n) for n in os.listdir(stage_dir) if n.isdigit())


def tmp_dirs(stage_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(stage_dir) if "orbax-checkpoint-tmp" in n) if os.path.isdir(stage_dir) else []


def params(step_dir: str) -> dict[str, np.ndarray]:
    """{path: array} of a checkpoint step's state, read with plain orbax onto one CPU device."""
    from nla_jax.checkpoint import read_step_arrays
    return read_step_arrays(step_dir)


def assert_same_params(ref_step_dir: str, got_step_dir: str) -> None:
    """Every leaf (params, optimizer state, counters) of two checkpoint steps bitwise equal."""
    a, b = params(ref_step_dir), params(got_step_dir)
    assert sorted(a) == sorted(b)
    assert any(k.startswith(("['av']", "['ar']")) for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs (max |diff| {np.abs(a[k] - b[k]).max()})"


def metric_lines(workdir: str, strict: bool = True) -> list[dict]:
    """Every line of metrics.jsonl. strict: every line must parse (a torn line fails the test);
    else a torn last line (what a kill mid-write leaves) is left out."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    elif not strict:
        lines.pop()  # no newline at the end: torn
    return [json.loads(line) for line in lines]


def records(workdir: str, stages=TRAIN_STAGES) -> dict[tuple, dict]:
    """{(stage, step, kind): record without its time}, last write wins (what metrics.read keeps)."""
    out = {}
    for r in metric_lines(workdir):
        if r["stage"] in stages:
            out[(r["stage"], r["step"], r.get("kind"))] = {k: v for k, v in r.items() if k != "time"}
    return out


def assert_same_records(ref_wd: str, wd: str, stages=TRAIN_STAGES) -> None:
    a, b = records(ref_wd, stages), records(wd, stages)
    assert sorted(a, key=str) == sorted(b, key=str), (sorted(set(a) ^ set(b), key=str))
    for k in a:
        assert json.dumps(a[k], sort_keys=True) == json.dumps(b[k], sort_keys=True), (k, a[k], b[k])


def train_steps_logged(lines: list[dict], stage: str) -> list[int]:
    return [r["step"] for r in lines if r["stage"] == stage and r.get("kind") is None]


def assert_same_as_reference(ref_wd: str, wd: str, stages=TRAIN_STAGES) -> None:
    for s in stages:
        assert os.path.exists(os.path.join(wd, s, "DONE")), s
        assert_same_params(os.path.join(ref_wd, s, str(STEPS)), os.path.join(wd, s, str(STEPS)))
    assert_same_records(ref_wd, wd, stages)


def tree_digest(root: str, skip=(".lock",)) -> dict:
    """{relative path: (size, mtime_ns, bytes)} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f in skip:
                continue
            p = os.path.join(d, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, fh.read())
    return out


def copy_stages(ref_wd: str, wd: str, stages) -> str:
    os.makedirs(wd, exist_ok=True)
    for s in stages:
        shutil.copytree(os.path.join(ref_wd, s), os.path.join(wd, s))
    lines = [r for r in metric_lines(ref_wd) if r["stage"] in stages]
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    return wd
