"""Host malloc set-up (nla_jax/hostmem.py): freed big buffers are reused, not re-faulted.

Each case runs in a fresh interpreter: mallopt has to precede the threads it should cover, and
the pytest process itself must keep the system default.
"""
import os
import platform
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate, touch and free a 256 MiB buffer three times (what XLA:CPU does with a step's
# temporaries); print the minor page faults of the last two rounds.
PROBE = r"""
import ctypes, resource, sys
sys.path.insert(0, {repo!r})
from nla_jax import hostmem
applied = hostmem.tune_malloc({mode!r})
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20
faults = []
for i in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, faults[1] + faults[2])
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")


def _probe(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=REPO, mode=mode)], check=True,
                         capture_output=True, text=True, env={**os.environ, "NLA_HOST_MALLOC": ""}).stdout
    applied, faults = out.split()
    return applied == "True", int(faults)


@glibc_only
def test_reuse_keeps_freed_buffers_mapped():
    applied, faults = _probe("reuse")
    assert applied
    # 2 x 256 MiB re-touched: 131,072 4-KiB pages if each round were a fresh mapping
    assert faults < 1000, faults


@glibc_only
def test_system_mode_leaves_malloc_alone():
    # The control: glibc's default serves 256 MiB with mmap and unmaps it on free, so every round
    # faults its pages in again. If this ever stops holding, the test above proves nothing.
    applied, faults = _probe("system")
    assert not applied
    assert faults > 100_000, faults


def test_bad_mode_is_one_line_error_from_a_cli():
    out = subprocess.run([sys.executable, "-m", "nla_jax.generate", "--help"], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "NLA_HOST_MALLOC": "fast"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: NLA_HOST_MALLOC='fast': expected 'reuse' or 'system'"]
