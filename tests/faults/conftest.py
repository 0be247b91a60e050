"""Fixtures of the fault suite, built once per session: the corpus, the uninterrupted reference
store (extraction + "quote" teacher summaries) and the uninterrupted reference training run
(sft_av, sft_ar, rl; every checkpoint kept, so any step can be compared)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from . import _util as U


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("faults_corpus") / "c.jsonl")
    U.write_corpus(path)
    return path


@pytest.fixture(scope="session")
def ref_store(tmp_path_factory, corpus) -> str:
    root = str(tmp_path_factory.mktemp("faults_ref_store") / "store")
    U.ok(U.run(U.extract_cmd(root, corpus)))
    r = subprocess.run([sys.executable, "-m", "nla_jax.summarize", "--config", U.TINY, f"--config.data.store={root}",
                        "--config.summarize.teacher=quote"], cwd=U.REPO, env=U.env(), capture_output=True, text=True,
                       timeout=300)
    U.ok(r)
    return root


@pytest.fixture(scope="session")
def reference(tmp_path_factory, ref_store) -> str:
    """The uninterrupted run every faulted run must reproduce bit for bit."""
    wd = str(tmp_path_factory.mktemp("faults_ref_train") / "w")
    U.ok(U.run(U.train_cmd(ref_store, wd, *U.FAULT_TRAIN, "--config.train.keep=10")))
    for s in U.TRAIN_STAGES:
        assert U.steps_of(os.path.join(wd, s)) == [2, 4, 6], s
    recs = U.records(wd, ("rl",))
    # the RL updates are not vacuous: some groups have non-zero advantages and both models move
    assert any(r["nonzero_adv_groups"] > 0 and r["grad_norm_av"] > 0 and r["grad_norm_ar"] > 0 for r in recs.values())
    return wd
