"""Sharded vs unsharded forward on 8 fake CPU devices (run by test_sharding.py in a subprocess).

The caller sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before this process starts
(it must precede jax's import, so it cannot be set inside one pytest process without affecting
every other test). Prints one JSON object per line:

  {"kind": "forward", "family", "mesh", "logits_rel_err", "hidden_rel_err", "logits_spec",
   "logits_shards", "param_specs": {leaf: spec}, "param_shard_shapes": {leaf: shape}}
  {"kind": "splash", "mesh", "logits_rel_err"}                       (the TPU kernel, interpret mode)
  {"kind": "load", "mesh", "equal": bool, "shard_shapes": {...}}     (if an HF dir is given)

    python tests/_sharded_forward.py [HF_DIR_OF_TINY_QWEN2]
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from nla_jax import configlib, sampling, sharding  # noqa: E402
from nla_jax import weights  # noqa: E402
from nla_jax.models import transformer as T  # noqa: E402

MESHES = {"llama": [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (4, 1, 2)],
          "qwen2": [(2, 2, 2), (1, 2, 4)]}  # fewer for qwen2: each mesh costs a compile
LAYER = 0


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tiny(variant):
    c = configlib.get(os.path.join(REPO, "configs", "tiny.py") + ":" + variant)
    cfg, params, _ = weights.load_from_config(c.model)
    return cfg, params, c.rules


def batch(cfg):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (16, 3, 9, 12, 16, 1, 7, 14)]
    return sampling.pad_prompts(prompts, cfg.pad_id, length=16)


def check_forward(variant):
    cfg, params, rules = tiny(variant)
    rules = tuple(tuple(r) for r in rules)
    toks, valid = batch(cfg)
    f = lambda p, t, v: T.forward(p, t, cfg, valid=v, capture_layer=LAYER)
    want = jax.jit(f)(params, jnp.asarray(toks), jnp.asarray(valid))  # one device, no mesh
    axes = T.param_axes(cfg)
    for shape in MESHES[variant]:
        mesh = sharding.make_mesh(shape)
        p_sh = sharding.tree_shardings(axes, params, mesh, rules)
        b_sh = sharding.named_sharding(("batch", "seq"), toks.shape, mesh, rules)
        out_sh = {"logits": sharding.named_sharding(("batch", "seq", "act_vocab"), toks.shape + (cfg.vocab_size,),
                                                    mesh, rules),
                  "hidden": sharding.named_sharding(("batch", "seq", "act_embed"), toks.shape + (cfg.d_model,),
                                                    mesh, rules)}
        p = jax.tree.map(jax.device_put, params, p_sh)
        t = jax.device_put(jnp.asarray(toks), b_sh)
        v = jax.device_put(jnp.asarray(valid), b_sh)
        with sharding.use_mesh(mesh, rules):
            g = jax.jit(f, in_shardings=(p_sh, b_sh, b_sh), out_shardings=out_sh)
            got = g(p, t, v)
        flat = jax.tree_util.tree_flatten_with_path(p)[0]
        print(json.dumps({
            "kind": "forward", "family": variant, "mesh": list(shape),
            "logits_rel_err": rel_err(got["logits"], want["logits"]),
            "hidden_rel_err": rel_err(got["hidden"], want["hidden"]),
            "logits_spec": str(got["logits"].sharding.spec),
            "logits_sharding_ok": got["logits"].sharding.is_equivalent_to(out_sh["logits"], 3),
            "logits_shards": len({tuple((s.start, s.stop) for s in sh.index)
                                  for sh in got["logits"].addressable_shards}),
            "param_specs": {jax.tree_util.keystr(k): str(a.sharding.spec) for k, a in flat},
            "param_shard_shapes": {jax.tree_util.keystr(k): list(a.addressable_shards[0].data.shape)
                                   for k, a in flat},
        }), flush=True)


def check_splash():
    """The splash kernel (interpret mode) under shard_map on two meshes vs the one-device einsum
    reference, at the real (unpadded) positions: heads split over tensor=2 (H=4, KV=2) and kept
    whole where tensor=4 does not divide the 2 KV heads."""
    cfg, params, rules = tiny("llama")
    rules = tuple(tuple(r) for r in rules)
    toks, valid = batch(cfg)
    want = jax.jit(lambda p, t, v: T.forward(p, t, cfg, valid=v)["logits"])(params, jnp.asarray(toks), jnp.asarray(valid))
    kernel_cfg = cfg.replace(attention="splash")
    for shape in [(2, 2, 2), (1, 2, 4)]:
        mesh = sharding.make_mesh(shape)
        p_sh = sharding.tree_shardings(T.param_axes(cfg), params, mesh, rules)
        b_sh = sharding.named_sharding(("batch", "seq"), toks.shape, mesh, rules)
        with sharding.use_mesh(mesh, rules):
            got = jax.jit(lambda p, t, v: T.forward(p, t, kernel_cfg, valid=v)["logits"],
                          in_shardings=(p_sh, b_sh, b_sh))(params, jnp.asarray(toks), jnp.asarray(valid))
        w = np.asarray(valid)
        err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))[w].max() / np.abs(np.asarray(want))[w].max()
        print(json.dumps({"kind": "splash", "mesh": list(shape), "logits_rel_err": float(err)}), flush=True)


def check_load(hf_dir):
    cfg0, params0, rules = tiny("qwen2")
    rules = tuple(tuple(r) for r in rules)
    mesh = sharding.make_mesh((2, 2, 2))
    sh = sharding.tree_shardings(T.param_axes(cfg0), T.abstract_params(cfg0), mesh, rules)
    cfg, params, _ = weights.load(hf_dir, shardings=sh)
    equal = all(np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)))
    # every shard a device holds equals the matching slice of the original
    shards_ok = all(np.array_equal(np.asarray(s.data), np.asarray(b)[s.index])
                    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0)) for s in a.addressable_shards)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    print(json.dumps({"kind": "load", "mesh": [2, 2, 2], "equal": equal, "shards_ok": shards_ok,
                      "shard_shapes": {jax.tree_util.keystr(k): list(a.addressable_shards[0].data.shape)
                                       for k, a in flat}}), flush=True)


def main():
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()} (set XLA_FLAGS)"
    for variant in ("llama", "qwen2"):
        check_forward(variant)
    check_splash()
    if len(sys.argv) > 1:
        check_load(sys.argv[1])


if __name__ == "__main__":
    main()
