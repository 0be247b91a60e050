"""Which JAX backend a process is going to get, decided from the environment without importing jax.

Some set-up has to happen before JAX starts (host malloc, `hostmem.tune_malloc`) or before its
backends are created (the CPU collectives of a multi-process run, `distributed.initialize`), and
depends on whether the computation runs on the host CPU or on an accelerator. JAX's own choice
is made later, when its first backend comes up: the first entry of JAX_PLATFORMS when that is set,
else the best installed plugin that finds a device. This module makes the same choice from what
is visible before then:

  JAX_PLATFORMS (or an explicit `platforms` string, e.g. `jax.config.jax_platforms`): its first
    entry, with JAX's aliases ("cuda"/"rocm" -> "gpu");
  otherwise an installed accelerator plugin, looked up by module name only (never imported):
    libtpu -> "tpu"; jax_cuda*_plugin / jax_rocm*_plugin -> "gpu";
  otherwise "cpu".

An installed plugin on a machine without its device makes JAX fall back to the CPU while this
says "gpu"/"tpu"; set JAX_PLATFORMS=cpu there (launchers for CPU runs do).
"""
from __future__ import annotations

import os
import pkgutil
import re

_GPU_PLUGIN = re.compile(r"^jax_(cuda|rocm)\d+_plugin$")
_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}


def installed_accelerator() -> str | None:
    """'tpu' or 'gpu' when an accelerator plugin is installed (module names only), else None."""
    names = {m.name for m in pkgutil.iter_modules()}
    if "libtpu" in names or os.environ.get("TPU_LIBRARY_PATH"):
        return "tpu"
    if any(_GPU_PLUGIN.match(n) for n in names):
        return "gpu"
    return None


def expected(platforms: str | None = None) -> str:
    """'cpu', 'gpu', 'tpu' (or another platform name JAX_PLATFORMS gives first): the backend JAX will
    use by default. `platforms`: a JAX_PLATFORMS-style list; default the environment variable."""
    if platforms is None:
        platforms = os.environ.get("JAX_PLATFORMS", "")
    first = next((p.strip().lower() for p in str(platforms).split(",") if p.strip()), "")
    if first:
        return _ALIASES.get(first, first)
    return installed_accelerator() or "cpu"


def is_cpu(platforms: str | None = None) -> bool:
    return expected(platforms) == "cpu"
