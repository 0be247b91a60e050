#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
# If ../shared/peers exists, the PyTorch peers (transformers) are built in build/peers-venv so the
# parity tests against transformers run too; set NLA_SKIP_PEERS=1 to skip that.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build && bash launch/setup.sh
# System programs some tests drive for real: headless Chromium for the viewer/report browser tests
# (Playwright drives this system browser; it never downloads one) and SLURM + munge for a one-machine
# cluster (tests/test_slurm.py). Needs root and apt; without them those tests skip and say why.
want=()
command -v chromium >/dev/null || want+=(chromium)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
  want+=(slurm-wlm)
fi
command -v munged >/dev/null || want+=(munge)
if [[ ${#want[@]} -gt 0 && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}"; } \
    >/dev/null 2>&1 || echo "warning: could not install ${want[*]} (the tests that need them will skip)" >&2
fi
if [[ -z ${NLA_SKIP_PEERS:-} && -z ${NLA_PEERS_PYTHON:-} && -f ../shared/peers/setup.sh ]]; then
  if peers_py=$(bash ../shared/peers/setup.sh "$PWD/build/peers-venv" 2>build/peers-setup.log | tail -n 1); then
    export NLA_PEERS_PYTHON=$peers_py
  else
    echo "peers set-up failed (see build/peers-setup.log): transformers parity tests will skip" >&2
  fi
fi
# The TPU compiler (libtpu) in its own venv, .venv-tpu: tests/test_aot.py compiles for a TPU slice
# with it (no TPU needed). NLA_SKIP_TPU_COMPILE=1 skips it; without it those tests skip and say why.
if [[ -z ${NLA_SKIP_TPU_COMPILE:-} ]]; then
  bash launch/setup.sh tpu-compile >build/tpu-compile-setup.log 2>&1 \
    || echo "TPU compiler set-up failed (see build/tpu-compile-setup.log): the TPU aot tests will skip" >&2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec .venv/bin/python -m pytest -q "$@" tests
