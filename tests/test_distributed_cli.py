"""The distributed flags every program that runs a model shares (`cli.add_distributed_flags`).

Covers: extract, summarize, train, evaluate, explain and export all take --coordinator /
--num-processes / --process-id / --distributed-auto; --distributed-auto with explicit process flags
is one line; export refuses several processes with its one line before connecting to anyone;
summarize as 2 processes on gloo (127.0.0.1) writes the same summaries.jsonl, byte for byte, as one
process (batches shared round-robin, process 0 the only writer; 3 batches, so one process idles a
round); evaluate as 2 processes x 1 device reports what 1 process x 2 devices does; which SLURM steps get every device of their node (`distributed.slurm_local_device_ids`).
The trainer's and extraction's multi-process runs are tested in test_train.py / test_extract.py,
the SLURM auto-detection in test_slurm.py.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from _tiny_run import tiny_store
from nla_jax import distributed, evaluate, explain, export, extract, summarize, train
from nla_jax.cli import start_distributed
from nla_jax.errors import UserError
from test_train import REPO, TINY, _communicate_all, _env, _free_port, _one_error_line

FLAGS = ("--coordinator", "--num-processes", "--process-id", "--distributed-auto")


@pytest.mark.parametrize("program", [extract, summarize, train, evaluate, explain, export],
                         ids=lambda m: m.__name__.split(".")[-1])
def test_every_model_program_takes_the_distributed_flags(program):
    text = program.build_parser().format_help()
    for flag in FLAGS:
        assert flag in text, (program.__name__, flag)


def test_auto_with_explicit_process_flags_is_refused():
    args = argparse.Namespace(coordinator="h:1", num_processes=2, process_id=0, distributed_auto=True)
    with pytest.raises(UserError, match="--distributed-auto discovers the processes"):
        start_distributed(args)


def test_export_refuses_several_processes_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nla_jax.export", "--checkpoint", str(tmp_path / "w"),
                        "--out", str(tmp_path / "hf"), "--coordinator", f"127.0.0.1:{_free_port()}",
                        "--num-processes", "2", "--process-id", "1"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert _one_error_line(r) == f"error: {export.ONE_PROCESS}"
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("spec,ids", [
    ("1(x2)", []), ("1", []), ("1,1(x3)", []),           # one task on every node: all its GPUs
    ("2", None), ("8(x2)", None), ("1,2", None),          # several on some node: JAX's one GPU per task
])
def test_slurm_steps_with_one_task_per_node_see_every_device(spec, ids):
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_TASKS_PER_NODE": spec}
    assert distributed.slurm_local_device_ids(env) == ids
    assert distributed.slurm_local_device_ids({**env, "JAX_LOCAL_DEVICE_IDS": "0,1"}) is None  # the user's choice
    assert distributed.slurm_local_device_ids({"SLURM_STEP_TASKS_PER_NODE": spec}) is None     # not a SLURM job


@pytest.mark.timeout(600)
def test_summarize_two_processes_write_what_one_does(tmp_path_factory, tmp_path):
    src = tiny_store(tmp_path_factory)
    stores = {}
    for name in ("one", "two"):
        stores[name] = str(tmp_path / name)
        shutil.copytree(src, stores[name])
        os.remove(os.path.join(stores[name], "summaries.jsonl"))   # the quote texts the fixture made
    common = ["--config", TINY, "--config.summarize.teacher=target", "--config.summarize.batch=2",
              "--config.summarize.max_new_tokens=6", "--config.summarize.temperature=1.0", "--limit", "5"]
    r = subprocess.run([sys.executable, "-m", "nla_jax.summarize", *common, f"--config.data.store={stores['one']}"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "nla_jax.summarize", *common,
                               f"--config.data.store={stores['two']}", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = _communicate_all(procs, timeout=300)
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    with open(os.path.join(stores["one"], "summaries.jsonl"), "rb") as f:
        one = f.read()
    with open(os.path.join(stores["two"], "summaries.jsonl"), "rb") as f:
        two = f.read()
    assert len(one.splitlines()) == 5 and one == two


@pytest.mark.timeout(900)
def test_evaluate_two_processes_report_what_one_does(tmp_path_factory, tmp_path):
    """evaluate as 2 processes x 1 device on a (2,1,1) mesh (each process feeds its data shard of
    every batch) reports the numbers 1 process x 2 devices reports on the same mesh. It used to
    crash before computing anything: the checkpoint metadata read started the JAX backend before
    jax.distributed was initialised."""
    from _tiny_run import trained_workdir
    wd = trained_workdir(tmp_path_factory)
    store = tiny_store(tmp_path_factory)
    common = ["--config", TINY, f"--config.data.store={store}", "--checkpoint", wd,
              "--config.mesh.shape=(2,1,1)", "--config.eval.batch=4", "--config.eval.n_boot=50"]
    r = subprocess.run([sys.executable, "-m", "nla_jax.evaluate", *common, "--out", str(tmp_path / "one")],
                       cwd=REPO, env=_env(devices=2), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "nla_jax.evaluate", *common, "--out", str(tmp_path / "two"),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=REPO, env=_env(devices=1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    outs = _communicate_all(procs, timeout=600)
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    one, two = ({k: v for k, v in json.load(open(tmp_path / d / "evaluate.json")).items()
                 if k not in ("command", "elapsed_s")} for d in ("one", "two"))
    assert one["devices"] == two["devices"] == 2
    assert one == two
