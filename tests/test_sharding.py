"""Sharding rules, meshes, and the sharded forward on 8 fake CPU devices (in a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from nla_jax import sharding
from nla_jax.errors import UserError
from nla_jax.models import transformer as T

HERE = os.path.dirname(os.path.abspath(__file__))
RULES = sharding.DEFAULT_RULES


def mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


# ----------------------------------------------------------------------------- spec_for

def test_spec_for_drops_axes_that_do_not_divide():
    m = mesh(2, 2, 2)
    # SmolLM2: 3 KV heads cannot be split over tensor=2; 9 query heads neither; 576 embed over fsdp can
    assert sharding.spec_for(("layers", "embed", "kv_heads", "head_dim"), (30, 576, 3, 64), m, RULES) == \
        P(None, "fsdp", None, None)
    assert sharding.spec_for(("layers", "embed", "kv_heads", "head_dim"), (30, 576, 4, 64), m, RULES) == \
        P(None, "fsdp", "tensor", None)
    assert sharding.spec_for(("vocab", "embed"), (49152, 575), m, RULES) == P("tensor", None)


def test_spec_for_multi_axis_batch():
    m = mesh(2, 4, 1)
    assert sharding.spec_for(("batch", "seq"), (16, 7), m, RULES) == P(("data", "fsdp"), None)
    # 2 rows: data divides, data*fsdp does not -> keep only what divides
    assert sharding.spec_for(("batch", "seq"), (2, 7), m, RULES) == P("data", None)
    # 4 rows: data (2) divides, then fsdp would need 8 -> dropped
    assert sharding.spec_for(("batch", "seq"), (4, 7), m, RULES) == P("data", None)
    assert sharding.spec_for(("batch", "seq"), (3, 7), m, RULES) == P(None, None)
    # no shape given: nothing is dropped for divisibility
    assert sharding.spec_for(("batch",), None, m, RULES) == P(("data", "fsdp"))


def test_spec_for_size_one_unknown_and_reused_axes():
    m = mesh(1, 1, 4)
    # size-1 mesh axes are never named
    assert sharding.spec_for(("batch", "embed"), (8, 64), m, RULES) == P(None, None)
    # names without a rule, None names, and names mapped to None
    assert sharding.spec_for(("nope", None, "seq"), (8, 8, 8), m, RULES) == P(None, None, None)
    # one mesh axis shards at most one dimension of an array
    assert sharding.spec_for(("heads", "mlp"), (8, 8), m, RULES) == P("tensor", None)
    # custom rules: lists are accepted like tuples
    rules = (("embed", ["fsdp", "tensor"]),)
    assert sharding.spec_for(("embed",), (64,), mesh(1, 2, 4), rules) == P(("fsdp", "tensor"))


def test_tree_shardings_cover_every_param(tiny_qwen2):
    cfg, params, _ = tiny_qwen2
    m = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    sh = sharding.tree_shardings(T.param_axes(cfg), params, m, RULES)
    assert jax.tree.structure(sh) == jax.tree.structure(params)
    lines = sharding.explain_sharding(T.param_axes(cfg), params, m, RULES)
    assert len(lines) == len(jax.tree.leaves(params))
    assert any(line.startswith("['layers']['wq'] (2, 64, 4, 16)") for line in lines)


def test_make_mesh():
    devs = jax.devices()[:1]
    assert dict(sharding.make_mesh((-1, 1, 1), devices=devs).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(UserError, match="needs 2 devices"):
        sharding.make_mesh((2, 1, 1), devices=devs)
    with pytest.raises(UserError, match="at most one -1"):
        sharding.make_mesh((-1, -1, 1), devices=devs)
    with pytest.raises(UserError, match="has 2 axes"):
        sharding.make_mesh((1, 1), devices=devs)


def test_use_mesh_scopes_constraints():
    assert sharding._ACTIVE["mesh"] is None
    x = jnp.ones((2, 3))
    assert sharding.constrain(x, ("batch", None)) is x  # no mesh: a no-op
    m = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with sharding.use_mesh(m, RULES):
        assert sharding._ACTIVE["mesh"] is m
        with sharding.use_mesh(None):
            assert sharding._ACTIVE["mesh"] is None
        assert sharding._ACTIVE["mesh"] is m
    assert sharding._ACTIVE["mesh"] is None


# ----------------------------------------------------------------------------- 8 fake devices

def test_sharded_forward_matches_unsharded(tiny_qwen2, real, tmp_path):
    from test_loading import write_hf_dir
    cfg, params, _ = tiny_qwen2
    hf_dir = write_hf_dir(tmp_path / "tiny_qwen2", params, cfg, real.tok)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_sharded_forward.py"), hf_dir],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    fwd = {(r["family"], tuple(r["mesh"])): r for r in rows if r["kind"] == "forward"}
    assert set(fwd) == {("llama", (8, 1, 1)), ("llama", (1, 8, 1)), ("llama", (2, 2, 2)), ("llama", (1, 2, 4)),
                        ("llama", (4, 1, 2)), ("qwen2", (2, 2, 2)), ("qwen2", (1, 2, 4))}
    for key, r in fwd.items():
        # same float32 math split over devices: only the summation order differs
        assert r["logits_rel_err"] <= 1e-4, key
        assert r["hidden_rel_err"] <= 1e-4, key
        # the output really is spread: batch over data*fsdp and vocab over tensor = 8 pieces
        assert r["logits_sharding_ok"] and r["logits_shards"] == 8, key
    # parameters are really sharded as the rules say (dims that don't divide stay whole)
    wq, wk, emb = "['layers']['wq']", "['layers']['wk']", "['embed']"
    assert fwd["llama", (1, 8, 1)]["param_shard_shapes"][wq] == [2, 8, 4, 16]
    assert fwd["llama", (1, 2, 4)]["param_shard_shapes"][wq] == [2, 32, 1, 16]
    assert fwd["llama", (1, 2, 4)]["param_shard_shapes"][wk] == [2, 32, 2, 16]  # 2 kv heads, tensor=4
    assert fwd["llama", (2, 2, 2)]["param_shard_shapes"][wk] == [2, 32, 1, 16]
    assert fwd["llama", (1, 2, 4)]["param_shard_shapes"][emb] == [128, 32]
    assert fwd["llama", (8, 1, 1)]["param_shard_shapes"][wq] == [2, 64, 4, 16]  # data-parallel: replicated
    assert fwd["qwen2", (1, 2, 4)]["param_shard_shapes"]["['layers']['bq']"] == [2, 1, 16]
    # the splash attention kernel under shard_map: heads split over tensor, or whole where KV does not divide
    splash = {tuple(r["mesh"]): r for r in rows if r["kind"] == "splash"}
    assert set(splash) == {(2, 2, 2), (1, 2, 4)}
    for key, r in splash.items():
        assert r["logits_rel_err"] <= 1e-4, key
    # loading a HF checkpoint straight into shards on a (2, 2, 2) mesh
    (load,) = [r for r in rows if r["kind"] == "load"]
    assert load["equal"] and load["shards_ok"]
    assert load["shard_shapes"][wq] == [2, 32, 2, 16] and load["shard_shapes"]["['lm_head']"] == [32, 256]
