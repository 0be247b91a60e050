"""python -m nla_jax.train end to end on the tiny random model (byte tokenizer), as subprocesses.

Covers: all four stages finish with their DONE markers, metrics and eval.json, and a rerun skips
them without touching a checkpoint; kill -9 mid-stage (rl, sft_av) then resume gives the same
final parameters as an uninterrupted run, bit for bit; 2 processes x 2 CPU devices (gloo on
127.0.0.1) give the rl metrics and parameters of 1 process x 4 devices; bad settings are refused
with one `error:` line and exit 2 before anything is computed or written; a second trainer on a
busy work directory is refused while the first finishes unharmed.

The store (80 random-word documents, layer 0, teacher "quote") is built once per module.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
STAGES = ("sft_av", "sft_ar", "rl", "eval")
WORDS = ("the a cat dog river mountain city night music paper window quietly ran said because "
         "under over green old new bright small ancient people letter garden").split()

# RL on the random tiny model with the default closer "</e>" (4 byte tokens) never closes an
# explanation: every reward is fail_reward, every advantage 0, and neither AV nor AR moves, so
# comparing parameters would prove nothing. "8" is one byte token the model samples often at
# temperature 0.5: some rollouts close, rewards differ within groups, and both models update.
RL_LIVE = ("--config.av.closer=8", "--config.rl.temperature=0.5")
RL_ONLY = ("--stages", "rl", "--config.rl.init_from_sft=False", *RL_LIVE)
RL_KILL = (*RL_ONLY, "--config.rl.steps=6", "--config.train.ckpt_every=2")
SFT_AV_KILL = ("--stages", "sft_av", "--config.sft_av.steps=8", "--config.train.ckpt_every=2")
DESIGN_RL_METRICS = ("reward_mean", "reward_std", "nonzero_adv_groups", "kl", "entropy", "expl_len", "extract_fail",
                     "fve_nrm", "grad_norm_av", "grad_norm_ar", "logprob_gap")


# ----------------------------------------------------------------------------- helpers

def _env(devices=None, **extra):
    e = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", NLA_DIST_INIT_TIMEOUT="60",
             NLA_COMPILE_CACHE=os.environ.get("NLA_COMPILE_CACHE", os.path.join(REPO, "build", "jax_cache")))
    e.pop("XLA_FLAGS", None)
    if devices:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e.update(extra)
    return e


def _cmd(store, workdir, *extra):
    return [sys.executable, "-m", "nla_jax.train", "--config", TINY, f"--config.data.store={store}",
            f"--config.train.workdir={workdir}", *extra]


def _train(store, workdir, *extra, devices=None, timeout=300):
    return subprocess.run(_cmd(store, workdir, *extra), cwd=REPO, env=_env(devices), capture_output=True, text=True,
                          timeout=timeout)


def _popen(store, workdir, *extra, devices=None, **kw):
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(_cmd(store, workdir, *extra), cwd=REPO, env=_env(devices), text=True, **kw)


def _communicate_all(procs, timeout):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return outs


def _metric_lines(workdir):
    """Every record of metrics.jsonl in file order (duplicates of a step kept)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _records(workdir, stage, kind=None):
    """{step: record} of a stage, last write wins (what nla_jax.metrics.read keeps)."""
    return {r["step"]: r for r in _metric_lines(workdir) if r["stage"] == stage and r.get("kind") == kind}


def _steps(stage_dir):
    """Committed checkpoint steps of a stage directory."""
    if not os.path.isdir(stage_dir):
        return []
    return sorted(int(n) for n in os.listdir(stage_dir) if n.isdigit())


def _params(step_dir):
    """{path: numpy array} of a checkpoint step's state on this process's one device."""
    from nla_jax.checkpoint import read_step_arrays
    return read_step_arrays(step_dir)


