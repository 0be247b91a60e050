#!/usr/bin/env bash
# N JAX processes on 127.0.0.1 forming one global mesh (CPU, gloo collectives): the multi-host code
# path on one machine. Each process gets DEVICES fake CPU devices.
#   N=2 DEVICES=2 bash launch/local_multiprocess.sh configs/tiny.py --config.mesh.shape="(4,1,1)" ...
# Logs: WORKDIR_LOGS (default runs/multiprocess-logs)/process-I.log; exits non-zero if any process fails.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: N=2 DEVICES=2 $0 CONFIG[:VARIANT] [train flags...]" >&2; exit 2; }
cfg=$1; shift
N=${N:-2}; DEVICES=${DEVICES:-1}
logs=${WORKDIR_LOGS:-runs/multiprocess-logs}
mkdir -p "$logs"
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
pids=()
for ((i = 0; i < N; i++)); do
  .venv/bin/python -m nla_jax.train --config "$cfg" --coordinator "127.0.0.1:$port" \
    --num-processes "$N" --process-id "$i" "$@" >"$logs/process-$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then status=1; echo "process $i failed; see $logs/process-$i.log" >&2; fi
done
tail -n 20 "$logs/process-0.log"
exit $status
