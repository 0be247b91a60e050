"""A config meant for an accelerator refuses a CPU-only backend (config key mesh.platform), with one
line that says how to install the accelerator build, instead of training a 7B model on CPU."""
from __future__ import annotations

import os

import ml_collections
import pytest

from nla_jax import configlib, sharding
from nla_jax.errors import UserError
from test_train import TINY, _one_error_line, _train, store  # noqa: F401 (store: fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_check_platform():
    gpu = ml_collections.ConfigDict({"platform": "gpu"})
    with pytest.raises(UserError, match=r"mesh.platform='gpu'.*backend here is 'cpu'.*setup.sh cuda12"):
        sharding.check_platform(gpu, backend="cpu")
    sharding.check_platform(gpu, backend="gpu")
    sharding.check_platform(ml_collections.ConfigDict({"platform": "any"}), backend="tpu")
    sharding.check_platform(ml_collections.ConfigDict({"shape": (1, 1, 1)}), backend="cpu")   # saved before the key
    with pytest.raises(UserError, match="expected one of any, cpu, gpu, tpu"):
        sharding.check_platform(ml_collections.ConfigDict({"platform": "cuda"}), backend="cpu")


@pytest.mark.parametrize("config,want", [("qwen2_5_7b.py", "gpu"), ("qwen2_5_0_5b.py", "gpu"),
                                         ("llama3_3_70b.py", "gpu"), ("llama3_3_70b.py:v5p64", "tpu"),
                                         ("smollm2_135m.py", "any"), ("tiny.py", "any")])
def test_real_scale_configs_name_their_platform(config, want):
    assert configlib.get(os.path.join(REPO, "configs", config)).mesh.platform == want


def test_trainer_refuses_a_gpu_config_on_cpu(store, tmp_path):
    r = _train(store, str(tmp_path / "w"), "--config.mesh.platform=gpu")
    line = _one_error_line(r)
    assert "mesh.platform='gpu'" in line and "'cpu'" in line
    assert not os.path.exists(tmp_path / "w")           # refused before the work directory exists