def _assert_same_params(a_dir, b_dir, rtol=0.0, atol=0.0, only=None):
    """Every leaf of two checkpoint states equal (bitwise unless a tolerance is given); `only`:
    compare just the leaves whose path starts with one of these prefixes."""
    a, b = _params(a_dir), _params(b_dir)
    assert sorted(a) == sorted(b)
    assert any(k.startswith("['av']") or k.startswith("['ar']") for k in a), sorted(a)[:5]
    for k in a:
        if only is not None and not k.startswith(only):
            continue
        if rtol == 0 and atol == 0:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def _tree_digest(root):
    """{relative path: (size, mtime_ns, bytes)} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, fh.read())
    return out


def _one_error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- fixtures

def _corpus(path, n=80, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _build_store(tmp_path_factory.mktemp("train"))


def _build_store(tmp):
    """The tiny store of these tests in directory tmp (80 documents, layer 0, quote summaries, and the
    target's top 3 next tokens stored by extraction: what the eval stage's top-1 claim check reads)."""
    _corpus(tmp / "c.jsonl")
    root = str(tmp / "store")
    common = ["--config", TINY, f"--config.data.store={root}"]
    r = subprocess.run([sys.executable, "-m", "nla_jax.extract", *common,
                        f"--config.data.sources=[{{'kind':'jsonl','path':'{tmp / 'c.jsonl'}','name':'t'}}]",
                        "--config.data.max_len=128", "--config.data.min_position=16", "--config.data.k=4",
                        "--config.data.top_k=3",
                        "--config.data.splits=(('av_sft',0.3),('ar_sft',0.3),('rl',0.25),('eval',0.15))"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "nla_jax.summarize", *common, "--config.summarize.teacher=quote"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def e2e(store, tmp_path_factory):
    """All stages with the tiny defaults, then the same command again."""
    wd = str(tmp_path_factory.mktemp("e2e") / "w")
    first = _train(store, wd)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {s: _tree_digest(os.path.join(wd, s)) for s in STAGES[:3]}
    metrics_before = _metric_lines(wd)
    second = _train(store, wd)
    after = {s: _tree_digest(os.path.join(wd, s)) for s in STAGES[:3]}
    return dict(wd=wd, first=first, second=second, before=before, after=after, metrics_before=metrics_before)


@pytest.fixture(scope="module")
def rl_reference(store, tmp_path_factory):
    """An uninterrupted 6-step rl run; while it holds its work directory a second trainer is started
    on the same directory (test_second_trainer_is_refused reads how both ended)."""
    from nla_jax.checkpoint import WorkdirLock
    wd = str(tmp_path_factory.mktemp("rl_ref") / "w")
    first = _popen(store, wd, *RL_KILL)
    lock_file = WorkdirLock(wd, process_index=0).path
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        try:
            with open(lock_file) as f:
                if f.read().split()[:1] == [str(first.pid)]:
                    break
        except OSError:
            pass
        time.sleep(0.05)
    assert first.poll() is None, "the first trainer ended before the second could start"
    second = _train(store, wd, *RL_KILL)
    still_running = first.poll() is None
    _, err = first.communicate(timeout=300)
    return dict(wd=wd, first_rc=first.returncode, first_err=err, first_pid=first.pid, second=second,
                overlapped=still_running)


# ----------------------------------------------------------------------------- 1. end to end

def _claims_from_rows(workdir, store, out):
    """benchmarks/claims_from_rows.py on a work directory's saved rows, against STORE, writing OUT."""
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "claims_from_rows.py"), workdir,
                           "--config", TINY, f"--config.data.store={store}", "--out", str(out)],
                          cwd=REPO, env=_env(None), capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(600)
