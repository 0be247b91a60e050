"""The generate CLI on bad input (one-line errors, exit 2, no traceback) and configlib itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from nla_jax import configlib
from nla_jax import weights
from nla_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
SMOL = os.path.join(REPO, "configs", "smollm2_135m.py")


def run_cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, NLA_NO_COMPILE_CACHE="1", JAX_PLATFORMS="cpu")
    env.pop("NLA_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "nla_jax.generate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str, after_load: bool = False) -> str:
    """Exit 2, no traceback, stderr is exactly one `error: ...` line naming the problem.

    after_load: the error is found after the model loaded, so the CLI's "loaded ..." progress
    line may precede it; the error must still be a single line and the last one.
    """
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    if after_load:
        assert lines and lines[0].startswith("loaded "), proc.stderr
        lines = lines[1:]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- bad input through the CLI

def test_missing_model_file():
    proc = run_cli("--config", SMOL, "--config.model.source=/nonexistent.gguf", "--prompt", "hi")
    assert_user_error(proc, "/nonexistent.gguf", "does not exist")


def test_truncated_gguf(tmp_path):
    trunc = tmp_path / "cut.gguf"
    with open(weights.embedded_gguf_path(), "rb") as f:
        trunc.write_bytes(f.read(1 << 20))
    proc = run_cli("--config", SMOL, f"--config.model.source={trunc}", "--prompt", "hi")
    assert_user_error(proc, str(trunc), "truncated")


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "neox"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 64,
                                                "num_attention_heads": 4, "num_hidden_layers": 2}))
    proc = run_cli("--config", SMOL, f"--config.model.source={d}", "--prompt", "hi")
    assert_user_error(proc, "unsupported architecture", "gpt_neox")


def test_unknown_config_key():
    assert_user_error(run_cli("--config", TINY, "--config.model.nope=1", "--prompt-ids", "1,2"), "model.nope")


def test_wrong_config_type():
    assert_user_error(run_cli("--config", TINY, "--config.model.layer=abc", "--prompt-ids", "1,2"),
                      "model.layer", "int", "abc")


def test_layer_out_of_range():
    assert_user_error(run_cli("--config", TINY, "--config.model.layer=99", "--prompt-ids", "1,2"),
                      "model.layer=99", "out of range")


def test_missing_config_file():
    assert_user_error(run_cli("--config", "/nonexistent/cfg.py", "--prompt", "hi"), "/nonexistent/cfg.py",
                      "does not exist")


@pytest.mark.parametrize("args,needles", [
    (("--config", TINY + ":gpt", "--prompt-ids", "1"), ("unknown variant", "gpt")),
    (("--config", TINY), ("--prompt",)),
    (("--config", TINY, "--prompt-ids", "1", "--max-new-tokens", "0"), ("--max-new-tokens",)),
    (("--config", TINY, "--config.model.dtype=float8", "--prompt-ids", "1"), ("model.dtype", "float8")),
    (("--config", TINY, "--config.mesh.shape=(2, 1, 1)", "--prompt-ids", "1"), ("mesh shape (2, 1, 1)", "devices")),
])
def test_other_bad_input(args, needles):
    assert_user_error(run_cli(*args), *needles)


@pytest.mark.parametrize("args,needles", [
    (("--config", TINY, "--prompt-ids", "1,999"), ("999", "vocabulary")),
    (("--config", TINY, "--config.model.arch.vocab_size=256", "--prompt", "hi"), ("no tokenizer", "--prompt-ids")),
])
def test_bad_input_found_after_loading(args, needles):
    assert_user_error(run_cli(*args), *needles, after_load=True)


def test_cli_runs_on_tiny():
    """The CLI works at all (so the error tests above are not passing on a broken CLI)."""
    proc = run_cli("--config", TINY, "--prompt-ids", "1,2,3", "--greedy", "--max-new-tokens", "4", "--norms")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    toks = lines[0].split()
    assert len(toks) == 4 and all(0 <= int(t) < 512 for t in toks)
    assert any("block 0 residual norms (HF hidden_states[1])" in line for line in lines)
    assert sum(1 for line in lines if line.strip().startswith(("0 ", "1 ", "2 "))) == 3  # one row per prompt token


# ----------------------------------------------------------------------------- configlib

def test_load_config_file_variants():
    c = configlib.load_config_file(TINY + ":qwen2")
    assert c.model.arch.family == "qwen2" and c.model.arch.qkv_bias and not c.model.arch.tie_embeddings
    assert configlib.load_config_file(TINY).model.arch.family == "llama"
    with pytest.raises(UserError, match="unknown variant"):
        configlib.load_config_file(TINY + ":gpt")


def test_load_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        configlib.load_config_file(str(tmp_path / "none.py"))
    bad = tmp_path / "syntax.py"
    bad.write_text("def get_config(arg):\n    return (\n")
    with pytest.raises(UserError, match="syntax error at line"):
        configlib.load_config_file(str(bad))
    none = tmp_path / "noget.py"
    none.write_text("x = 1\n")
    with pytest.raises(UserError, match="get_config"):
        configlib.load_config_file(str(none))
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def get_config(arg):\n    return {'a': 1}\n")
    with pytest.raises(UserError, match="ConfigDict"):
        configlib.load_config_file(str(wrong))


def test_overrides_parse_to_the_leaf_type():
    c = configlib.get(TINY, ["model.layer=1", "model.arch.rope_theta=7", "model.remat=true", "model.source=x.gguf",
                             "mesh.shape=(2, 2, 2)", "model.arch.eos_ids=(2, 5)", "sample.top_p=0.5"])
    assert c.model.layer == 1 and isinstance(c.model.layer, int)
    assert c.model.arch.rope_theta == 7.0 and isinstance(c.model.arch.rope_theta, float)
    assert c.model.remat is True
    assert c.model.source == "x.gguf"
    assert tuple(c.mesh.shape) == (2, 2, 2)
    assert tuple(c.model.arch.eos_ids) == (2, 5)
    assert c.sample.top_p == 0.5
    assert configlib.get(TINY, ["model.remat=0"]).model.remat is False
    with pytest.raises(Exception):  # get() locks the config: no new keys afterwards
        c.model.brand_new = 1


@pytest.mark.parametrize("override,needle", [
    ("model.layer=1.5", "expects an int"),
    ("model.arch.rope_theta=big", "expects a float"),
    ("model.remat=maybe", "expects a bool"),
    ("mesh.shape=4", "expects a sequence"),
    ("model=3", "is a section"),
    ("model.arch.nope=1", "unknown config key 'model.arch.nope'"),
    ("nope.x=1", "unknown config key 'nope.x'"),
    ("model.layer", "key=value"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        configlib.get(TINY, [override])


def test_split_config_args():
    rest, ov = configlib.split_config_args(["--config", "x.py", "--config.model.layer", "3", "--prompt", "hi",
                                            "--config.sample.seed=4"])
    assert rest == ["--config", "x.py", "--prompt", "hi"]
    assert ov == ["model.layer=3", "sample.seed=4"]
    with pytest.raises(UserError, match="has no value"):
        configlib.split_config_args(["--config.model.layer"])


def test_overridden_arch_reaches_the_model():
    c = configlib.get(TINY, ["model.arch.eos_ids=(2, 5)", "model.arch.n_layers=3", "model.layer=2"])
    cfg, params, tok = weights.load_from_config(c.model)
    assert cfg.eos_ids == (2, 5) and cfg.n_layers == 3 and tok is not None and tok.eos_ids == (2,)
    assert params["layers"]["wq"].shape[0] == 3
    assert isinstance(c, ml_collections.ConfigDict)


def test_error_line_stays_last_when_async_work_is_abandoned():
    # orbax leaves write coroutines unawaited when a checkpoint write fails; Python's exit-time
    # "coroutine ... was never awaited" warning must not land after the one-line error
    prog = ("from nla_jax.cli import cli_main\n"
            "from nla_jax.errors import UserError\n"
            "async def write(): pass\n"
            "pending = []\n"
            "@cli_main\n"
            "def main(argv=None):\n"
            "    pending.append(write())\n"
            "    raise UserError('disk full while writing x')\n"
            "main([])\n")
    r = subprocess.run([sys.executable, "-c", prog], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: disk full while writing x"], r.stderr
