"""launch/slurm_gpu.sbatch on a real SLURM cluster of one machine (slurmctld + slurmd + munged).

The trainer submitted through the project's own sbatch script as 2 SLURM tasks x 2 fake CPU devices
(NLA_PLATFORM=cpu), which find each other through JAX's SLURM auto-detection (--distributed-auto:
SLURM_NTASKS, SLURM_PROCID, the step's first node, JAX_COORDINATOR_PORT from the script), ends with
the rl metrics and parameters of 1 process x 4 devices (test_train's comparison); a mesh that does
not fit the allocation stops both tasks with one line naming mesh.shape and the device count.

The cluster: a module fixture starts Debian's munged, slurmctld and slurmd as root with every key,
state, spool, log and pid file in a temp dir and ports the kernel said were free; teardown cancels
its jobs and ends exactly the daemons it started (their pid files). One node, named after this
machine's hostname (which has to resolve), 2 CPUs; the job asks for 2 tasks on it
(`--ntasks-per-node=2` on the sbatch command line overrides the script's one task per node). Why
not two nodes: Debian's slurmd can run twice on one machine (`NodeName=n[1-2]` with their own
ports, `slurmd -N n1`; tried), but JAX takes the coordinator's host from the first name of
SLURM_STEP_NODELIST, and invented node names do not resolve ("localhost" is special to slurm, which
also sorts the names); one node under the real hostname keeps JAX's detection fully automatic, as on
a real cluster. Skips (with the reason) when not root, when slurm-wlm / munge are not installed
(launch/test.sh installs them when root), or when the daemons do not come up.
"""
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from test_train import REPO, RL_MESH, TINY, _assert_same_rl_run, _build_store, _env, _train

SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-n:])
    except OSError:
        return "(no log)"


def _conf(d, node, ctld_port, slurmd_port):
    """A minimal slurm.conf: one node of 2 CPUs, no cgroups, no accounting, no MPI."""
    return "\n".join([
        "ClusterName=nlatest",
        f"SlurmctldHost={node}(127.0.0.1)",
        "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge", f"AuthInfo=socket={d}/munge/munge.sock", "CredType=cred/munge",
        f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin",
        "SlurmdParameters=config_overrides",     # 2 CPUs as configured, whatever the machine has
        "ReturnToService=2", "KillWait=5", "InactiveLimit=0",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n"


def _alive(pid):
    """Running (a daemon's exited zombie, left to an init that does not reap, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop(pid_file):
    """End the daemon whose pid file this is (SIGTERM, then SIGKILL after 10 s)."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """{"env": environment for the slurm commands, "dir": the cluster's temp dir}."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM daemons run as root here (slurmd starts jobs as their user); not root")
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; launch/test.sh does as root)")
    node = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(node)
    except OSError:
        pytest.skip(f"this machine's hostname {node!r} does not resolve (JAX's SLURM coordinator is the node name)")
    d = str(tmp_path_factory.mktemp("slurm"))
    os.chmod(d, 0o700)
    for sub in ("munge", "state", "spool", "log"):
        os.makedirs(os.path.join(d, sub), mode=0o700)
    key = os.path.join(d, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    ctld_port, slurmd_port = _free_ports(2)
    conf = os.path.join(d, "slurm.conf")
    with open(conf, "w") as f:
        f.write(_conf(d, node, ctld_port, slurmd_port))
    env = dict(os.environ, SLURM_CONF=conf)
    started = []
    try:
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={d}/munge/munge.sock",
                        f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/log/munged.log",
                        f"--seed-file={d}/munge/munged.seed"], check=True, capture_output=True, timeout=30)
        started.append(f"{d}/munge/munged.pid")
        subprocess.run(["slurmctld", "-f", conf, "-i"], env=env, check=True, capture_output=True, timeout=30)
        started.append(f"{d}/slurmctld.pid")
        subprocess.run(["slurmd", "-f", conf], env=env, check=True, capture_output=True, timeout=30)
        started.append(f"{d}/slurmd.pid")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        for pid_file in reversed(started):
            _stop(pid_file)
        pytest.skip(f"could not start the SLURM daemons ({e}): slurmctld log: {_tail(f'{d}/log/slurmctld.log')}; "
                    f"slurmd log: {_tail(f'{d}/log/slurmd.log')}")
    state = ""
    for _ in range(300):   # the node registers within seconds
        r = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], env=env, capture_output=True, text=True)
        state = r.stdout.strip()
        if state == "idle":
            break
        time.sleep(0.1)
    if state != "idle":
        for pid_file in reversed(started):
            _stop(pid_file)
        pytest.skip(f"the SLURM node did not come up (state {state!r}): slurmd log: {_tail(f'{d}/log/slurmd.log')}")
    yield {"env": env, "dir": d}
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
    for _ in range(100):
        if not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip():
            break
        time.sleep(0.1)
    for pid_file in reversed(started):
        _stop(pid_file)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _build_store(tmp_path_factory.mktemp("slurm_store"))


def _submit(cluster, out, *train_args, devices_per_task=2):
    """sbatch --wait the project's script as 2 tasks on the one node; (exit status, job output)."""
    env = dict(_env(), **cluster["env"], NLA_PLATFORM="cpu", DEVICES_PER_TASK=str(devices_per_task))
    r = subprocess.run(["sbatch", "--wait", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
                        "--time=15", f"--output={out}", f"--chdir={REPO}", SBATCH, TINY, *train_args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    try:
        with open(out, errors="replace") as f:
            log = f.read()
    except OSError:
        log = ""
    return r, log


@pytest.mark.timeout(900)
def test_two_slurm_tasks_match_one_process(cluster, store, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r, log = _submit(cluster, str(tmp_path / "job.out"), f"--config.data.store={store}",
                     f"--config.train.workdir={two}", *RL_MESH)
    assert r.returncode == 0, (r.stderr[-2000:], log[-4000:])
    assert "1 node(s) x 2 process(es), platform cpu, coordinator port" in log, log[-4000:]
    # srun --label: both tasks ran the trainer to its end
    assert "0: done in" in log and "1: done in" in log, log[-4000:]
    r1 = _train(store, one, *RL_MESH, devices=4)
    assert r1.returncode == 0, r1.stderr[-3000:]
    _assert_same_rl_run(one, two)


@pytest.mark.timeout(600)
def test_mesh_that_does_not_fit_the_allocation_is_one_line(cluster, store, tmp_path):
    wd = str(tmp_path / "w")
    r, log = _submit(cluster, str(tmp_path / "job.out"), f"--config.data.store={store}",
                     f"--config.train.workdir={wd}", *RL_MESH[:-1], "--config.mesh.shape=(8,1,1)")
    assert r.returncode != 0, log[-4000:]
    errors = [ln for ln in log.splitlines() if "error:" in ln]
    assert errors and all("Traceback" not in ln for ln in log.splitlines()), log[-4000:]
    want = ("config key mesh.shape=(8, 1, 1): mesh shape (8, 1, 1) needs 8 devices but 4 are available",
            "[this run: 2 process(es) x 2 local device(s) = 4]")
    assert any(all(w in ln for w in want) for ln in errors), errors
    assert not os.path.exists(wd)
