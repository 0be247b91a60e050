"""nla_jax.aot: the steps of a real mid-size architecture (Qwen2.5-0.5B) compile ahead of time for
8 fake devices from abstract arrays, report per-device memory, and fit an H100; a budget they cannot
fit exits non-zero with one line. With the TPU compiler installed (.venv-tpu, `bash launch/setup.sh
tpu-compile`; launch/test.sh makes it), the GRPO step compiles with XLA:TPU for a v5e-8 slice and fits,
and a too-small HBM fails; without it those tests skip and say why.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/qwen2_5_0_5b.py"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("NLA_AOT_CHILD", None)
    return env


def _aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nla_jax.aot", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900)


def test_kernel_attention_on_fake_cpu_devices_compiles_the_reference():
    """A TPU / cuDNN kernel cannot be built for fake CPU devices: the estimate uses the einsum and says so."""
    r = _aot("--config", CONFIG, "--config.model.attention=splash", "--steps", "sft_ar")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "model.attention=splash is compiled as 'einsum' on the fake CPU devices" in r.stderr
    assert "attention=einsum" in r.stdout


def test_grpo_step_compiles_for_8_devices_and_fits(tmp_path):
    out = tmp_path / "aot.json"
    r = _aot("--config", CONFIG, "--steps", "rl", "--json", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("rl ")]
    assert len(table) == 1 and table[0].split()[-1] == "yes", r.stdout
    assert "XLA:CPU" in r.stdout  # says the numbers are an estimate
    rep = json.loads(out.read_text())
    assert rep["model"] == "Qwen2.5-0.5B-Instruct" and rep["target"]["devices"] == 8
    assert rep["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    (row,) = rep["steps"]
    assert row["step"] == "rl" and row["fits"]
    assert 0 < row["argument_gb"] < row["total_gb"] <= rep["budget_gb"]
    assert row["temp_gb"] > 0 and row["compile_s"] > 0
    # The arguments are the sharded state and the reference AV (plus a [16, 896] batch): their
    # per-device bytes, computed from the shardings, match XLA's count, and are about 1/8 of the
    # unsharded bytes: the AV's float32 master weights 4 bytes a param (Adam mu and nu likewise, for
    # all but the frozen embeddings); the frozen reference AV in the bf16 compute dtype, 2 bytes.
    parts = row["parts_gb"]
    assert abs(row["argument_gb"] - sum(parts.values())) < 0.001
    params = rep["params"]  # 0.494B, tied embeddings
    assert rep["dtype"] == "bfloat16" and rep["weight_dtype"] == "float32"
    assert abs(parts["av"] - 4 * params / 8 / 1e9) < 0.01
    assert abs(parts["ref_av"] - parts["av"] / 2) < 1e-6
    # donated state: the new state is written over the old one
    assert row["alias_gb"] > 0.9 * (row["argument_gb"] - parts["ref_av"])


def test_budget_it_cannot_fit_exits_nonzero_with_one_line(capfd):
    # In-process with jax already started (one CPU device): aot re-runs itself in a fresh process
    # with 8 devices and returns that process's exit status.
    import jax
    jax.devices()
    from nla_jax import aot
    rc = aot.main(["--config", CONFIG, "--steps", "sft_ar", "--config.aot.device_memory_gb=0.001"])
    out, err = capfd.readouterr()
    assert rc == 2, out + err
    assert "re-running in a fresh process with 8 CPU devices" in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "does not fit" in errors[0] and "sft_ar needs" in errors[0] and "aot.device_memory_gb" in errors[0]
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("sft_ar ")] == ["NO"]


def test_real_scale_configs_describe_their_machine():
    """Every real-scale config: the mesh uses exactly aot.devices, the trainer's config checks pass on
    model.arch, and the architecture has the published parameter count (no compile here)."""
    import math

    from nla_jax import aot, configlib
    from nla_jax.nla import run as run_lib
    from nla_jax.models import transformer as T
    # 1e9 params (Gemma-3: the text model; the released 12.2B / 27.4B include the ~0.4B vision tower)
    expected = {"qwen2_5_0_5b.py": 0.494, "qwen2_5_7b.py": 7.616, "llama3_3_70b.py": 70.554,
                "gemma3_12b.py": 11.766, "gemma3_27b.py": 27.009}
    for name, billions in expected.items():
        tpu = {"llama3_3_70b.py": ":v5p64", "qwen2_5_7b.py": ":v5p8", "qwen2_5_0_5b.py": ":v5e8",
               "gemma3_12b.py": ":v5p16", "gemma3_27b.py": ":v5p32"}
        for variant in ("", tpu[name]):
            cfg = configlib.get(os.path.join(REPO, "configs", name) + variant)
            assert math.prod(cfg.mesh.shape) == cfg.aot.devices, (name, variant)
            if variant:        # every real-scale config has a TPU variant whose slice has its devices
                from nla_jax import accelerators
                assert cfg.mesh.platform == "tpu" and accelerators.chips(cfg.aot.topology) == cfg.aot.devices
            assert cfg.model.dtype == "bfloat16" and cfg.model.remat == "full" and cfg.av.max_len == 150
            assert 4 <= cfg.rl.group_size <= 8
            aot.check(cfg)
            m = run_lib.model_config_from_arch(cfg)
            n = sum(math.prod(a.shape) for a in __import__("jax").tree.leaves(T.abstract_params(m)))
            assert abs(n / 1e9 - billions) < 0.005, (name, n)
            assert abs(cfg.model.layer / m.n_layers - 2 / 3) < 0.06, (name, cfg.model.layer)


def test_inference_rows_hold_the_pair_without_optimizer_state(tmp_path):
    """explain (evaluate's and explain's per-batch program) holds the pair in the bf16 compute dtype,
    2 bytes a param (the AV's input projection and the AR head stay float32), no optimizer state;
    export holds the float32 masters and gathers one model at a time on process 0's host."""
    out = tmp_path / "aot.json"
    r = _aot("--config", CONFIG, "--steps", "explain,export", "--json", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rep = json.loads(out.read_text())
    ex, exp = rep["steps"]
    assert ex["step"] == "explain" and exp["step"] == "export" and ex["fits"] and exp["fits"]
    params, d, K, n = rep["params"], 896, rep["layer"], 24      # Qwen2.5-0.5B: d=896, 24 blocks
    # the AV is the whole model; the AR blocks 0..K (+ embeddings) and a d x d float32 head
    assert abs(ex["parts_gb"]["av"] - 2 * params / 8 / 1e9) < 0.01
    assert abs(exp["parts_gb"]["av"] - 2 * ex["parts_gb"]["av"]) < 0.01
    assert ex["parts_gb"]["ar"] < ex["parts_gb"]["av"] and K < n
    assert abs(ex["argument_gb"] - sum(ex["parts_gb"].values())) < 0.002   # + a [16, 896] batch
    assert ex["temp_gb"] > 0 and ex["compile_s"] > 0
    assert exp["compile_s"] == 0 and abs(exp["host_gb"] - 4 * params / 1e9) < 0.01
    assert d * d * 4 / 8 / 1e9 < ex["parts_gb"]["ar"]


TPU_PYTHON = os.path.join(REPO, ".venv-tpu", "bin", "python")
needs_tpu_compiler = pytest.mark.skipif(
    not os.path.exists(TPU_PYTHON), reason=f"no TPU compiler: {TPU_PYTHON} is missing (bash launch/setup.sh tpu-compile)")


def _aot_tpu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TPU_PYTHON, "-m", "nla_jax.aot", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=900)


@needs_tpu_compiler
def test_grpo_step_compiles_with_the_tpu_compiler_for_a_v5e_slice(tmp_path):
    """XLA:TPU (libtpu, no TPU attached) compiles the 0.5B GRPO step for the 8 chips of a v5e-8 slice
    on the trainer's shardings, and its memory plan fits a 16 GB chip with the float32 masters."""
    out = tmp_path / "aot.json"
    r = _aot_tpu("--config", CONFIG + ":v5e8", "--steps", "rl", "--no-time", "--json", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "compiled by XLA:TPU" in r.stdout and "XLA:TPU's memory analysis" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["target"]["topology"] == "v5e:2x4" and rep["target"]["devices"] == 8
    assert rep["bf16_as"] == "bf16"                     # the real dtype: no float16 stand-in on TPU
    (row,) = rep["steps"]
    assert row["fits"] and 0 < row["argument_gb"] < row["total_gb"] <= rep["budget_gb"] < 16
    # arguments are the same sharded state whichever compiler plans it (see the XLA:CPU test above)
    assert abs(row["parts_gb"]["av"] - 4 * rep["params"] / 8 / 1e9) < 0.01
    assert row["model_flops"] > 0 and row["est_mfu"] is None       # --no-time: no cost-model time
    # the TPU variant attends with the splash kernel: its Pallas calls are in the compiled program
    assert "attention=splash" in r.stdout and row["kernel_calls"] > 0


@needs_tpu_compiler
def test_tpu_step_that_does_not_fit_exits_nonzero_with_one_line():
    """...also while another process has libtpu loaded (its machine-wide lockfile once refused a second
    compile-only process: two aot runs, or the tests beside one)."""
    hold = ("import os, time; os.environ.update(TPU_SKIP_MDS_QUERY='1', TPU_ACCELERATOR_TYPE='v5litepod-8', "
            "TPU_WORKER_HOSTNAMES='localhost', TPU_WORKER_ID='0'); "
            "from jax.experimental import topologies\n"
            "try:\n    topologies.get_topology_desc(topology_name='v5e:2x4', platform='tpu')\n"
            "except Exception as e:\n    print('busy' if 'lockfile' in str(e) else repr(e), flush=True); raise SystemExit\n"
            "print('held', flush=True); time.sleep(900)")
    # a plain libtpu user takes the lockfile ("busy": some other process on this machine already has it)
    env = {k: v for k, v in _env().items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    holder = subprocess.Popen([TPU_PYTHON, "-c", hold], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() in ("held", "busy")
        r = _aot_tpu("--config", CONFIG + ":v5e8", "--steps", "sft_ar", "--no-time", "--device-memory-gb", "0.1")
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not fit" in errors[0] and "sft_ar needs" in errors[0], r.stderr[-2000:]


def test_tpu_target_without_the_compiler_is_one_line():
    """In the CPU venv (no libtpu), a TPU target says how to get the compiler instead of compiling
    something else."""
    from nla_jax import accelerators
    if accelerators.have_compiler():
        pytest.skip("libtpu is installed in this venv")
    r = _aot("--config", CONFIG, "--target", "v5p:2x2x2", "--steps", "sft_ar")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "tpu-compile" in errors[0], r.stderr[-2000:]
    r = _aot("--config", CONFIG, "--target", "v9x:2x2", "--steps", "sft_ar")
    assert r.returncode == 2 and "v9x:2x2" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