def test_claims_recomputed_from_saved_rows_equal_the_eval_stage(e2e, store, tmp_path):
    """benchmarks/claims_from_rows.py reads the saved explanations (eval_rows.jsonl) against the store
    with the tokenizer alone: with the same definitions it must reproduce the eval stage's claims."""
    out = tmp_path / "claims.json"
    r = _claims_from_rows(e2e["wd"], store, out)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())["checkpoints"]
    with open(os.path.join(e2e["wd"], "eval.json")) as f:
        ev = json.load(f)["checkpoints"]
    assert set(got) == set(ev) == {"after_sft", "after_rl"}
    for name in ev:
        assert "names_top1_prediction" in ev[name]
        for k in ("names_current_token", "current_token_exact", "states_preceding", "preceding_correct",
                  "quotes_absent", "names_top1_prediction", "repeats_prediction", "prediction_spread"):
            assert got[name][k if k != "names_current_token" else "current_token_named"] == ev[name][k], (name, k)
        # by the target's confidence: the bins partition the rows, their shares average to the whole
        bins = got[name]["names_top1_by_confidence"]
        assert sum(b["rows"] for b in bins) == ev[name]["names_top1_prediction"]["n"]
        assert sum(b["rows"] * (b["names_top1"]["mean"] or 0.0) for b in bins) / sum(b["rows"] for b in bins) == \
            pytest.approx(ev[name]["names_top1_prediction"]["mean"])
    # the rows' warm-start text beside them where the store's summaries cover the rows (here: none of the
    # eval rows, then a copy of the store given known texts for them, one of three repeating a prediction)
    assert json.loads(out.read_text())["teacher_text"] is None
    import shutil
    copy = tmp_path / "store_copy"
    shutil.copytree(store, copy)
    rows = [json.loads(line)["row"] for line in open(os.path.join(e2e["wd"], "eval_rows.jsonl"))]
    with open(copy / "summaries.jsonl", "a") as f:
        for i, row in enumerate(rows):
            nxt = "«a» 50%, «a» 20%" if i % 3 == 0 else "«a» 50%, «b» 20%"
            f.write(json.dumps({"row": row, "text": f"Token «zz». Next: {nxt}."}) + "\n")
    out2 = tmp_path / "claims2.json"
    r = _claims_from_rows(e2e["wd"], copy, out2)
    assert r.returncode == 0, r.stderr[-3000:]
    teacher = json.loads(out2.read_text())["teacher_text"]
    assert teacher["rows"] == len(rows) and "teacher text" in r.stdout
    assert teacher["repeats_prediction"]["mean"] == pytest.approx(len(rows[::3]) / len(rows))
    assert json.loads(out2.read_text())["checkpoints"] == got          # the checkpoints' claims unchanged
    # another store's rows: one line, nothing written
    other = tmp_path / "other.json"
    r = _claims_from_rows(e2e["wd"], f"{tmp_path}/none", other)
    assert r.returncode == 2 and not other.exists() and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_all_stages_finish_with_metrics_and_eval(e2e):
    wd = e2e["wd"]
    for s in STAGES[:3]:
        assert os.path.exists(os.path.join(wd, s, "DONE")), s
        assert _steps(os.path.join(wd, s)), s
    assert _steps(os.path.join(wd, "sft_av"))[-1] == 4 and _steps(os.path.join(wd, "rl"))[-1] == 3
    av = _records(wd, "sft_av", "eval")
    assert av and all(np.isfinite(rec[k]) for rec in av.values() for k in ("ce_real", "ce_shuffled")), av
    assert 4 in av
    ar = _records(wd, "sft_ar", "eval")
    assert ar and all(np.isfinite(rec[k]) for rec in ar.values() for k in ("fve_nrm", "floor")), ar
    assert {0, 4} <= set(ar)
    rl = _records(wd, "rl")
    assert sorted(rl) == [1, 2, 3]
    for rec in rl.values():
        missing = [k for k in DESIGN_RL_METRICS if k not in rec]
        assert not missing, missing
        assert all(np.isfinite(rec[k]) for k in DESIGN_RL_METRICS), rec
    with open(os.path.join(wd, "eval.json")) as f:
        ev = json.load(f)
    assert {"mean", "lo", "hi"} <= set(ev["floor"])
    assert set(ev["checkpoints"]) == {"after_sft", "after_rl"}
    for c in ev["checkpoints"].values():
        assert 0 <= c["names_current_token"]["mean"] <= 1 and "quotes_absent" in c
        # the store holds the target's predictions (data.top_k): its top-1 is looked for
        assert 0 <= c["names_top1_prediction"]["mean"] <= 1
        for k in ("real", "shuffled", "real_minus_shuffled", "real_minus_floor", "judge_real",
                  "judge_real_minus_shuffled"):
            assert c[k]["lo"] <= c[k]["mean"] <= c[k]["hi"], (k, c[k])
    # the fixed judge is the SFT AR: for the SFT pair it is the pair's own reader, so the numbers agree
    sft, rl = ev["checkpoints"]["after_sft"], ev["checkpoints"]["after_rl"]
    assert ev["judge"] == "sft_ar" and sft["judge_real"]["mean"] == pytest.approx(sft["real"]["mean"], abs=1e-6)
    # the paired RL - SFT differences are the differences of the per-pair means (same rows)
    d = ev["rl_minus_sft"]
    assert d["own"]["mean"] == pytest.approx(rl["real"]["mean"] - sft["real"]["mean"], abs=1e-9)
    assert d["judge"]["mean"] == pytest.approx(rl["judge_real"]["mean"] - sft["judge_real"]["mean"], abs=1e-9)
    # KL of the RL AV to the SFT AV along its own explanations; none for the SFT pair (it is the reference)
    assert rl["kl_to_ref_per_token"]["mean"] >= 0 and "kl_to_ref_per_token" not in sft
    # eval_rows.jsonl: the rows behind every mean above, one record per row (paired analyses start here)
    with open(os.path.join(wd, "eval_rows.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert len(recs) == ev["rows"] and len({r["doc_id"] for r in recs}) == ev["documents"]
    for name, c in ev["checkpoints"].items():
        col = lambda k: np.array([r["checkpoints"][name][k] for r in recs], np.float64)
        for k, key in (("fve", "real"), ("fve_shuffled", "shuffled"), ("fve_judge", "judge_real")):
            assert col(k).mean() == pytest.approx(c[key]["mean"], abs=1e-9), (name, k)
        assert (col("fve") - col("fve_floor")).mean() == pytest.approx(c["real_minus_floor"]["mean"], abs=1e-9)
        assert col("names_top1").mean() == pytest.approx(c["names_top1_prediction"]["mean"])
        named = [r["checkpoints"][name]["current_token"] for r in recs]
        assert np.mean([m is not None for m in named]) == pytest.approx(c["names_current_token"]["mean"])
        assert 1 - np.mean([r["checkpoints"][name]["ok"] for r in recs]) == pytest.approx(c["extract_fail"])
        pre = [r["checkpoints"][name]["preceding"] for r in recs]
        assert np.mean([p is not None for p in pre]) == pytest.approx(c["states_preceding"]["mean"])
        if any(p is not None for p in pre):
            assert pre.count(True) / sum(p is not None for p in pre) == pytest.approx(c["preceding_correct"]["mean"])
        else:
            assert c["preceding_correct"]["mean"] is None
    assert _records(wd, "eval", "eval")
    assert "names the top-1 next token" in e2e["first"].stdout + e2e["first"].stderr


@pytest.mark.timeout(600)
def test_rerun_skips_finished_stages_and_changes_no_checkpoint(e2e):
    r = e2e["second"]
    assert r.returncode == 0, r.stderr[-3000:]
    for s in STAGES[:3]:
        assert f"{s}: finished earlier, skipped" in r.stderr, r.stderr[-3000:]
    assert e2e["after"] == e2e["before"]
    # no training record was written again (only the eval stage, which always runs, adds one)
    new = _metric_lines(e2e["wd"])[len(e2e["metrics_before"]):]
    assert {rec["stage"] for rec in new} == {"eval"}, new


# ----------------------------------------------------------------------------- 2. kill -9 and resume

def _kill_mid_stage(store, wd, stage, args, seed):
    """Start a run, kill -9 it once a checkpoint step is committed; returns the committed steps."""
    p = _popen(store, wd, *args)
    d = os.path.join(wd, stage)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and p.poll() is None and not _steps(d):
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, 0.2))
    finally:
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"the run ended on its own before the kill: {err[-2000:]}"
    assert not os.path.exists(os.path.join(d, "DONE"))
    steps = _steps(d)
    assert steps, "killed before any checkpoint"
    return steps


