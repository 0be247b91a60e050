"""Parity with Hugging Face transformers on SmolLM2-135M-Instruct (float32).

Two ways to get the transformers side:
  * in process, when torch and transformers are importable here (the project venv has neither,
    so these tests usually skip);
  * through the peers venv, which has torch + transformers but no jax: `hf_peer.py reference`
    (from <repo>/../shared/peers) runs as a subprocess and its JSON is compared with ours. This
    runs when NLA_PEERS_PYTHON names that venv's python, or when ../shared/peers and
    ~/.cache/nla-peers-venv/bin/python both exist; it is skipped otherwise.
"""
from __future__ import annotations

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nla_jax import sampling
from nla_jax import weights
from nla_jax.models import transformer as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_PEER = os.path.join(os.path.dirname(REPO), "shared", "peers", "hf_peer.py")
# one reply stops at EOS (and has digits in the prompt), one runs the full 32 tokens
PROMPTS = ["What is 2+2?", "Write a haiku about the ocean."]
NEW_TOKENS = 32

fwd = jax.jit(T.forward, static_argnames=("cfg", "capture_layer", "logits", "remat"))


def our_side(real, prompts, new_tokens=NEW_TOKENS):
    """Prompt ids, float32 logits at the prompt tokens, and greedy reply ids, per prompt."""
    cfg, params, tok = real
    ids = [tok.encode_chat(q) for q in prompts]
    toks, valid = sampling.pad_prompts(ids, cfg.pad_id)
    logits = np.asarray(fwd(params, jnp.asarray(toks), cfg=cfg, valid=jnp.asarray(valid))["logits"])
    out = jax.device_get(sampling.sample(params, jnp.asarray(toks), jnp.asarray(valid), jax.random.key(0), cfg=cfg,
                                         sc=sampling.SampleConfig(max_new_tokens=new_tokens, greedy=True)))
    S = toks.shape[1]
    return [{"prompt_ids": p, "logits": logits[i, S - len(p):], "reply_ids": out.tokens[i, :out.lengths[i]].tolist()}
            for i, p in enumerate(ids)]


# ----------------------------------------------------------------------------- in process

@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d, name = os.path.split(weights.embedded_gguf_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return torch, model


def test_logits_match_transformers(real, hf_model):
    torch, model = hf_model
    for item in our_side(real, PROMPTS, new_tokens=1):
        with torch.inference_mode():
            theirs = model(torch.tensor([item["prompt_ids"]])).logits[0].float().numpy()
        assert theirs.shape == item["logits"].shape
        assert np.abs(item["logits"] - theirs).max() <= 1e-3


def test_greedy_generation_matches_transformers(real, hf_model):
    torch, model = hf_model
    for item in our_side(real, PROMPTS):
        ids = torch.tensor([item["prompt_ids"]])
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=real.cfg.pad_id)
        assert item["reply_ids"] == gen[0, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------- through the peers venv

def _peers_python() -> str | None:
    if not os.path.isfile(HF_PEER):
        return None
    py = os.environ.get("NLA_PEERS_PYTHON")
    if py:
        return py
    default = os.path.expanduser("~/.cache/nla-peers-venv/bin/python")
    return default if os.path.isfile(default) else None


@pytest.mark.timeout(600)
def test_matches_transformers_peer(real, tmp_path):
    py = _peers_python()
    if py is None:
        pytest.skip("no peers venv (set NLA_PEERS_PYTHON, or run ../shared/peers/setup.sh)")
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(PROMPTS))
    out_file = tmp_path / "reference.json"
    # One torch thread: on this shared 2-core machine, torch's OpenMP threads spin-wait whenever
    # another process holds a core (measured 99 s with 2 threads vs 23 s with 1, same JSON output).
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([py, HF_PEER, "reference", "--new-tokens", str(NEW_TOKENS), "--prompts-file",
                           str(prompts_file), "--out", str(out_file)],
                          capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads(out_file.read_text())
    assert ref["dtype"] == "float32" and [it["prompt"] for it in ref["items"]] == PROMPTS
    for ours, theirs in zip(our_side(real, PROMPTS), ref["items"]):
        q = theirs["prompt"]
        assert ours["prompt_ids"] == theirs["prompt_ids"], q
        assert ours["reply_ids"] == theirs["reply_ids"], q
        assert np.argmax(ours["logits"], axis=-1).tolist() == theirs["prompt_argmax"], q
        l2 = np.linalg.norm(ours["logits"].astype(np.float64), axis=-1)
        np.testing.assert_allclose(l2, theirs["prompt_logits_l2"], rtol=1e-3, err_msg=q)
    assert any(len(it["reply_ids"]) == NEW_TOKENS for it in ref["items"])  # one reply ran the full length
    assert any(it["reply_ids"][-1] in real.cfg.eos_ids for it in ref["items"])  # and one stopped at EOS
