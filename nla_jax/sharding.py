"""Mesh from config and logical-axis rules -> NamedSharding.

Every parameter and the main activations carry logical axis names (`embed`, `heads`, `mlp`,
`vocab`, `layers`, `batch`, ...). One rules table in the config maps each name to a mesh axis
(or a tuple of them, or None). A mesh axis that does not divide a dimension is dropped for
that array (e.g. SmolLM2's 3 KV heads on a tensor axis of 2), so any rules table is valid on
any model; `explain_sharding` reports what was dropped.

Activation constraints (`constrain`) are no-ops unless a mesh and rules are active
(`with use_mesh(mesh, rules):`), so the model functions run unchanged on one device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nla_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: batch over data+fsdp, weights' embed dim over fsdp, heads/mlp/vocab over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_heads", "tensor"),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_seq", None),
)

_ACTIVE: dict[str, Any] = {"mesh": None, "rules": None}


def make_mesh(shape: Sequence[int], axes: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of the given shape; -1 in one place takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(axes):
        raise UserError(f"mesh shape {tuple(shape)} has {len(shape)} axes but mesh axes are {tuple(axes)}")
    if shape.count(-1) > 1:
        raise UserError(f"mesh shape {tuple(shape)}: at most one -1")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if rest <= 0 or len(devices) % rest:
            raise UserError(f"mesh shape {tuple(shape)} does not fit {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // rest
    if math.prod(shape) != len(devices):
        raise UserError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but "
                        f"{len(devices)} are available (set mesh.shape to match, or use -1)")
    try:
        dev = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU/fake devices: plain order is fine
        dev = np.asarray(devices).reshape(shape)
    return Mesh(dev, tuple(axes))


PLATFORMS = ("any", "cpu", "gpu", "tpu")


def check_platform(mesh_section, backend: str | None = None) -> None:
    """Refuse to run a config meant for another backend (config key mesh.platform): one line
    naming both, and how to install the accelerator build. A config saved before the key existed
    is "any"."""
    want = mesh_section.get("platform") or "any"
    if want not in PLATFORMS:
        raise UserError(f"config key mesh.platform={want!r}: expected one of {', '.join(PLATFORMS)}")
    have = backend or jax.default_backend()
    if want != "any" and have != want:
        setup = {"gpu": "bash launch/setup.sh cuda12", "tpu": "bash launch/setup.sh tpu"}.get(want, "")
        raise UserError(f"config key mesh.platform={want!r}, but JAX's backend here is {have!r}"
                        + (f" (install the accelerator build: {setup})" if setup else "")
                        + "; pass --config.mesh.platform=any to run anyway")


def mesh_from_config(mesh_section, check: bool = True, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The config's mesh over every device of the run (all processes); a shape that does not fit
    is one line naming the key and the allocation (processes x local devices). `check=False` skips
    the platform check (aot compiles for the target on fake CPU devices); `devices`: another set
    than this run's (aot: a TPU topology's devices, described by libtpu)."""
    if check:
        check_platform(mesh_section)
    try:
        return make_mesh(tuple(mesh_section.shape), tuple(mesh_section.axes), devices)
    except UserError as e:
        n, p = jax.device_count(), jax.process_count()
        raise UserError(f"config key mesh.shape={tuple(mesh_section.shape)}: {e} "
                        f"[this run: {p} process(es) x {jax.local_device_count()} local device(s) = {n}]") from None


def rules_dict(rules: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in rules}


def spec_for(axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
             rules: Sequence[tuple[str, Any]]) -> P:
    """PartitionSpec for logical axes; mesh axes that don't divide the dim are dropped."""
    table = rules_dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        keep = []
        size = 1
        for m in names:
            if m not in mesh.shape or m in used or mesh.shape[m] == 1:
                continue
            if shape is not None and shape[i] % (size * mesh.shape[m]):
                continue
            keep.append(m)
            size *= mesh.shape[m]
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def named_sharding(axes, shape, mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))


def tree_shardings(axes_tree: Any, abstract_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a pytree of arrays given a matching pytree of logical axes."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    return jax.tree.map(lambda ax, a: named_sharding(ax, a.shape, mesh, rules), axes_tree, abstract_tree,
                        is_leaf=is_axes)


