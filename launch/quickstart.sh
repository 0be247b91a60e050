#!/usr/bin/env bash
# Set up (if needed) and run the whole NLA pipeline on the embedded default (SmolLM2-135M-Instruct),
# sized for a 2-core CPU (configs/smollm2_135m.py:quick; 21.3 min from a fresh clone on a quiet 2-core CPU, measured 2026-12-05 at a9bbdad):
#   quick corpus -> activations at block 20 -> warm-start texts -> SFT AV, SFT AR -> GRPO -> evaluation
# on held-out documents (fve_nrm with 95% CIs over documents beside the floor and shuffled controls).
# Every stage resumes: rerun after an interruption and it continues. Extra arguments go to the
# trainer, e.g. `bash launch/quickstart.sh --config.rl.steps=20`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=.venv/bin/python
cfg=configs/smollm2_135m.py:quick
$py -m nla_jax.data.default_corpus --out runs/quick_corpus --variant quick
$py -m nla_jax.extract --config $cfg
$py -m nla_jax.summarize --config $cfg
exec $py -m nla_jax.train --config $cfg "$@"
