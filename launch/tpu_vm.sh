#!/usr/bin/env bash
# The trainer on every worker of a TPU VM pod slice, one process per host. JAX finds the other
# processes from the TPU metadata (--distributed-auto), so no coordinator is given.
#   export TPU=my-v5p-128 ZONE=us-east5-a [PROJECT=my-project] [REPO=nla_jax]
#   bash launch/tpu_vm.sh setup          # copy this repository to every worker + PLATFORM=tpu launch/setup.sh
#   bash launch/tpu_vm.sh run configs/llama3_3_70b.py:v5p64 \
#       --config.model.source=/mnt/shared/Llama-3.3-70B-Instruct --config.train.workdir=/mnt/shared/runs/llama70b
#   bash launch/tpu_vm.sh logs [LINES]   # the last lines of every worker's log (default 40)
#   bash launch/tpu_vm.sh fetch-logs DIR # copy every worker's log into DIR
#   bash launch/tpu_vm.sh stop           # end the run on every worker
# `--dry-run` before the subcommand (or DRY_RUN=1) prints each command instead of running it.
#
# sync (also done by setup and run): this working tree minus what git ignores (uncommitted edits
# and new files included), as one tarball copied to every worker and unpacked into REPO there.
# REPO is a path on the workers, relative to the remote home unless absolute (default nla_jax);
# it is never expanded here. run starts the trainer detached (setsid nohup): a dropped ssh
# connection does not end it. Each worker logs to REPO/logs/worker-<its hostname>.log (pid in
# .pid). Arguments after CONFIG go to the trainer last, so they override anything set here.
# The store and the work directory must be paths every worker sees (a shared mount such as
# Filestore or gcsfuse); the mesh (mesh.shape) must multiply to the slice's chips: :v5p64 and the
# default llama3_3_70b mesh (1, 8, 8) are 64 chips, i.e. a v5p-128 (16 hosts of 4 chips).
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "error: $*" >&2; exit 2; }
usage="usage: TPU=.. ZONE=.. $0 [--dry-run] {setup | run CONFIG[:VARIANT] [train flags...] | logs [LINES] | fetch-logs DIR | stop}"
dry=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
[[ $# -ge 1 ]] || die "$usage"
cmd=$1; shift
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
repo=${REPO:-nla_jax}
repo=${repo#\~/}                        # '~/x' given literally: the same as x (relative to the remote home)
[[ -n $repo && $repo != "~" ]] || die "REPO must name a directory on the workers (relative to the remote home)"
r=$(printf '%q' "$repo")                # REPO as one word of the remote shell's command line
tarball_remote=.nla_jax-sync.tar.gz     # in the remote home, removed after unpacking
gflags=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then gflags+=(--project="$PROJECT"); fi

# quote WORD: WORD as the shell reads it back, single-quoted unless it is plain
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
# run COMMAND ARGS...: execute it, or under --dry-run print it as one shell-quoted line
run() {
  if [[ $dry == 1 ]]; then
    local out=() a
    for a in "$@"; do out+=("$(quote "$a")"); done
    echo "${out[*]}"
  else
    "$@"
  fi
}
on_workers() { run gcloud compute tpus tpu-vm ssh "$TPU" "${gflags[@]}" --worker=all --command="$1"; }

sync() {
  local tmp tree
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # expand tmp now: the trap runs after this function returns
  trap "rm -rf '$tmp'" EXIT
  # the working tree as git sees it (tracked files with their edits, new files, minus the ignored
  # ones: .venv, runs, build) as a tree object, through a scratch index: the real index is untouched
  cp "$(git rev-parse --git-path index)" "$tmp/index" 2>/dev/null || true
  GIT_INDEX_FILE=$tmp/index git add -A
  # a .venv / build / runs that is a symlink escapes the ignore rules (they match directories)
  GIT_INDEX_FILE=$tmp/index git rm -r -q --cached --ignore-unmatch -- .venv build runs
  tree=$(GIT_INDEX_FILE=$tmp/index git write-tree)
  run git archive --format=tar.gz -o "$tmp/nla_jax.tar.gz" "$tree"
  run gcloud compute tpus tpu-vm scp "$tmp/nla_jax.tar.gz" "$TPU:$tarball_remote" "${gflags[@]}" --worker=all
  on_workers "mkdir -p $r && tar -xzf $tarball_remote -C $r && rm -f $tarball_remote"
}

case $cmd in
  setup)
    [[ $# -eq 0 ]] || die "$usage"
    sync
    on_workers "cd $r && PLATFORM=tpu${PYTHON:+ PYTHON=$(printf '%q' "$PYTHON")} bash launch/setup.sh" ;;
  run)
    [[ $# -ge 1 ]] || die "$usage"
    cfg=$1; shift
    [[ -f ${cfg%%:*} ]] || die "config file ${cfg%%:*} does not exist (give it relative to the repository root)"
    train=$(printf ' %q' .venv/bin/python -m nla_jax.train --distributed-auto --config "$cfg" "$@")
    # On each worker: refuse while its previous run is still going, else start detached, record the pid.
    # shellcheck disable=SC2016  # $(hostname), $log, $pid, $! and $PWD expand on the worker
    {
      start="cd $r || exit 1; mkdir -p logs"
      start+='; log=logs/worker-$(hostname).log; pid=logs/worker-$(hostname).pid'
      start+='; if [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null; then'
      start+=' echo "$(hostname): a run is still going (pid $(cat "$pid")); stop it first" >&2; exit 1; fi'
      start+="; PYTHONPATH=\$PWD setsid nohup$train"
      start+=' >"$log" 2>&1 </dev/null & echo $! >"$pid"; echo "$(hostname): started pid $(cat "$pid"), log $PWD/$log"'
    }
    sync
    on_workers "$start" ;;
  logs)
    lines=${1:-40}
    [[ $lines =~ ^[0-9]+$ ]] || die "logs LINES: expected a number, got '$lines'"
    on_workers "for f in $r/logs/worker-*.log; do echo \"== \$f\"; tail -n $lines \"\$f\"; done" ;;
  fetch-logs)
    [[ $# -eq 1 ]] || die "$usage"
    [[ $dry == 1 ]] || mkdir -p "$1"
    run gcloud compute tpus tpu-vm scp --recurse "$TPU:$repo/logs" "$1" "${gflags[@]}" --worker=all ;;
  stop)
    [[ $# -eq 0 ]] || die "$usage"
    # shellcheck disable=SC2016  # expands on the worker
    on_workers "cd $r || exit 1"'; pid=logs/worker-$(hostname).pid; if [ -f "$pid" ] && kill -- -"$(cat "$pid")" 2>/dev/null; then echo "$(hostname): stopped"; else echo "$(hostname): nothing running"; fi' ;;
  *)
    die "unknown subcommand '$cmd'; $usage" ;;
esac
