#!/usr/bin/env bash
# One process on this machine (CPU, or every local GPU/TPU chip as one mesh).
#   bash launch/local.sh configs/smollm2_135m.py:quick [--stages sft_av,sft_ar] [--config.KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG[:VARIANT] [train flags...]" >&2; exit 2; }
cfg=$1; shift
bash launch/setup.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec .venv/bin/python -m nla_jax.train --config "$cfg" "$@"