def explain_sharding(axes_tree, abstract_tree, mesh, rules) -> list[str]:
    """Human-readable lines: leaf path, shape, spec."""
    sh = tree_shardings(axes_tree, abstract_tree, mesh, rules)
    flat, _ = jax.tree_util.tree_flatten_with_path(sh)
    shapes = jax.tree.leaves(abstract_tree)
    return [f"{jax.tree_util.keystr(p)} {tuple(a.shape)} {s.spec}" for (p, s), a in zip(flat, shapes)]


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Sequence[tuple[str, Any]] | None = None) -> Iterator[None]:
    """Activate activation-sharding constraints for code traced inside this context."""
    prev = dict(_ACTIVE)
    _ACTIVE["mesh"], _ACTIVE["rules"] = mesh, (rules if rules is not None else DEFAULT_RULES)
    try:
        yield
    finally:
        _ACTIVE.update(prev)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    mesh = _ACTIVE["mesh"]
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh, _ACTIVE["rules"]))


def shard_params(params: Any, axes_tree: Any, mesh: Mesh, rules) -> Any:
    """Place a host pytree onto the mesh."""
    shardings = tree_shardings(axes_tree, params, mesh, rules)
    return jax.tree.map(lambda a, s: jax.device_put(a, s), params, shardings)


def batch_shards(mesh: Mesh, rules=None) -> int:
    """How many ways the logical `batch` axis is split on `mesh` under `rules` (default: the
    default rules, data x fsdp): a global batch must be a multiple of it. The one place that says
    how batches are sharded; the trainer, the evaluation, `aot` and `generate` all ask here."""
    axes = rules_dict(rules if rules is not None else DEFAULT_RULES).get("batch")
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(math.prod(mesh.shape[a] for a in axes))


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Which rows of a global batch this process feeds: the one function of (mesh, process layout)
    the loader, the validation and evaluation batches, `share_prompt` and `aot` all use.

    A global batch of B rows is split into `shards` equal blocks along the mesh's batch axes
    (data x fsdp); block s goes to the devices at batch-coordinate s. A process feeds the blocks
    its devices hold, in order: so processes that hold replicas of one block (a tensor or fsdp axis
    spanning hosts) feed identical rows, and no process count has to divide the batch."""
    shards: int                       # blocks a global batch splits into
    held: tuple[int, ...]             # the blocks this process's devices hold, ascending
    owned: tuple[int, ...] = ()       # the held blocks no lower-numbered process holds: where one
                                      # process must act for all holders (extraction writes them)

    def check(self, batch: int, key: str) -> None:
        if batch % self.shards:
            raise UserError(f"config key {key}={batch} must be a multiple of {self.shards}, the number of batch "
                            f"shards of the mesh (data x fsdp)")

    def local_positions(self, batch: int) -> np.ndarray:
        """Positions in a global batch of `batch` rows that this process feeds, in order [b_local]."""
        per = batch // self.shards
        return np.concatenate([np.arange(s * per, (s + 1) * per) for s in self.held]).astype(np.int64)


def batch_layout(mesh: Mesh, rules=None, process_index: int | None = None) -> BatchLayout:
    """The BatchLayout of `process_index` (default: this process) on `mesh` under `rules`."""
    shards = batch_shards(mesh, rules)
    axes = rules_dict(rules if rules is not None else DEFAULT_RULES).get("batch")
    spec = P(axes) if axes is not None else P()
    where = NamedSharding(mesh, spec).devices_indices_map((shards,))     # device -> (slice into [shards],)
    me = jax.process_index() if process_index is None else process_index
    block = lambda idx: idx[0].start or 0            # a [shards] array: one block per slice
    held = sorted({block(idx) for dev, idx in where.items() if dev.process_index == me})
    lowest: dict[int, int] = {}
    for dev, idx in where.items():
        b = block(idx)
        lowest[b] = min(lowest.get(b, dev.process_index), dev.process_index)
    return BatchLayout(shards, tuple(held), tuple(b for b in held if lowest[b] == me))
