"""TPU topologies for ahead-of-time compilation without the hardware, and the chips' published numbers.

libtpu (installed by `jax[tpu]`) describes a TPU slice from its name alone:
`jax.experimental.topologies.get_topology_desc("v5p:4x4x4", "tpu")` returns the slice's devices
with their physical coordinates, and `jit(...).lower(...).compile()` on a mesh of them runs the
real XLA:TPU compiler on this CPU-only machine (MaxText's train_compile works the same way). The
compiled program reports XLA:TPU's memory plan (`memory_analysis()`) and its cost model's time
(`cost_analysis()["optimal_seconds"]`): estimates, but the TPU compiler's own.

The TPU toolchain is kept out of the CPU install: `bash launch/setup.sh tpu-compile` makes
`.venv-tpu` (the pinned requirements + `jax[tpu]`), and the aot command runs there.

Peak bf16 dense FLOP/s and HBM per chip are Google Cloud's published figures (one JAX device per
chip on v5e, v5p, v6e); MFU estimates divide by them.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from jax.experimental import topologies

from nla_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str               # libtpu's generation name in topology strings
    hbm_gb: float           # per chip (one JAX device)
    peak_tflops_bf16: float  # dense, per chip
    dims: int               # topology dimensions (2 for the "lite" chips' 2-D tori, 3 for v4/v5p)


CHIPS = {
    "v4": Chip("v4", 32.0, 275.0, 3),
    "v5e": Chip("v5e", 16.0, 197.0, 2),
    "v5p": Chip("v5p", 95.0, 459.0, 3),
    "v6e": Chip("v6e", 32.0, 918.0, 2),
}
SETUP_HINT = "bash launch/setup.sh tpu-compile   (makes .venv-tpu; then run .venv-tpu/bin/python -m nla_jax.aot ...)"


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """("v5p:4x4x4") -> (the v5p chip, (4, 4, 4)); one line naming the value otherwise."""
    m = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)*)", name or "")
    if not m or m.group(1) not in CHIPS:
        raise UserError(f"TPU topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                        f"{', '.join(CHIPS)} (libtpu's names, e.g. v5p:2x2x2, v5e:4x4, v6e:8x8)")
    chip, dims = CHIPS[m.group(1)], tuple(int(x) for x in m.group(2).split("x"))
    if len(dims) != chip.dims or min(dims) < 1:
        raise UserError(f"TPU topology {name!r}: {chip.name} slices have {chip.dims} dimensions")
    return chip, dims


def chips(name: str) -> int:
    return math.prod(parse_topology(name)[1])


def have_compiler() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(name: str) -> list:
    """The devices of TPU slice `name` as libtpu describes it (no TPU needed; libtpu must be
    installed). Sets the environment libtpu otherwise probes for (and warns about) on a
    machine that is not a TPU VM."""
    chip, _ = parse_topology(name)
    if not have_compiler():
        raise UserError(f"--target {name}: the TPU compiler (libtpu) is not installed here; {SETUP_HINT}")
    n = chips(name)
    # ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu takes a machine-wide lockfile so that one process owns the
    # chips; a compile-only process owns none, and without it a second `aot` on the same machine
    # (two configs compiled in parallel, or the tests beside a run) is refused.
    for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", f"{chip.name}-{n}"),
                 ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(k, v)
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu's own message, in one line
        raise UserError(f"TPU topology {name!r}: libtpu refused it ({str(e).splitlines()[0][:200]})") from None
