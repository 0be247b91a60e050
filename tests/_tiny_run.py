"""A trained tiny NLA work directory for the tests of the tools that read one (explain, export).

`trained_workdir(tmp_path_factory, *flags)` builds the tiny store (the corpus and extraction of
tests/test_train.py) and trains the tiny pair once per pytest session for each set of flags; a
second module asking for the same flags gets the same directory.
"""
from __future__ import annotations

import os
import subprocess
import sys

from test_train import REPO, TINY, _corpus, _env  # the trainer tests' corpus and environment

_cache: dict[tuple, str] = {}
# The pair the explain and export tests share: every optional AV/AR part present (a learned input
# projection, centring) and an RL stage whose rollouts can close (see test_train.RL_LIVE).
NLA_FLAGS = ("--config.av.input_proj=True", "--config.nla.center=True", "--config.av.closer=8",
             "--config.rl.temperature=0.5")
NLA_STAGES = "sft_av,sft_ar,rl"


def _run(cmd, timeout=300):
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (cmd, r.stderr[-3000:])
    return r


def tiny_store(tmp_path_factory) -> str:
    if "store" in _cache:
        return _cache["store"]
    tmp = tmp_path_factory.mktemp("tiny_store")
    _corpus(tmp / "c.jsonl", n=40)
    root = str(tmp / "store")
    common = ["--config", TINY, f"--config.data.store={root}"]
    _run([sys.executable, "-m", "nla_jax.extract", *common,
          f"--config.data.sources=[{{'kind':'jsonl','path':'{tmp / 'c.jsonl'}','name':'t'}}]",
          "--config.data.max_len=96", "--config.data.min_position=16", "--config.data.k=4",
          "--config.data.splits=(('av_sft',0.3),('ar_sft',0.3),('rl',0.25),('eval',0.15))"])
    _run([sys.executable, "-m", "nla_jax.summarize", *common, "--config.summarize.teacher=quote"])
    _cache["store"] = root
    return root


def trained_workdir(tmp_path_factory, *flags: str, stages: str = "sft_av,sft_ar", config: str = TINY) -> str:
    """A tiny work directory trained with `flags` (extra --config.* overrides) through `stages`
    (`config`: another tiny family, e.g. configs/tiny.py:gemma3, on the same store: d and layer agree)."""
    key = (stages, config, *flags)
    if key in _cache:
        return _cache[key]
    store = tiny_store(tmp_path_factory)
    wd = str(tmp_path_factory.mktemp("tiny_run") / "w")
    _run([sys.executable, "-m", "nla_jax.train", "--config", config, f"--config.data.store={store}",
          f"--config.train.workdir={wd}", "--stages", stages, "--config.sft_av.steps=2", "--config.sft_ar.steps=2",
          "--config.rl.steps=1", *flags], timeout=600)
    assert os.path.isdir(os.path.join(wd, "sft_av")), wd
    _cache[key] = wd
    return wd
