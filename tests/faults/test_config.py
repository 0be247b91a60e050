"""Mistakes in the command line / config of `python -m nla_jax.train` and `python -m nla_jax.extract`:
refused before any compute with one `error:` line naming the key and value, exit 2, no traceback,
and nothing written (the work directory / store directory is not even created).

(tests/test_train.py covers rl.group_size=1, av.max_len=600, an unknown stage, a store of another
layer and rl without SFT; these are other keys and values.) The processes run a few at a time in
one module fixture: each is a jax start-up and nothing else.
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from . import _util as U

TRAIN = [  # (id, extra args, fake CPU devices, what the error line must say)
    ("unknown_key", ["--config.train.learning_rate=1e-4"], None,
     "unknown config key 'train.learning_rate' (known at train: async_checkpoint, ckpt_every"),
    ("wrong_type_int", ["--config.rl.group_size=four"], None, "config key 'rl.group_size' expects an int, got 'four'"),
    ("wrong_type_bool", ["--config.nla.center=maybe"], None,
     "config key 'nla.center' expects a bool (true/false), got 'maybe'"),
    ("mesh_needs_more_devices", ["--config.mesh.shape=(2,1,1)"], None,
     "mesh shape (2, 1, 1) needs 2 devices but 1 are available"),
    ("mesh_vs_4_devices", ["--config.mesh.shape=(3,1,1)"], 4, "mesh shape (3, 1, 1) needs 3 devices but 4 are available"),
    ("layer_out_of_range", ["--config.model.layer=2"], None, "config key model.layer=2 is out of range for 2 blocks"),
    ("negative_layer", ["--config.model.layer=-1"], None, "config key model.layer=-1 is out of range for 2 blocks"),
    ("group_size_0", ["--config.rl.group_size=0"], None,
     "config key rl.group_size=0: GRPO needs groups of at least 2"),
    ("cap_equals_context", ["--config.av.max_len=512"], None,
     "config key av.max_len=512: the explanation cap must be below the model's context (512 tokens)"),
    ("ckpt_every_0", ["--config.train.ckpt_every=0"], None, "config key train.ckpt_every=0: must be an integer >= 1"),
    ("max_nonfinite_0", ["--config.train.max_nonfinite=0"], None,
     "config key train.max_nonfinite=0: must be an integer >= 1"),
    ("keep_0", ["--config.train.keep=0"], None, "config key train.keep=0: must be an integer >= 1"),
    ("keep_every_negative", ["--config.train.keep_every=-5"], None, "config key train.keep_every=-5: must be an integer >= 0"),
    ("schedule_typo", ["--config.sft_ar.optim.schedule=cosin"], None,
     "config key sft_ar.optim.schedule='cosin': expected 'constant' or 'cosine'"),
    ("batch_over_split", ["--config.rl.batch=200"], None,
     "config key rl.batch=200 is larger than split 'rl' of store"),
]
EXTRACT = [
    ("unknown_key", ["--config.data.chunkrows=8"], None, "unknown config key 'data.chunkrows'"),
    ("wrong_type", ["--config.data.k=four"], None, "config key 'data.k' expects an int, got 'four'"),
    ("mesh_needs_more_devices", ["--config.mesh.shape=(2,1,1)"], None,
     "mesh shape (2, 1, 1) needs 2 devices but 1 are available"),
    ("layer_out_of_range", ["--config.model.layer=5"], None, "config key model.layer=5 is out of range for 2 blocks"),
    ("store_dtype", ["--config.data.dtype=float16"], None,
     "config key data.dtype='float16': expected one of bfloat16, float32"),
]
CASES = [("train",) + c for c in TRAIN] + [("extract",) + c for c in EXTRACT]


@pytest.fixture(scope="module")
def outcomes(ref_store, corpus, tmp_path_factory) -> dict:
    """Run every case, three at a time: {(tool, id): (CompletedProcess-like, target dir)}."""
    root = tmp_path_factory.mktemp("config_cases")
    todo, running, out = list(CASES), [], {}
    while todo or running:
        while todo and len(running) < 3:
            tool, cid, args, devices, _ = todo.pop(0)
            target = str(root / f"{tool}_{cid}")
            cmd = (U.train_cmd(ref_store, target, *args) if tool == "train"
                   else U.extract_cmd(target, corpus, *args))
            p = subprocess.Popen(cmd, cwd=U.REPO, env=U.env(devices=devices), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            running.append((tool, cid, target, p, time.time()))
        for item in list(running):
            tool, cid, target, p, t0 = item
            if p.poll() is None and time.time() - t0 < 240:
                continue
            if p.poll() is None:
                p.kill()
            stdout, stderr = p.communicate()
            out[(tool, cid)] = (subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), target)
            running.remove(item)
        time.sleep(0.05)
    return out


@pytest.mark.parametrize("tool,cid,args,devices,needle", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_setting_refused_before_any_compute(outcomes, tool, cid, args, devices, needle):
    r, target = outcomes[(tool, cid)]
    line = U.error_line(r)
    assert needle in line, line
    assert r.stdout == "", r.stdout
    assert not os.path.exists(target), sorted(os.listdir(target))  # nothing created, computed or written
