"""Host malloc set-up (nla_jax/hostmem.py): freed big buffers are reused, not re-faulted, when the
backend is the CPU; on an accelerator (JAX_PLATFORMS, or an installed plugin) malloc is left alone.

Each case runs in a fresh interpreter: mallopt has to precede the threads it should cover, and
the pytest process itself must keep the system default. The plugin cases put a package of the
plugin's name on the path whose import fails loudly: the decision has to come from the name alone,
before jax (or the plugin) is imported.
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
assert "jax" not in sys.modules  # decided before JAX starts
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


def _probe(mode: str | None, **env: str) -> tuple[bool, int]:
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "NLA_HOST_MALLOC", "PYTHONPATH")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=REPO, mode=mode)], check=True,
                         capture_output=True, text=True, env={**base, **env}).stdout
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
    assert out.stderr.strip().splitlines() == ["error: NLA_HOST_MALLOC='fast': expected one of 'auto', 'reuse', 'system'"]


@glibc_only
def test_default_reuses_on_the_cpu_backend():
    applied, faults = _probe(None, JAX_PLATFORMS="cpu")
    assert applied and faults < 1000, faults


@glibc_only
@pytest.mark.parametrize("platforms", ["cuda", "tpu", "gpu,cpu"])
def test_default_leaves_malloc_alone_on_an_accelerator(platforms):
    applied, faults = _probe(None, JAX_PLATFORMS=platforms)
    assert not applied and faults > 100_000, faults
    # an explicit "reuse" still applies it
    assert _probe("reuse", JAX_PLATFORMS=platforms)[0]


def _fake_plugin(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    (d / "__init__.py").write_text("raise RuntimeError('imported: the backend must be decided from the name only')\n")
    return str(tmp_path)


@glibc_only
@pytest.mark.parametrize("plugin,backend", [("jax_cuda12_plugin", "gpu"), ("libtpu", "tpu")])
def test_installed_plugin_means_accelerator_unless_jax_platforms_says_cpu(tmp_path, plugin, backend):
    path = _fake_plugin(tmp_path, plugin)
    applied, faults = _probe(None, PYTHONPATH=path)
    assert not applied and faults > 100_000, faults
    assert _probe(None, PYTHONPATH=path, JAX_PLATFORMS="cpu")[0]
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r}); "
                          "from nla_jax import backend; print(backend.expected())"],
                         capture_output=True, text=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}, "PYTHONPATH": path})
    assert out.stdout.split() == [backend]
