"""The run-state layer (nla/run.py, nla/state.py) and partial checkpoint reads (what pairs use).

- build(abstract=True) reads no file: no tokenizer, no store, every target leaf an abstract array
  carrying its sharding; the stage layouts built on it shard each Adam moment like its parameter
  and replicate the counters (on 8 fake devices, where "like its parameter" is not replication).
- Checkpointer.restore(partial=True) reads a subtree (a model's parameters) without the optimizer
  state, bitwise; a non-partial restore of the same subtree is still refused, naming the extra keys.
"""
from __future__ import annotations

import os
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

_LAYOUT_PROGRAM = r"""
import jax
from jax.sharding import PartitionSpec as P
from nla_jax import configlib
from nla_jax.nla import run as run_lib, state as state_lib
cfg = configlib.get("configs/tiny.py", ["mesh.shape=(2,4,1)"])
run = run_lib.build(cfg, abstract=True)
assert run.tokenizer is None and run.store is None and run.stats is None
assert all(isinstance(a, jax.ShapeDtypeStruct) and a.sharding is not None for a in jax.tree.leaves(run.target))
assert run.batch_shards == 8
for name in state_lib.STAGES:
    layout = state_lib.for_stage(run, name)
    leaves = jax.tree_util.tree_flatten_with_path(layout.abstract)[0]
    assert all(a.sharding is not None for _, a in leaves), name
    for opt_key, params_key in layout.optimizes.items():
        dict_path = lambda path: tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        params = {dict_path(p): a for p, a in jax.tree_util.tree_flatten_with_path(layout.abstract[params_key])[0]}
        matched = 0
        for path, leaf in jax.tree_util.tree_flatten_with_path(layout.abstract[opt_key])[0]:
            moment = {getattr(k, "name", None) for k in path} & {"mu", "nu"}
            keys = dict_path(path)
            twin = next((params[keys[i:]] for i in range(len(keys)) if keys[i:] in params), None)
            if moment and twin is not None:
                assert twin.shape == leaf.shape and leaf.sharding.spec == twin.sharding.spec, (name, path)
                matched += 1
        trained = sum(lab != "frozen" for lab in jax.tree.leaves(layout.labels[params_key]))
        assert matched == 2 * trained, (name, opt_key, matched, trained)  # mu and nu of every trained leaf
    for k in state_lib.COUNTERS:
        assert layout.abstract[k].sharding.spec == P(), (name, k)
# the embedding is split over fsdp (rules: embed -> fsdp), so sharded-like-params is not replication
av = state_lib.sft_av(run).abstract["av"]["model"]["embed"]
assert av.sharding.spec != P(), av.sharding.spec
print("ok")
"""


def test_abstract_run_and_stage_layouts_on_8_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", _LAYOUT_PROGRAM], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def _state(step: int) -> dict:
    return {"av": {"w": jnp.full((4, 3), float(step)), "b": jnp.arange(3, dtype=jnp.float32) * step},
            "opt": {"mu": {"w": jnp.ones((4, 3)) * step}, "count": jnp.int32(step)},
            "step": jnp.int32(step)}


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def test_partial_restore_reads_one_model_without_optimizer_state(tmp_path):
    d = str(tmp_path / "ck")
    with ckpt_lib.Checkpointer(d, keep=None, async_save=False, fingerprint="fp") as mgr:
        mgr.save(3, _state(3), {"step": 3})
        mgr.save(5, _state(5), {"step": 5})
    want = _state(5)
    reader = ckpt_lib.Checkpointer(d, keep=None, async_save=False, read_only=True)
    try:
        got, meta = reader.restore({"av": _abstract(want["av"])}, partial=True)
        assert meta == {"step": 5} and set(got) == {"av"}
        for k in ("w", "b"):
            np.testing.assert_array_equal(np.asarray(got["av"][k]), np.asarray(want["av"][k]))
        older, _ = reader.restore({"av": _abstract(want["av"])}, step=3, partial=True)
        np.testing.assert_array_equal(np.asarray(older["av"]["w"]), np.asarray(_state(3)["av"]["w"]))
        with pytest.raises(UserError, match="in the checkpoint but not requested"):
            reader.restore({"av": _abstract(want["av"])}, step=5)
        with pytest.raises(UserError, match="missing from the checkpoint"):
            reader.restore({"av": _abstract(want["av"]), "ar": _abstract(want["av"])}, step=5, partial=True)
    finally:
        reader.close()
