"""python -m nla_jax.extract end to end on the real SmolLM2 with a small corpus.

Covers: stored rows equal a direct model call (activations and, with data.top_k, the target's top
next tokens); kill -9 mid-run then rerun equals a clean run bit for bit and verifies; two processes
on 127.0.0.1 (jax.distributed, gloo) give the same rows as one; a store made by another layer or
another data.top_k is refused; verify reports corruption; the warm start written from the stored
predictions equals the one a second forward pass writes.
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
WORDS = ("the a cat dog river mountain city night music paper window quietly ran said because "
         "under over green old new bright small ancient people letter garden").split()


def _corpus(path, n=24, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 60)))
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")


def _args(tmp_path, store, *extra):
    return ["--config", os.path.join(REPO, "configs", "smollm2_135m.py"),
            f"--config.data.store={store}",
            f"--config.data.sources=[{{'kind':'jsonl','path':'{tmp_path / 'c.jsonl'}','name':'t'}}]",
            "--config.data.max_len=64", "--config.data.min_position=8", "--config.data.k=3",
            "--config.data.batch=4", "--config.data.seq_multiple=32", "--config.data.chunk_rows=8",
            *extra]


def _run(args, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=REPO, NLA_COMPILE_CACHE=os.path.join(REPO, "build", "jax_cache"))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "nla_jax.extract", *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=600, **kw)


def _all_rows(store):
    from nla_jax.data import store as store_lib
    s = store_lib.open_store(store)
    return s.read(None, np.arange(s.num_rows)), s


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    _corpus(tmp / "c.jsonl")
    store = str(tmp / "clean")
    r = _run(_args(tmp, store))
    assert r.returncode == 0, r.stderr
    return tmp, store


def test_rows_equal_direct_model_call(clean_store, real):
    import jax.numpy as jnp
    from nla_jax.models import transformer as T
    tmp, store = clean_store
    rows, s = _all_rows(store)
    assert s.num_rows > 30 and s.manifest["meta"]["layer"] == 20
    assert (rows["position"] >= 8).all()
    for i in [0, s.num_rows // 2, s.num_rows - 1]:
        p = int(rows["position"][i])
        ctx = rows["tokens"][i][:p + 1]
        assert (rows["tokens"][i][p + 1:] == -1).all() and (ctx >= 0).all()
        out = T.forward(real.params, jnp.asarray(ctx[None]), real.cfg, capture_layer=20)
        np.testing.assert_allclose(rows["acts"][i], np.asarray(out["hidden"][0, p]), rtol=2e-4, atol=2e-3)
        # the config stores the target's 5 most likely next tokens from the same pass (data.top_k=5)
        lp = np.asarray(out["logits"][0, p], np.float64)
        lp = lp - lp.max() - np.log(np.exp(lp - lp.max()).sum())
        top = np.argsort(-lp)[:5]
        np.testing.assert_array_equal(rows["top_ids"][i], top)
        np.testing.assert_allclose(rows["top_probs"][i], np.exp(lp[top]), rtol=1e-4, atol=1e-6)
    assert s.top_k == 5 and s.manifest["meta"]["top_k"] == 5


def test_rerun_is_noop_and_verify_ok(clean_store):
    tmp, store = clean_store
    before, _ = _all_rows(store)
    r = _run(_args(tmp, store))
    assert r.returncode == 0, r.stderr
    after, _ = _all_rows(store)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    v = _run(_args(tmp, store, "--verify"))
    assert v.returncode == 0 and "OK" in v.stdout, v.stdout + v.stderr


def test_kill9_then_resume_equals_clean_run(clean_store):
    tmp, clean = clean_store
    store = str(tmp / "killed")
    e = dict(os.environ, PYTHONPATH=REPO, NLA_COMPILE_CACHE=os.path.join(REPO, "build", "jax_cache"))
    p = subprocess.Popen([sys.executable, "-m", "nla_jax.extract", *_args(tmp, store)], cwd=REPO, env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = os.path.join(store, "part-00000", "ledger.json")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        try:
            if json.load(open(ledger))["committed"] > 0:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    time.sleep(random.Random(1).uniform(0.0, 0.3))
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(store, "manifest.json")) or p.returncode == 0
    r = _run(_args(tmp, store))
    assert r.returncode == 0, r.stderr
    a, _ = _all_rows(clean)
    b, _ = _all_rows(store)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert _run(_args(tmp, store, "--verify")).returncode == 0


def test_other_layer_refused_and_untouched(clean_store):
    tmp, store = clean_store
    before, _ = _all_rows(store)
    r = _run(_args(tmp, store, "--config.model.layer=10"))
    assert r.returncode == 2 and "another model/layer" in r.stderr and "Traceback" not in r.stderr
    after, _ = _all_rows(store)
    np.testing.assert_array_equal(before["acts"], after["acts"])


def test_verify_names_a_flipped_byte(clean_store, tmp_path):
    import shutil
    tmp, store = clean_store
    bad = str(tmp_path / "bad")
    shutil.copytree(store, bad)
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(bad, "part-00000", "acts"))
                   for f in fs if "zarr.json" not in f)
    with open(files[0], "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    v = _run(_args(tmp, bad, "--verify"))
    assert v.returncode == 1 and "acts" in v.stdout, v.stdout + v.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_same_rows_as_one(clean_store):
    tmp, clean = clean_store
    store = str(tmp / "two")
    port = _free_port()
    e = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", NLA_DIST_INIT_TIMEOUT="60",
             NLA_COMPILE_CACHE=os.path.join(REPO, "build", "jax_cache"))
    procs = [subprocess.Popen([sys.executable, "-m", "nla_jax.extract", *_args(tmp, store),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=400))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    a, sa = _all_rows(clean)
    b, sb = _all_rows(store)
    assert len(sb.manifest["parts"]) == 2 and sb.num_rows == sa.num_rows
    key = lambda r: np.lexsort((r["position"], r["doc_id"]))
    ia, ib = key(a), key(b)
    for k in ("doc_id", "position", "split", "tokens"):
        np.testing.assert_array_equal(a[k][ia], b[k][ib], err_msg=k)
    # Different batch-mates change padded lengths, hence XLA's blocking: equal up to float error.
    np.testing.assert_allclose(a["acts"][ia], b["acts"][ib], rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(a["top_ids"][ia], b["top_ids"][ib])
    np.testing.assert_allclose(a["top_probs"][ia], b["top_probs"][ib], rtol=1e-4, atol=1e-6)
    assert sa.manifest["splits"].keys() == sb.manifest["splits"].keys()


def test_other_batch_layout_refused_and_untouched(clean_store):
    """A part's documents depend on the batch layout (data.batch, mesh, processes): resuming under
    another one would write the wrong documents, so it is one line and nothing changes."""
    tmp, store = clean_store
    before, _ = _all_rows(store)
    r = _run(_args(tmp, store, "--config.data.batch=8"))
    assert r.returncode == 2 and "batch layout" in r.stderr and "data.batch" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    after, _ = _all_rows(store)
    np.testing.assert_array_equal(before["acts"], after["acts"])


def test_other_top_k_refused_and_untouched(clean_store):
    """The store holds 5 predictions per row; resuming with data.top_k=0 is one line, nothing changes."""
    tmp, store = clean_store
    before, _ = _all_rows(store)
    r = _run(_args(tmp, store, "--config.data.top_k=0"))
    assert r.returncode == 2 and "stores 5 next-token predictions per row, this run 0" in r.stderr, r.stderr
    assert "data.top_k must stay" in r.stderr and "Traceback" not in r.stderr
    after, _ = _all_rows(store)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def _summaries(store):
    e = dict(os.environ, PYTHONPATH=REPO, NLA_COMPILE_CACHE=os.path.join(REPO, "build", "jax_cache"))
    r = subprocess.run([sys.executable, "-m", "nla_jax.summarize", "--config",
                        os.path.join(REPO, "configs", "smollm2_135m.py"), f"--config.data.store={store}"],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(store, "summaries.jsonl")) as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda x: x["row"]), r.stderr


def test_stored_predictions_write_the_warm_start_a_second_pass_writes(clean_store):
    """The default warm start (summarize.teacher="predict") from extraction's stored predictions, with
    no model loaded, equals the texts a second forward pass writes over a store extracted without them
    (data.top_k=0: the same rows, its own fingerprint)."""
    import shutil
    tmp, clean = clean_store
    bare = str(tmp / "bare")
    r = _run(_args(tmp, bare, "--config.data.top_k=0"))
    assert r.returncode == 0, r.stderr
    a, sa = _all_rows(clean)
    b, sb = _all_rows(bare)
    assert sb.top_k == 0 and set(b) == {"acts", "doc_id", "position", "split", "tokens"}
    assert "top_k" not in sb.manifest["meta"] and sb.manifest["meta"]["fingerprint"] != sa.manifest["meta"]["fingerprint"]
    for k in ("doc_id", "position", "split", "tokens"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_allclose(a["acts"], b["acts"], rtol=1e-5, atol=1e-5)   # the same blocks 0..K, another program
    stored_dir = str(tmp / "stored")
    shutil.copytree(clean, stored_dir)
    stored, err_stored = _summaries(stored_dir)
    second, err_second = _summaries(bare)
    assert "running the target over the rows" in err_second and "running the target" not in err_stored
    assert len(stored) == len(second) > 10
    for x, y in zip(stored, second):
        assert {k: x[k] for k in ("row", "doc_id", "position", "top_ids", "text")} == \
            {k: y[k] for k in ("row", "doc_id", "position", "top_ids", "text")}
        np.testing.assert_allclose(x["top_probs"], y["top_probs"], rtol=1e-4, atol=2e-6)