def _kill_resume_compare(store, tmp_path, ref_wd, stage, args, final, seed):
    wd = str(tmp_path / "killed")
    committed = _kill_mid_stage(store, wd, stage, args, seed)
    n_before = len(_metric_lines(wd))
    r = _train(store, wd, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(wd, stage, "DONE"))
    # it resumed from the newest step committed before the kill, not from scratch
    resumed = [rec["step"] for rec in _metric_lines(wd)[n_before:] if rec["stage"] == stage and rec.get("kind") is None]
    assert resumed and resumed[0] - 1 == max(committed) < final, (committed, resumed)
    assert resumed == list(range(resumed[0], final + 1))
    _assert_same_params(os.path.join(ref_wd, stage, str(final)), os.path.join(wd, stage, str(final)))
    # the training (and validation) records equal the uninterrupted run's, bit for bit
    ref, got = _records(ref_wd, stage), _records(wd, stage)
    assert sorted(got) == sorted(ref) == list(range(1, final + 1))
    assert any(r.get("grad_norm", r.get("grad_norm_av", 0)) > 0 for r in ref.values())
    ref_ev, got_ev = _records(ref_wd, stage, "eval"), _records(wd, stage, "eval")
    assert sorted(got_ev) == sorted(ref_ev)
    for want, have in ((ref, got), (ref_ev, got_ev)):
        for s in want:
            a = {k: v for k, v in want[s].items() if k != "time"}
            b = {k: v for k, v in have[s].items() if k != "time"}
            assert a == b, (s, a, b)


