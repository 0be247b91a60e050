#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default model.
# Until the NLA pipeline lands this is: a chat reply from SmolLM2-135M-Instruct and the block-K
# residual-stream norms of the prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec .venv/bin/python -m nla_jax.generate --config configs/smollm2_135m.py \
  --prompt "${1:-What is the capital of France?}" --greedy --max-new-tokens 64 --norms
