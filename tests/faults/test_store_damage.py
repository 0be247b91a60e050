"""A damaged activation store: `python -m nla_jax.extract --verify` names the problem (exit 1), and
the trainer, reading the store through the loader, refuses with one line naming the part, array
and rows (exit 2), never training on wrong numbers. Missing shards and a manifest that disagrees
with its part's ledger are caught when the store is opened (before any compute, nothing written);
a flipped byte is caught by the chunk's crc32c when the chunk is read.

Layout of the suite's store: one part, 320 rows, 32-row chunks (one per commit), shards of 256
rows: acts/c/0/0 holds rows 0:256 as eight 8196-byte chunks (32 x 64 float32 + crc32c), then
its index; acts/c/1/0 rows 256:320.
"""
from __future__ import annotations

import json
import os

import pytest

from . import _util as U

CHUNK_BYTES = 32 * 64 * 4 + 4


@pytest.fixture
def store(ref_store, tmp_path) -> str:
    return U.copy_store(ref_store, str(tmp_path / "store"))


def _verify(store: str, corpus: str):
    return U.run(U.extract_cmd(store, corpus, "--verify"))


def _train(store: str, wd: str):
    return U.run(U.train_cmd(store, wd, "--stages", "sft_av"))


def test_flipped_byte_named_by_verify_and_by_the_loader(store, corpus, tmp_path):
    path = os.path.join(store, "part-00000", "acts", "c", "0", "0")
    with open(path, "r+b") as f:
        f.seek(CHUNK_BYTES + 100)  # inside the second chunk: rows 32:64
        b = f.read(1)
        f.seek(CHUNK_BYTES + 100)
        f.write(bytes([b[0] ^ 0x01]))
    v = _verify(store, corpus)
    assert v.returncode == 1, v.stdout + v.stderr
    problems = v.stdout.splitlines()
    assert problems and all(p.startswith("part-00000 acts rows 32:64: ") for p in problems), problems
    assert any("unreadable" in p for p in problems), problems
    assert f"store {store}: {len(problems)} problem(s)" in v.stderr
    wd = str(tmp_path / "w")
    line = U.error_line(_train(store, wd), alone=False)
    assert f"store {store}: part-00000 acts rows 32:64 do not read" in line and "--verify" in line, line
    assert not any(os.path.isdir(os.path.join(wd, s)) for s in U.TRAIN_STAGES)  # no stage started


def test_missing_chunk_named_before_any_compute(store, corpus, tmp_path):
    os.remove(os.path.join(store, "part-00000", "acts", "c", "1", "0"))
    v = _verify(store, corpus)
    assert v.returncode == 1
    assert "part-00000 acts rows 256:320: shard file acts/c/1/0 missing" in v.stdout.splitlines(), v.stdout
    wd = str(tmp_path / "w")
    line = U.error_line(_train(store, wd))
    assert f"store {store}: part-00000 acts rows 256:320: shard file acts/c/1/0 is missing" in line, line
    assert not os.path.exists(wd)


def test_manifest_disagreeing_with_its_rows_named_before_any_compute(store, corpus, tmp_path):
    path = os.path.join(store, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    m["parts"][0]["rows"] = 288  # e.g. a manifest from an earlier, shorter extraction
    m["num_rows"] = 288
    with open(path, "w") as f:
        json.dump(m, f)
    v = _verify(store, corpus)
    assert v.returncode == 1
    assert "part-00000: manifest says 288 rows, ledger 320" in v.stdout.splitlines(), v.stdout
    wd = str(tmp_path / "w")
    line = U.error_line(_train(store, wd))
    assert f"store {store}: manifest.json says part-00000 has 288 rows, its ledger.json 320" in line, line
    assert not os.path.exists(wd)


def test_unfinished_store_refused(store, tmp_path):
    """What a kill before the manifest leaves (see test_kill): not a store the trainer will read."""
    os.remove(os.path.join(store, "manifest.json"))
    wd = str(tmp_path / "w")
    line = U.error_line(_train(store, wd))
    assert f"{store}/manifest.json: missing; the store was not finalized" in line, line
    assert not os.path.exists(wd)
