"""Multi-process plumbing: `jax.distributed` start-up and host-local <-> global arrays.

One code path for 1 process and N: with a single process every helper here is the identity
(no collective runs). On CPU, processes talk through gloo collectives, so a "multi-host" run
can be tested for real as several processes on 127.0.0.1.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from nla_jax import backend
from nla_jax.errors import UserError

INIT_TIMEOUT_S = int(os.environ.get("NLA_DIST_INIT_TIMEOUT", "120"))


def initialize(coordinator: str | None, num_processes: int, process_id: int, auto: bool = False) -> None:
    """Start jax.distributed when more than one process is asked for (explicit timeout).

    auto=True: let JAX read the cluster from its environment (TPU VM metadata, SLURM), still
    with the explicit timeout. Under SLURM, JAX takes the process count and id from SLURM_NTASKS /
    SLURM_PROCID and the coordinator from the first node of SLURM_STEP_NODELIST, at port
    JAX_COORDINATOR_PORT (else 61440 + SLURM_JOB_ID % 4096; launch/slurm_gpu.sbatch picks a free one).
    On the CPU backend the processes exchange data through gloo in both modes.
    """
    if auto:
        if backend.is_cpu(jax.config.jax_platforms):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(initialization_timeout=INIT_TIMEOUT_S, local_device_ids=slurm_local_device_ids())
        return
    if num_processes <= 1:
        return
    if coordinator is None:
        raise UserError("--num-processes > 1 needs --coordinator host:port")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process-id {process_id} out of range for --num-processes {num_processes}")
    # Only the CPU client uses this setting; on GPU/TPU it is inert.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=INIT_TIMEOUT_S)


def slurm_local_device_ids(env=None) -> list[int] | None:
    """[] (no restriction: the process uses every device of its node) when the SLURM job step runs
    one task on each of its nodes, else None (JAX's default).

    JAX's SLURM detection otherwise restricts each process to the GPU numbered SLURM_LOCALID (one
    process per GPU), which with one process per node would leave it a single GPU of the node's
    eight. JAX_LOCAL_DEVICE_IDS, when set, still wins (JAX reads it when this returns None).
    SLURM_STEP_TASKS_PER_NODE looks like "1(x2)" or "2,1": tasks per node, run-length coded.
    """
    env = os.environ if env is None else env
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if env.get("JAX_LOCAL_DEVICE_IDS") or not spec or "SLURM_JOB_ID" not in env:
        return None
    counts = [part.split("(")[0] for part in spec.split(",")]
    return [] if counts and all(c == "1" for c in counts) else None


def _allgather_ints(x: int) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray([x])
    return np.asarray(multihost_utils.process_allgather(np.asarray([x], np.int64))).reshape(-1)


def allgather(x) -> np.ndarray:
    """Every process's host array x (same shape and dtype on each) stacked: [process_count, *x.shape]."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    return np.asarray(multihost_utils.process_allgather(x))


def max_over_processes(x: int) -> int:
    return int(_allgather_ints(int(x)).max())


def all_true(flag: bool) -> bool:
    return bool(_allgather_ints(int(bool(flag))).min())


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def global_batch(local: np.ndarray, sharding, rows: int):
    """This process's rows (those of the batch shards its devices hold, in order) -> one global
    array of `rows` rows (given, since replicas of a shard on several processes hide it)."""
    return jax.make_array_from_process_local_data(sharding, local, (rows,) + local.shape[1:])


def local_rows(x) -> np.ndarray:
    """The rows of a batch-sharded global array held by this process, in order, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    seen: dict[int, np.ndarray] = {}
    for s in x.addressable_shards:
        start = s.index[0].start or 0
        if start not in seen:
            seen[start] = np.asarray(s.data)
    return np.concatenate([seen[k] for k in sorted(seen)], axis=0)


def host_array(x) -> np.ndarray:
    """A global (possibly batch-sharded, possibly multi-process) array as one numpy array on every
    process: the all-gather every host-side reduction (ridge fits, evaluation scores) starts from."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
