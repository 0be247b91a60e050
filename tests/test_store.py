"""Activation store: round trips, crash/kill -9 resume bit-identity, refusals, verify, manifest stats.

Row data is a pure function of the global row index (`make_rows`), so a resumed run can be
compared bit for bit with a clean one.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from nla_jax.data import store
from nla_jax.data.store import PartWriter, finalize_manifest, open_store, verify
from nla_jax.errors import UserError

D, CTX, SPLITS = 16, 12, ["av_sft", "ar_sft", "rl", "eval"]
META = {"fingerprint": "model-x/L3/abc", "split_names": SPLITS, "model": "tiny", "layer": 3}
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def make_rows(idx: np.ndarray, d: int = D, ctx_len: int = CTX) -> dict[str, np.ndarray]:
    """Deterministic rows for global indices idx [n]; acts have a per-split mean offset."""
    idx = np.asarray(idx, np.int64)
    split = ((idx * 2654435761) >> 7) % len(SPLITS)
    f = idx[:, None].astype(np.float64)
    acts = (np.sin(f * 0.731 + np.arange(d) * 1.37) * (1.0 + idx % 5)[:, None]
            + 0.8 * np.cos(np.arange(d) * (1 + split[:, None])))
    position = (idx * 7 + 3) % ctx_len
    col = np.arange(ctx_len)[None, :]
    tokens = np.where(col <= position[:, None], (idx[:, None] * 31 + col) % 1000, -1)
    return {"acts": acts.astype(np.float32), "doc_id": idx // 3, "position": position.astype(np.int32),
            "split": split.astype(np.uint8), "tokens": tokens.astype(np.int32)}


def write_range(root: str, part: int, lo: int, hi: int, batch: int, *, dtype: str = "float32",
                chunk_rows: int = 64, sleep: float = 0.0, meta: dict = META,
                until: int | None = None) -> PartWriter:
    """Write global rows [lo, until or hi) of a part holding [lo, hi) in `batch`-aligned appends."""
    w = PartWriter.create_or_resume(root, part, d=D, dtype=dtype, capacity=hi - lo, ctx_len=CTX,
                                    chunk_rows=chunk_rows, shard_chunks=4, meta=meta)
    nxt = w.cursor.get("next_row", lo)
    assert nxt == lo + w.committed
    while nxt < (hi if until is None else until):
        stop = min(hi, (nxt - lo) // batch * batch + batch + lo)
        r = make_rows(np.arange(nxt, stop))
        w.append(r["acts"], r["doc_id"], r["position"], r["split"], r["tokens"], {"next_row": stop})
        nxt = stop
        if sleep:
            time.sleep(sleep)
    return w


def write_store(root: str, n: int, batch: int, **kw) -> dict:
    write_range(root, 0, 0, n, batch, **kw).close()
    return finalize_manifest(root, META)


def read_all(root: str) -> dict[str, np.ndarray]:
    s = open_store(root)
    return s.read(None, np.arange(s.num_rows))


def assert_same_store(a: str, b: str) -> None:
    ra, rb = read_all(a), read_all(b)
    for k in ra:
        assert ra[k].dtype == rb[k].dtype and ra[k].tobytes() == rb[k].tobytes(), k
    ma, mb = (json.load(open(os.path.join(r, "manifest.json"))) for r in (a, b))
    assert ma == mb  # row counts, per-part checksums and split stats, exactly
    for r in (a, b):
        assert verify(r) == []


def snapshot(root: str) -> dict[str, bytes]:
    out = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            if f != ".lock":
                out[os.path.relpath(os.path.join(dp, f), root)] = open(os.path.join(dp, f), "rb").read()
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip(tmp_path, dtype):
    root = str(tmp_path)
    m = write_store(root, 300, 70, dtype=dtype)
    assert m["num_rows"] == 300 and m["parts"][0]["rows"] == 300 and m["parts"][0]["commits"] == 5
    s = open_store(root)
    want = make_rows(np.arange(300))
    rows = np.random.default_rng(0).permutation(300)[:100]
    rows[5] = rows[6]  # a duplicate
    got = s.read(None, rows)
    np_dt = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    assert got["acts"].dtype == np_dt
    np.testing.assert_array_equal(got["acts"], want["acts"][rows].astype(np_dt))
    for k in ("doc_id", "position", "split", "tokens"):
        np.testing.assert_array_equal(got[k], want[k][rows], err_msg=k)
    ev = s.rows_of_split("eval")
    np.testing.assert_array_equal(ev, np.flatnonzero(want["split"] == 3))
    np.testing.assert_array_equal(s.read("eval", np.arange(len(ev)))["doc_id"], want["doc_id"][ev])
    assert s.read(None, np.zeros(0, np.int64))["acts"].shape == (0, D)
    assert verify(root) == []


def test_resume_after_crash_before_ledger(tmp_path, monkeypatch):
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    write_store(clean, 500, 64)
    write_range(crashed, 0, 0, 500, 64, until=192).close()

    def boom(self, ledger):
        self.close()  # a dying process releases its part lock
        raise RuntimeError("crash before the ledger")
    monkeypatch.setattr(PartWriter, "_write_ledger", boom)
    with pytest.raises(RuntimeError):
        write_range(crashed, 0, 0, 500, 64)  # rows 192:256 written to the arrays, never committed
    monkeypatch.undo()
    w = PartWriter.create_or_resume(crashed, 0, d=D, dtype="float32", capacity=500, ctx_len=CTX,
                                    chunk_rows=64, meta=META)
    assert (w.committed, w.cursor) == (192, {"next_row": 192})
    w.close()
    write_range(crashed, 0, 0, 500, 64).close()
    finalize_manifest(crashed, META)
    assert_same_store(clean, crashed)
    assert sorted(f for f in os.listdir(os.path.join(crashed, "part-00000")) if f.startswith("stats-")) \
        == ["stats-00000008.npz"]


def test_kill9_resume_bit_identical(tmp_path):
    n, batch = 2000, 25
    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    write_store(clean, n, batch)
    code = (f"import sys; sys.path[:0] = [{REPO!r}, {TESTS!r}]; import test_store; "
            f"test_store.write_range({killed!r}, 0, 0, {n}, {batch}, sleep=0.005)")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, JAX_PLATFORMS="cpu"))
    ledger = os.path.join(killed, "part-00000", "ledger.json")
    deadline = time.time() + 30
    while not (os.path.exists(ledger) and json.load(open(ledger))["committed"] >= batch):
        assert proc.poll() is None and time.time() < deadline, "writer died before its first commit"
        time.sleep(0.005)
    seed = int.from_bytes(os.urandom(4), "little")
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    assert proc.poll() is None, f"writer finished before the kill (seed {seed})"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    at_kill = json.load(open(ledger))["committed"]
    assert 0 < at_kill < n and at_kill % batch == 0, (at_kill, seed)
    write_range(killed, 0, 0, n, batch).close()
    finalize_manifest(killed, META)
    assert_same_store(clean, killed)


def test_mismatch_refused_data_untouched(tmp_path):
    root = str(tmp_path)
    write_store(root, 100, 50)
    before = snapshot(root)
    base = dict(d=D, dtype="float32", capacity=100, ctx_len=CTX, meta=META)
    for key, val, shown in [("dtype", "bfloat16", "'bfloat16'"), ("d", 32, "32"), ("capacity", 200, "200"),
                            ("ctx_len", 8, "8"), ("meta", dict(META, fingerprint="other/L5"), "'other/L5'")]:
        with pytest.raises(UserError) as e:
            PartWriter.create_or_resume(root, 0, **dict(base, **{key: val}))
        msg = str(e.value)
        assert "another model/layer" in msg and shown in msg and "part-00000" in msg, msg
        assert (key if key != "meta" else "fingerprint") in msg
    assert snapshot(root) == before
    with pytest.raises(UserError, match="fingerprint"):
        PartWriter.create_or_resume(root, 1, **dict(base, meta={"split_names": SPLITS}))


def test_capacity_overflow_and_bad_rows(tmp_path):
    w = write_range(str(tmp_path), 0, 0, 100, 60)
    r = make_rows(np.arange(100, 101))
    with pytest.raises(UserError, match="capacity 100"):
        w.append(r["acts"], r["doc_id"], r["position"], r["split"], r["tokens"], {})
    assert w.committed == 100
    w.close()
    w = PartWriter.create_or_resume(str(tmp_path), 1, d=D, dtype="float32", capacity=10, ctx_len=CTX, meta=META)
    bad = dict(r, acts=np.full((1, D), np.nan, np.float32))
    with pytest.raises(UserError, match="non-finite"):
        w.append(*(bad[k] for k in store.ARRAYS), cursor={})
    with pytest.raises(ValueError, match="position"):
        w.append(*(dict(r, position=np.array([CTX]))[k] for k in store.ARRAYS), cursor={})
    assert w.committed == 0
    with pytest.raises(UserError, match="another process"):
        PartWriter.create_or_resume(str(tmp_path), 1, d=D, dtype="float32", capacity=10, ctx_len=CTX, meta=META)
    w.close()


def _store_for_verify(tmp_path) -> tuple[str, str]:
    root = str(tmp_path)
    write_store(root, 300, 100)
    assert verify(root) == []
    return root, os.path.join(root, "part-00000")


def test_verify_flipped_byte(tmp_path):
    root, pdir = _store_for_verify(tmp_path)
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(pdir, "acts", "c")) for f in fs]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    problems = verify(root)
    assert problems and any(p.startswith("part-00000 acts rows") for p in problems), problems


def test_verify_manifest_counts(tmp_path):
    root, _ = _store_for_verify(tmp_path)
    mpath = os.path.join(root, "manifest.json")
    m = json.load(open(mpath))
    m["parts"][0]["rows"] = 299
    json.dump(m, open(mpath, "w"))
    assert any("manifest says 299 rows, ledger 300" in p for p in verify(root))
    os.remove(mpath)
    assert any("manifest.json: missing" in p for p in verify(root))


def test_verify_missing_shard(tmp_path):
    root, pdir = _store_for_verify(tmp_path)
    os.remove(os.path.join(pdir, "acts", "c", "1", "0"))  # shard of rows 256:...
    problems = verify(root)
    assert any(p == "part-00000 acts rows 256:300: shard file acts/c/1/0 missing" for p in problems), problems
    assert any(p.startswith("part-00000 acts rows 200:300: sha256") for p in problems), problems


def test_verify_non_finite(tmp_path):
    root, pdir = _store_for_verify(tmp_path)
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(pdir, "acts")}},
                  open=True).result()
    arr[150, 3].write(np.inf).result()
    problems = verify(root)
    assert any(p.startswith("part-00000 acts rows 100:200: 1 rows non-finite (first at row 150)") for p in problems), problems


def test_two_parts_global_order_and_stats(tmp_path):
    root = str(tmp_path)
    write_range(root, 1, 700, 1200, 128, chunk_rows=32).close()  # part order, not write order
    write_range(root, 0, 0, 700, 100).close()
    m = finalize_manifest(root, META, num_parts=2)
    assert [p["rows"] for p in m["parts"]] == [700, 500] and m["num_rows"] == 1200
    s = open_store(root)
    want = make_rows(np.arange(1200))
    got = s.read(None, np.arange(1200)[::-1])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k][::-1], err_msg=k)
    v = want["acts"].astype(np.float64)
    for k, name in enumerate(SPLITS):
        np.testing.assert_array_equal(s.rows_of_split(name), np.flatnonzero(want["split"] == k))
        x = v[want["split"] == k]
        norm = np.linalg.norm(x, axis=1)
        nrm = x / norm[:, None] * np.sqrt(D)
        var = ((nrm - nrm.mean(0)) ** 2).sum(1).mean() / D
        st = m["splits"][name]
        assert st["rows"] == len(x)
        assert abs(st["mean_norm"] - norm.mean()) <= 1e-6 * norm.mean()
        assert abs(st["var_nrm"] - var) <= 1e-6 * var
    assert verify(root) == []
    with pytest.raises(UserError, match="expected"):
        finalize_manifest(root, META, num_parts=3)
    with pytest.raises(UserError, match="fingerprint"):
        finalize_manifest(root, dict(META, fingerprint="other"))


# ----------------------------------------------------------------------------- shards of fill values

def _fill_rows_store(root: str, monkeypatch, old_writer: bool) -> dict[str, np.ndarray]:
    """300 rows whose first shard (rows 0:256) holds only fill values in every array that may
    legally hold them (acts all 0, split all 0; the int arrays' fill -1 is refused by the writer).
    old_writer: written as before WRITE_FILL, when zarr skipped such shards' files."""
    if old_writer:
        monkeypatch.setattr(store.arrays, "WRITE_FILL", {})
    want = make_rows(np.arange(300))
    want["acts"][:256] = 0.0
    want["split"][:256] = 0
    w = PartWriter.create_or_resume(root, 0, d=D, dtype="float32", capacity=300, ctx_len=CTX, chunk_rows=64,
                                    shard_chunks=4, meta=META)
    for lo in range(0, 300, 100):
        sl = slice(lo, lo + 100)
        w.append(want["acts"][sl], want["doc_id"][sl], want["position"][sl], want["split"][sl], want["tokens"][sl],
                 {"next_row": lo + 100})
    w.close()
    finalize_manifest(root, META)
    monkeypatch.undo()
    return want


@pytest.mark.parametrize("old_writer", [False, True])
def test_shards_of_fill_values_open_and_read_back(tmp_path, monkeypatch, old_writer):
    root = str(tmp_path)
    want = _fill_rows_store(root, monkeypatch, old_writer)
    pdir = os.path.join(root, "part-00000")
    absent = {k for k in ("acts/c/0/0", "split/c/0") if not os.path.exists(os.path.join(pdir, k))}
    assert absent == ({"acts/c/0/0", "split/c/0"} if old_writer else set())
    s = open_store(root)
    got = s.read(None, np.arange(300))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert len(s.rows_of_split("av_sft")) == int((want["split"] == 0).sum())
    assert verify(root) == []


@pytest.mark.parametrize("old_writer", [False, True])
@pytest.mark.parametrize("key", ["acts/c/1/0", "split/c/1", "doc_id/c/0"])
def test_a_deleted_shard_with_data_is_refused(tmp_path, monkeypatch, old_writer, key):
    """Beside legitimately absent all-fill shards, a deleted shard that held data is damage."""
    root = str(tmp_path)
    _fill_rows_store(root, monkeypatch, old_writer)
    os.remove(os.path.join(root, "part-00000", *key.split("/")))
    arr = key.split("/")[0]
    rows = "256:300" if "/1" in key else "0:256"
    with pytest.raises(UserError) as e:
        open_store(root)
    msg = str(e.value)
    assert "\n" not in msg and f"part-00000 {arr} rows {rows}: shard file {key} is missing" in msg, msg
    assert f"part-00000 {arr} rows {rows}: shard file {key} missing" in verify(root)


# ----------------------------------------------------------------------------- stored predictions

K_TOP = 3


def _predictions(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-K_TOP ids [n, K] and probabilities [n, K] (descending) as a function of the row index."""
    idx = np.asarray(idx, np.int64)
    ids = (idx[:, None] * 7 + np.arange(K_TOP) * 13) % 500                      # [n, K]
    raw = 1.0 / (2.0 + idx[:, None] % 5 + np.arange(K_TOP))                    # [n, K], decreasing
    return ids.astype(np.int32), (raw / raw.sum(1, keepdims=True) * 0.9).astype(np.float32)


def _write_with_predictions(root: str, n: int, batch: int, top_k: int = K_TOP) -> None:
    meta = dict(META, top_k=top_k)
    w = PartWriter.create_or_resume(root, 0, d=D, dtype="float32", capacity=n, ctx_len=CTX, chunk_rows=16,
                                    shard_chunks=4, meta=meta, top_k=top_k)
    for lo in range(w.committed, n, batch):
        idx = np.arange(lo, min(n, lo + batch))
        r = make_rows(idx)
        ids, probs = _predictions(idx)
        w.append(*(r[k] for k in store.ARRAYS), cursor={"next_row": int(idx[-1]) + 1}, top_ids=ids, top_probs=probs)
    w.close()
    finalize_manifest(root, meta)


def test_predictions_round_trip_beside_the_rows(tmp_path):
    """A part created with top_k stores each row's top_ids/top_probs beside the five arrays: they read
    back exactly, in any row order, verify checks them, and the manifest says how many per row."""
    root = str(tmp_path)
    _write_with_predictions(root, 90, 40)
    s = open_store(root)
    assert s.top_k == K_TOP and s.fields == store.ARRAYS + store.PREDICTIONS
    assert s.manifest["top_k"] == K_TOP
    rows = np.array([89, 0, 45, 45, 17])
    got = s.read(None, rows)
    ids, probs = _predictions(rows)
    assert got["top_ids"].dtype == np.int32 and got["top_probs"].dtype == np.float32
    np.testing.assert_array_equal(got["top_ids"], ids)
    np.testing.assert_array_equal(got["top_probs"], probs)
    np.testing.assert_array_equal(got["acts"], make_rows(rows)["acts"])
    assert set(s.read(None, rows, fields=("top_ids",))) == {"top_ids"}
    assert verify(root) == []
    # a value the writer would refuse (not probabilities, most likely first) is one line in verify
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(root, "part-00000",
                                                                                          "top_probs")}},
                  open=True).result()
    arr[50, 2].write(0.99).result()
    problems = verify(root)
    assert any(p.startswith("part-00000 top_probs rows 40:80: 1 rows not probabilities in [0, 1], most likely first "
                            "(first at row 50)") for p in problems), problems
    assert any(p.startswith("part-00000 top_probs rows 40:80: sha256 differs") for p in problems), problems


def test_a_store_without_predictions_reads_as_before(tmp_path):
    """A part written without top_k (every store before data.top_k) has the five arrays only; asking
    for predictions is a KeyError naming what the store has."""
    root = str(tmp_path)
    write_store(root, 50, 25)
    s = open_store(root)
    assert s.top_k == 0 and s.fields == store.ARRAYS
    assert sorted(os.listdir(os.path.join(root, "part-00000"))) == sorted(
        list(store.ARRAYS) + [".lock", "ledger.json"] + [f for f in os.listdir(os.path.join(root, "part-00000"))
                                                          if f.startswith("stats-")])
    with pytest.raises(KeyError, match="top_ids"):
        s.read(None, np.arange(3), fields=("top_ids",))


def test_predictions_must_match_the_part(tmp_path):
    """Resuming with another top_k is one line and leaves the part as it was; appending rows without
    the predictions a part stores (or with them to a part that stores none) is refused."""
    root = str(tmp_path)
    _write_with_predictions(root, 60, 30)
    before = snapshot(root)
    for k in (0, 5):
        with pytest.raises(UserError) as e:
            PartWriter.create_or_resume(root, 0, d=D, dtype="float32", capacity=60, ctx_len=CTX,
                                        meta=dict(META, top_k=K_TOP), top_k=k)
        assert str(e.value) == (f"store part {os.path.join(root, 'part-00000')} stores {K_TOP} next-token "
                                f"predictions per row, this run {k} (config key data.top_k must stay as it was "
                                f"to resume; or extract into a fresh data.store)")
    assert snapshot(root) == before
    r = make_rows(np.arange(2))
    ids, probs = _predictions(np.arange(2))
    w = PartWriter.create_or_resume(root, 1, d=D, dtype="float32", capacity=10, ctx_len=CTX, meta=META, top_k=K_TOP)
    with pytest.raises(ValueError, match="top_k=3"):
        w.append(*(r[k] for k in store.ARRAYS), cursor={})
    with pytest.raises(ValueError, match="top_probs has shape"):
        w.append(*(r[k] for k in store.ARRAYS), cursor={}, top_ids=ids, top_probs=probs[:, :2])
    with pytest.raises(ValueError, match="top_probs"):
        w.append(*(r[k] for k in store.ARRAYS), cursor={}, top_ids=ids, top_probs=probs[:, ::-1])
    assert w.committed == 0
    w.close()
    w = PartWriter.create_or_resume(root, 2, d=D, dtype="float32", capacity=10, ctx_len=CTX, meta=META)
    with pytest.raises(ValueError, match="top_k=0"):
        w.append(*(r[k] for k in store.ARRAYS), cursor={}, top_ids=ids, top_probs=probs)
    w.close()