@pytest.mark.timeout(600)
def test_kill9_rl_then_resume_equals_uninterrupted(store, rl_reference, tmp_path):
    ref = rl_reference
    assert ref["first_rc"] == 0, ref["first_err"][-3000:]
    recs = _records(ref["wd"], "rl")
    # the parameters really move (else equality would be vacuous)
    assert any(r["nonzero_adv_groups"] > 0 and r["grad_norm_av"] > 0 and r["grad_norm_ar"] > 0 for r in recs.values())
    a, b = _params(os.path.join(ref["wd"], "rl", "4")), _params(os.path.join(ref["wd"], "rl", "6"))
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.startswith("['av']['model']"))
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.startswith("['ar']"))
    _kill_resume_compare(store, tmp_path, ref["wd"], "rl", RL_KILL, 6, seed=1)


@pytest.mark.timeout(600)
def test_kill9_sft_av_then_resume_equals_uninterrupted(store, tmp_path):
    ref_wd = str(tmp_path / "ref")
    r = _train(store, ref_wd, *SFT_AV_KILL)
    assert r.returncode == 0, r.stderr[-3000:]
    _kill_resume_compare(store, tmp_path, ref_wd, "sft_av", SFT_AV_KILL, 8, seed=2)


@pytest.mark.timeout(300)
def test_keep_every_keeps_part_way_checkpoints(store, tmp_path):
    """train.keep_every=4 with keep=1 and checkpoints every 2 steps: step 4 survives beside the newest."""
    wd = str(tmp_path / "w")
    r = _train(store, wd, "--stages", "sft_av", "--config.sft_av.steps=6", "--config.train.ckpt_every=2",
               "--config.train.keep=1", "--config.train.keep_every=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(int(n) for n in os.listdir(os.path.join(wd, "sft_av")) if n.isdigit()) == [4, 6]


# ----------------------------------------------------------------------------- 3. processes x devices

RL_MESH = (*RL_ONLY, "--config.rl.steps=3", "--config.rl.batch=4", "--config.mesh.shape=(4,1,1)")


@pytest.mark.timeout(600)
def test_two_processes_match_one_process_on_four_devices(store, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    port = _free_port()
    procs = [_popen(store, two, *RL_MESH, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                    "--process-id", str(i), devices=2) for i in range(2)]
    outs = _communicate_all(procs, timeout=400)
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    r = _train(store, one, *RL_MESH, devices=4)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_rl_run(one, two)


def _assert_same_rl_run(one, two):
    """The RL_MESH run in work directory `two` (2 processes x 2 devices) has the metrics and final
    parameters of the one in `one` (1 process x 4 devices), up to the all-reduce's float32 rounding."""
    a, b = _records(one, "rl"), _records(two, "rl")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    # metrics are written once (process 0), not once per process
    assert len([x for x in _metric_lines(two) if x["stage"] == "rl"]) == 3
    # Same mesh, same program, same global batches and keys: the same rollouts (the discrete metrics
    # are equal). What differs is how the gradient all-reduce associates the per-device partial sums
    # (in-process over 4 devices vs. 2 local + gloo across processes), i.e. float32 rounding: the
    # first step is bitwise equal, later ones differ in the last bits. rtol 1e-5 covers that for
    # O(1) metrics; av_loss (advantage-weighted ratios that cancel to ~1e-6), kl (~1e-5, from log-prob
    # differences) and logprob_gap (itself rounding noise, ~1e-6) get an absolute 1e-6 instead.
    discrete = ("nonzero_adv_groups", "extract_fail", "expl_len", "sampled_len", "skipped", "finite")
    for s in a:
        assert set(a[s]) == set(b[s])
        for k in a[s]:
            if k in ("stage", "time"):
                continue
            if k in discrete:
                assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k])
            else:
                atol = 1e-6 if k in ("av_loss", "kl", "logprob_gap") else 0.0
                np.testing.assert_allclose(b[s][k], a[s][k], rtol=1e-5, atol=atol, err_msg=f"step {s} {k}")
    assert any(a[s]["grad_norm_av"] > 0 and a[s]["nonzero_adv_groups"] > 0 for s in a)
    assert _steps(os.path.join(one, "rl")) == _steps(os.path.join(two, "rl")) == [2, 3]
    # Parameters: the rounding above moves a few dozen weights by 1-2 float32 ulps (<= 9e-8 on
    # weights of size ~0.5). rtol 1e-6 / atol 1e-7 allows that and stays 50x below one AV update
    # (lr 5e-6), so a missed or doubled step, or another batch, would not pass.
    _assert_same_params(os.path.join(one, "rl", "3"), os.path.join(two, "rl", "3"), rtol=1e-6, atol=1e-7,
                        only=("['av']", "['ar']", "['step']", "['skipped']", "['streak']"))


