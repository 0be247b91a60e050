#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
# If ../shared/peers exists, the PyTorch peers (transformers) are built in build/peers-venv so the
# parity tests against transformers run too; set NLA_SKIP_PEERS=1 to skip that.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build && bash launch/setup.sh
# Headless Chromium for the viewer/report browser tests (Playwright drives this system browser; it
# never downloads one). Needs root and apt; without them those tests skip and say why.
if ! command -v chromium >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "warning: could not install chromium (browser tests will skip)" >&2
fi
if [[ -z ${NLA_SKIP_PEERS:-} && -z ${NLA_PEERS_PYTHON:-} && -f ../shared/peers/setup.sh ]]; then
  if peers_py=$(bash ../shared/peers/setup.sh "$PWD/build/peers-venv" 2>build/peers-setup.log | tail -n 1); then
    export NLA_PEERS_PYTHON=$peers_py
  else
    echo "peers set-up failed (see build/peers-setup.log): transformers parity tests will skip" >&2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec .venv/bin/python -m pytest -q "$@" tests
