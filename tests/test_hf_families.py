"""Qwen3 and Gemma-3: the model, sampler and injection on tiny random models, and parity with transformers.

CPU-only (always run): the cached sampler equals an uncached forward, left padding and a sliding
window agree with each prompt alone, the grouped forward equals the plain one, an injected row is
not multiplied by Gemma's sqrt(d).

Parity (peers venv; skipped with the reason when absent): `_hf_family_peer.py` builds a tiny random
model of each family with transformers (`save_pretrained`, fixed seed; the tokenizer files are
written here), nla_jax loads the directory through its ordinary reader, and both sides compare
logits (relative max error), greedy ids (padded batch here, each prompt alone there), the block-K
hidden state (HF hidden_states[K+1]) and the forward with one embedding row replaced.
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
from nla_jax.weights import tokenizer as tokenizer_lib

TESTS = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(TESTS, "_hf_family_peer.py")
FAMILIES = ("qwen3", "gemma3")
REL_TOL = 1e-4

fwd = jax.jit(T.forward, static_argnames=("cfg", "capture_layer", "logits", "remat", "logits_from"))


def peers_python() -> str | None:
    py = os.environ.get("NLA_PEERS_PYTHON") or os.path.expanduser("~/.cache/nla-peers-venv/bin/python")
    return py if os.path.isfile(py) else None


def _ids(cfg, n, seed):
    return np.random.default_rng(seed).integers(16, cfg.vocab_size, n).tolist()


@pytest.fixture(params=FAMILIES)
def fam(request):
    return request.getfixturevalue(f"tiny_{request.param}")


# ----------------------------------------------------------------------------- CPU only

def test_sampler_matches_forward_with_padding_and_window(fam):
    """Greedy decoding of a left-padded batch equals per-step argmax of the uncached forward of each
    prompt alone (Gemma: 14 + 8 tokens against a window of 4, so the sliding layers really slide)."""
    cfg, params, _ = fam
    prompts = [_ids(cfg, n, seed=n) for n in (5, 14)]
    N = 8
    toks, valid = sampling.pad_prompts(prompts, cfg.pad_id)
    out = jax.device_get(sampling.sample(params, jnp.asarray(toks), jnp.asarray(valid), jax.random.key(0), cfg=cfg,
                                         sc=sampling.SampleConfig(max_new_tokens=N, greedy=True, stop_at_eos=False)))
    for i, p in enumerate(prompts):
        buf = np.full((1, len(p) + N), cfg.pad_id, np.int32)   # one compiled length: the causal mask hides the tail
        buf[0, :len(p)] = p
        for j in range(N):
            logits = fwd(params, jnp.asarray(buf), cfg=cfg)["logits"][0, len(p) + j - 1]
            buf[0, len(p) + j] = int(np.argmax(np.asarray(logits)))
        assert out.tokens[i].tolist() == buf[0, len(p):].tolist()
    if cfg.has_sliding:  # the window matters: without it the forward differs
        wide = cfg.replace(sliding_window=10_000)
        a = fwd(params, jnp.asarray([prompts[1]]), cfg=cfg)["logits"]
        b = fwd(params, jnp.asarray([prompts[1]]), cfg=wide)["logits"]
        assert np.abs(np.asarray(a - b))[0, 5:].max() > 1e-3


def test_scanned_decode_equals_unrolled(fam):
    """Accelerators decode with a scan over stacked layers (the sliding flag scanned with them); it
    samples what the unrolled CPU decode does, with padding, groups and an injection."""
    cfg, params, _ = fam
    toks, valid = sampling.pad_prompts([_ids(cfg, 5, 1), _ids(cfg, 12, 2)], cfg.pad_id)
    ov = T.Override(jnp.asarray([[4], [6]], jnp.int32), jnp.ones((2, 1, cfg.d_model)) * 3.0)
    sc = sampling.SampleConfig(max_new_tokens=8, temperature=1.0, stop_at_eos=False)
    args = (jnp.asarray(toks), jnp.asarray(valid), jax.random.key(3))
    got = jax.device_get(sampling._sample(params, *args, cfg=cfg, sc=sc, override=ov, group=2))
    want = jax.device_get(sampling._sample(sampling.split_layers(params), *args, cfg=cfg, sc=sc, override=ov, group=2))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_grouped_forward_equals_plain(fam):
    cfg, params, _ = fam
    G, P, C = 2, 9, 6
    prompt = jnp.asarray([_ids(cfg, P, 1), [cfg.pad_id] * 3 + _ids(cfg, P - 3, 2)], jnp.int32)
    valid = prompt != cfg.pad_id
    comp = jnp.asarray([_ids(cfg, C, 10 + i) for i in range(2 * G)], jnp.int32)
    got = T.forward_grouped(params, prompt, valid, comp, cfg, group=G)
    full = jnp.concatenate([jnp.repeat(prompt, G, 0), comp], axis=1)
    fvalid = jnp.concatenate([jnp.repeat(valid, G, 0), jnp.ones(comp.shape, bool)], axis=1)
    want = fwd(params, full, cfg=cfg, valid=fvalid, logits_from=P - 1)["logits"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_av_logprobs_shared_prefix_equals_per_row(fam):
    """The SFT pass that runs the prompt before the marker once for the batch equals the per-row
    pass on every family (Gemma-3: embedding scale, sliding layers, four norms per block)."""
    from nla_jax.nla import av as av_lib
    cfg, params, _ = fam
    prompt = tuple(_ids(cfg, 9, 3))
    spec = av_lib.AVSpec(prompt=prompt, marker_pos=5, marker_id=prompt[5], closer=(prompt[0],), eos=prompt[1],
                         mode="replace", add_after=0, inject_norm=4.0, center=False, max_len=6)
    acts = jax.random.normal(jax.random.key(1), (3, cfg.d_model))
    targets = jnp.asarray([_ids(cfg, 6, 20 + i) for i in range(3)], jnp.int32)
    got = av_lib.logprobs(params, {}, cfg, spec, acts, targets, share_prefix=True)
    want = av_lib.logprobs(params, {}, cfg, spec, acts, targets, share_prefix=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_injected_row_is_in_residual_units(tiny_gemma3):
    """Gemma multiplies looked-up rows by sqrt(d); an injected vector replaces the row after that."""
    cfg, params, _ = tiny_gemma3
    toks = jnp.asarray([[5, 6, 7]], jnp.int32)
    v = jnp.arange(cfg.d_model, dtype=jnp.float32)[None, None]
    x = T.embed(params, toks, T.Override(jnp.asarray([[1]]), v), cfg)
    np.testing.assert_array_equal(np.asarray(x[0, 1]), np.asarray(v[0, 0]))
    np.testing.assert_allclose(np.asarray(x[0, 0]), np.asarray(params["embed"][5]) * cfg.d_model ** 0.5, rtol=1e-6)


# ----------------------------------------------------------------------------- parity with transformers

def write_tokenizer(d: str) -> None:
    """The byte tokenizer (ids 0..271, ChatML) beside a peer-built model: what weights.load reads."""
    tok = tokenizer_lib.byte_tokenizer(512)
    tok.tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": tok.chat_template, "bos_token": "<s>", "eos_token": "<|im_end|>",
                   "pad_token": "<pad>", "add_bos_token": True}, f)


def peer_model(tmp_path, family: str) -> str:
    py = peers_python()
    if py is None:
        pytest.skip("no peers venv (set NLA_PEERS_PYTHON, or run ../shared/peers/setup.sh)")
    d = str(tmp_path / family)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([py, PEER, "build", family, d], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    write_tokenizer(d)
    return d


def peer_reference(tmp_path, request: dict) -> dict:
    req, out = tmp_path / "req.json", tmp_path / "ref.npz"
    req.write_text(json.dumps(request))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([peers_python(), PEER, "reference", str(req), str(out)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_transformers(tmp_path, family):
    d = peer_model(tmp_path, family)
    cfg, params, tok = weights.load(d)
    assert cfg.family == family
    K, N = 1, 8
    prompts = [_ids(cfg, n, seed=n) for n in (6, 13)]
    rng = np.random.default_rng(0)
    inj_prompt, pos = _ids(cfg, 9, seed=3), 4
    vec = (rng.standard_normal(cfg.d_model) * 3.0).astype(np.float32)
    ref = peer_reference(tmp_path, {"dir": d, "prompts": prompts, "new_tokens": N, "layer": K,
                                    "inject": {"prompt": inj_prompt, "pos": pos, "vector": vec.tolist()}})
    toks, valid = sampling.pad_prompts(prompts, cfg.pad_id)
    out = fwd(params, jnp.asarray(toks), cfg=cfg, valid=jnp.asarray(valid), capture_layer=K)
    gen = jax.device_get(sampling.sample(params, jnp.asarray(toks), jnp.asarray(valid), jax.random.key(0), cfg=cfg,
                                         sc=sampling.SampleConfig(max_new_tokens=N, greedy=True, stop_at_eos=False)))
    S = toks.shape[1]
    errs = {}
    for i, p in enumerate(prompts):
        errs[f"logits_{i}"] = rel_err(out["logits"][i, S - len(p):], ref[f"logits_{i}"])
        errs[f"hidden_{i}"] = rel_err(out["hidden"][i, S - len(p):], ref[f"hidden_{i}"])
        assert gen.tokens[i].tolist() == ref[f"greedy_{i}"].tolist(), (family, i)
    ov = T.Override(jnp.asarray([[pos]], jnp.int32), jnp.asarray(vec)[None, None])
    inj = fwd(params, jnp.asarray([inj_prompt]), cfg=cfg, override=ov)["logits"][0]
    errs["inject"] = rel_err(inj, ref["inject_logits"])
    print(f"{family}: max relative error {max(errs.values()):.2e} {errs}")
    assert max(errs.values()) <= REL_TOL, errs


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(tmp_path, family, request):
    """A tiny random model of the family exported as a transformers directory (export.write_model_dir)
    reads back through weights.load bit for bit, with the same architecture; with the peers venv,
    transformers loads it too and computes the same logits (its config.json says what ours does)."""
    from nla_jax import export
    cfg, params, tok = request.getfixturevalue(f"tiny_{family}")
    d = str(tmp_path / "m")
    export.write_model_dir(d, cfg, params, tok)
    cfg2, params2, _ = weights.load(d)
    for f in ("family", "n_layers", "d_model", "head_dim", "qk_norm", "norm_plus_one", "sandwich_norms", "activation",
              "embed_scale", "layer_types", "sliding_window", "rope_local_theta", "rope_theta", "tie_embeddings"):
        assert getattr(cfg2, f) == getattr(cfg, f), f
    assert dict(cfg2.rope_scaling or ()) == dict(cfg.rope_scaling or ())
    assert abs((cfg2.attn_scale or 0) - (cfg.attn_scale or 0)) < 1e-9
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    if peers_python() is None:
        return
    prompt = _ids(cfg, 11, seed=4)
    ref = peer_reference(tmp_path, {"dir": d, "prompts": [prompt], "new_tokens": 4, "layer": 0,
                                    "inject": {"prompt": prompt, "pos": 2, "vector": [1.0] * cfg.d_model}})
    ours = fwd(params, jnp.asarray([prompt]), cfg=cfg)["logits"][0]
    assert rel_err(ours, ref["logits_0"]) <= REL_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_training_gradients_reach_every_family_weight(family, request):
    """The AV's teacher-forced log-probs (grouped, with injection) and the AR's prediction are
    differentiable through the family's own weights (q/k norms, Gemma's extra norms)."""
    from nla_jax.nla import ar as ar_lib
    cfg, params, _ = request.getfixturevalue(f"tiny_{family}")
    prompt = jnp.asarray([_ids(cfg, 8, 1)], jnp.int32)
    comp = jnp.asarray([_ids(cfg, 5, 2), _ids(cfg, 5, 3)], jnp.int32)
    ov = T.Override(jnp.asarray([[3]], jnp.int32), jnp.ones((1, 1, cfg.d_model)) * 5.0)

    def av_loss(p):
        lg = T.forward_grouped(p, prompt, jnp.ones(prompt.shape, bool), comp, cfg, group=2, override=ov, remat=True)
        return jax.nn.log_softmax(lg[:, :-1], -1).mean()

    def ar_loss(p):
        spec = ar_lib.ARSpec(prefix=(1, 20), suffix=(30, 31), max_len=6, pad_id=0, layer=1, head_norm="none")
        ar_p = {**ar_lib.init_params(p, 1, cfg.d_model, bias=False)}
        return ar_lib.predict(ar_p, cfg, spec, comp, jnp.asarray([5, 3])).sum()

    for loss in (av_loss, ar_loss):
        g = jax.grad(loss)(params)["layers"]
        for leaf in ("q_norm", "k_norm", "post_attn_norm", "post_mlp_norm", "wq", "w_gate"):
            if leaf in g:
                assert np.isfinite(np.asarray(g[leaf])).all() and np.abs(np.asarray(g[leaf][0])).max() > 0, (loss, leaf)


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_multimodal_gemma3_checkpoint_reads_its_text_model(tmp_path, tiny_gemma3, prefix):
    """The released Gemma-3 targets are multimodal checkpoints (model_type gemma3, text_config, the
    decoder under a prefix; vision tensors beside it): nla_jax reads the text model, the same params."""
    from safetensors.numpy import load_file, save_file

    from nla_jax import export
    cfg, params, tok = tiny_gemma3
    d = str(tmp_path / "mm")
    export.write_model_dir(d, cfg, params, tok)
    with open(os.path.join(d, "config.json")) as f:
        text = json.load(f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
                   "vision_config": {"hidden_size": 8}, "eos_token_id": [2]}, f)
    t = load_file(os.path.join(d, "model.safetensors"))
    t = {(prefix + k[len("model."):] if k.startswith("model.") else k): v for k, v in t.items()}
    t["vision_tower.vision_model.post_layernorm.weight"] = np.ones(8, np.float32)
    save_file(t, os.path.join(d, "model.safetensors"))
    cfg2, params2, _ = weights.load(d)
    assert cfg2.family == "gemma3" and cfg2.layer_types == cfg.layer_types and cfg2.embed_scale
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
