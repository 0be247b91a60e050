#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
# If ../shared/peers exists, the PyTorch peers (transformers) are built in build/peers-venv so the
# parity tests against transformers run too; set NLA_SKIP_PEERS=1 to skip that.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build && bash launch/setup.sh
if [[ -z ${NLA_SKIP_PEERS:-} && -z ${NLA_PEERS_PYTHON:-} && -f ../shared/peers/setup.sh ]]; then
  if peers_py=$(bash ../shared/peers/setup.sh "$PWD/build/peers-venv" 2>build/peers-setup.log | tail -n 1); then
    export NLA_PEERS_PYTHON=$peers_py
  else
    echo "peers set-up failed (see build/peers-setup.log): transformers parity tests will skip" >&2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec .venv/bin/python -m pytest -q "$@" tests