# ----------------------------------------------------------------------------- 4. bad configs

@pytest.mark.timeout(300)
@pytest.mark.parametrize("args,needle", [
    (("--config.rl.group_size=1",), "rl.group_size=1"),
    (("--config.av.max_len=600",), "av.max_len=600"),
    (("--stages", "sft_av,warmup"), "unknown stage 'warmup'"),
    (("--config.model.layer=1",), "holds layer 0"),
    (("--stages", "rl"), "needs the finished sft_av stage"),
], ids=["group_size_1", "av_max_len_over_context", "unknown_stage", "store_of_other_layer", "rl_without_sft"])
def test_bad_config_refused_before_any_compute(store, tmp_path, args, needle):
    wd = str(tmp_path / "w")
    r = _train(store, wd, *args, timeout=120)
    line = _one_error_line(r)
    assert needle in line, line
    assert not os.path.exists(wd), os.listdir(wd)  # nothing set up, computed or written


# ----------------------------------------------------------------------------- 5. one trainer per work directory

@pytest.mark.timeout(600)
def test_second_trainer_is_refused_and_first_finishes(rl_reference):
    ref = rl_reference
    assert ref["overlapped"], "the first trainer finished before the second was refused: nothing was tested"
    line = _one_error_line(ref["second"])
    assert f"is in use by another trainer (pid {ref['first_pid']})" in line, line
    assert ref["first_rc"] == 0, ref["first_err"][-3000:]
    wd = ref["wd"]
    assert os.path.exists(os.path.join(wd, "rl", "DONE")) and _steps(os.path.join(wd, "rl")) == [4, 6]
    lines = [r for r in _metric_lines(wd) if r["stage"] == "rl"]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
