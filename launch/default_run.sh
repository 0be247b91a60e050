#!/usr/bin/env bash
# The default config end to end on the embedded default (configs/smollm2_135m.py): the full corpus
# (3,000 documents, ~24k activation rows at block 20) -> warm-start texts -> SFT AV (1,500 steps),
# SFT AR (1,500) -> GRPO (300) -> the eval stage on 384 held-out rows over >= 150 documents, judged
# by the SFT AR too. About 6-7 hours of a quiet 2-core CPU
# (SFT AV ~2 h, SFT AR ~1.7 h, GRPO ~1.5 h at ~5 / ~4 / ~18 s a step). Every stage resumes from its last checkpoint:
# rerun the same command after an interruption (a killed job, a new session) and it continues.
# Extra arguments go to the trainer. Afterwards, the HTML report and a standalone evaluation:
#   .venv/bin/python -m nla_jax.evaluate --config configs/smollm2_135m.py \
#     --checkpoint runs/smollm2_135m/train/sft_av --checkpoint runs/smollm2_135m/train/rl \
#     --judge runs/smollm2_135m/train/sft_av --out runs/smollm2_135m/evaluate
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=.venv/bin/python
cfg=configs/smollm2_135m.py
$py -m nla_jax.data.default_corpus --out runs/default_corpus
$py -m nla_jax.extract --config $cfg
$py -m nla_jax.summarize --config $cfg
exec $py -m nla_jax.train --config $cfg "$@"
