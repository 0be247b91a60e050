#!/usr/bin/env bash
# Run the trainer on every worker of a TPU VM pod slice (one process per host). JAX discovers the
# coordinator and process ids from the TPU metadata, so no --coordinator flag is needed.
#   TPU=my-v5e-64 ZONE=us-west4-a bash launch/tpu_vm.sh configs/llama3_3_70b.py --config.train.workdir=gs://bucket/run
# Set-up on every worker first:  SETUP=1 TPU=... ZONE=... bash launch/tpu_vm.sh
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-~/nla_jax}
if [[ ${SETUP:-0} == 1 ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
    "cd $REPO && bash launch/setup.sh && .venv/bin/pip install -q 'jax[tpu]==0.10.2'"
  exit 0
fi
[[ $# -ge 1 ]] || { echo "usage: TPU=.. ZONE=.. $0 CONFIG[:VARIANT] [train flags...]" >&2; exit 2; }
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO && PYTHONPATH=\$PWD .venv/bin/python -m nla_jax.train --config$args --config.model.dtype=bfloat16 --distributed-auto"
