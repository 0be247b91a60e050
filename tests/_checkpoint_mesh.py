"""Checkpoint save on one mesh, restore on others, with fake CPU devices (run by test_checkpoint.py).

The caller sets XLA_FLAGS=--xla_force_host_platform_device_count=N before this process starts
(it must precede jax's import). Prints one JSON object per restore:
  {"kind": "restore", "mesh": [...], "equal": bool, "sharding_ok": bool, "shards_ok": bool, ...}

    python tests/_checkpoint_mesh.py single DIR
        8 devices: save on mesh (2,4) sharded over both axes, restore onto (8,) and (4,2).
    python tests/_checkpoint_mesh.py multi DIR COORDINATOR NUM_PROCESSES PROCESS_ID
        4 devices per process, N processes form one global mesh (gloo collectives): save on
        (2,4), damage the newest step, restore onto (4,2): every process falls back to the same step.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nla_jax import distributed  # noqa: E402

if __name__ == "__main__" and sys.argv[1] == "multi":
    distributed.initialize(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from nla_jax import checkpoint as ckpt_lib, sharding  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def host_state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((8, 16)).astype(np.float32),
            "emb": {"table": rng.standard_normal((16, 4)).astype(np.float32)},
            "count": (np.arange(4 * 8, dtype=np.int32) + step).reshape(4, 8),
            "scalar": np.float32(step)}


# Per mesh: the spec each leaf gets. The save mesh shards every non-scalar over both axes.
SPECS = {
    (2, 4): {"w": P("a", "b"), "emb": {"table": P(("a", "b"), None)}, "count": P("b", "a"), "scalar": P()},
    (8,): {"w": P("a"), "emb": {"table": P(None, None)}, "count": P(None, "a"), "scalar": P()},
    (4, 2): {"w": P("b", "a"), "emb": {"table": P("a", "b")}, "count": P("a", "b"), "scalar": P()},
}


def mesh_of(shape):
    return sharding.make_mesh(shape, ("a", "b")[:len(shape)])


def shardings(shape):
    m = mesh_of(shape)
    return jax.tree.map(lambda s: NamedSharding(m, s), SPECS[shape], is_leaf=lambda x: isinstance(x, P))


def place(host, shape):
    """A global array from per-device slices of the host value (works across processes)."""
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]),
                        host, shardings(shape))


def check(restored, host, shape, meta, want_meta, step) -> dict:
    sh = shardings(shape)
    leaves = list(zip(jax.tree.leaves(restored), jax.tree.leaves(host), jax.tree.leaves(sh)))
    return {"kind": "restore", "mesh": list(shape), "step": step, "process": jax.process_index(),
            "meta_ok": meta == want_meta,
            # every addressable shard holds exactly its slice of the saved value
            "shards_ok": all(np.array_equal(np.asarray(s.data), np.asarray(h)[s.index])
                             for r, h, _ in leaves for s in r.addressable_shards),
            "equal": (all(np.array_equal(np.asarray(r), h) for r, h, _ in leaves)
                      if jax.process_count() == 1 else None),
            "sharding_ok": all(r.sharding.is_equivalent_to(s, r.ndim) for r, _, s in leaves),
            "specs": [str(r.sharding.spec) for r, _, _ in leaves]}


def abstract(host, shape):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), host, shardings(shape))


def single(directory: str) -> None:
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()} (set XLA_FLAGS)"
    host = host_state(3)
    mgr = ckpt_lib.Checkpointer(directory, keep=2, async_save=True, fingerprint="f")
    saved = place(host, (2, 4))
    assert all(len({tuple((i.start, i.stop) for i in s.index) for s in a.addressable_shards}) > 1
               for a in jax.tree.leaves(saved) if a.ndim), "save arrays are not sharded"
    mgr.save(3, saved, {"mesh": [2, 4]})
    mgr.wait()
    mgr.close()
    for shape in ((8,), (4, 2)):
        mgr = ckpt_lib.Checkpointer(directory, keep=2, fingerprint="f")
        state, meta = mgr.restore(abstract(host, shape))
        print(json.dumps(check(state, host, shape, meta, {"mesh": [2, 4]}, mgr.restored_step)), flush=True)
        mgr.close()


def multi(directory: str) -> None:
    assert jax.device_count() == 4 * jax.process_count(), jax.devices()
    mgr = ckpt_lib.Checkpointer(directory, keep=3, async_save=True, fingerprint="f")
    for step in (1, 2):
        mgr.save(step, place(host_state(step), (2, 4)), {"step": step})
    mgr.wait()
    assert mgr.latest_step() == 2
    if jax.process_index() == 0:  # damage step 2's array data (shared directory)
        for f in glob.glob(os.path.join(directory, "2", "state", "d", "*")):
            os.truncate(f, os.path.getsize(f) // 2)
    distributed.barrier("damaged")
    state, meta = mgr.restore(abstract(host_state(1), (4, 2)))
    print(json.dumps(check(state, host_state(1), (4, 2), meta, {"step": 1}, mgr.restored_step)), flush=True)
    # saving continues past the set-aside step
    mgr.save(2, place(host_state(2), (4, 2)), {"step": 2})
    mgr.wait()
    print(json.dumps({"kind": "resaved", "process": jax.process_index(), "steps": mgr.all_steps(),
                      "entries": sorted(os.listdir(directory))}), flush=True)
    mgr.close()


if __name__ == "__main__":
    {"single": single, "multi": multi}[sys.argv[1]](sys.argv[2])
