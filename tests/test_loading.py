"""Checkpoint readers (GGUF, Hugging Face safetensors), sharded loading, and the tokenizer."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.flax import save_file as save_flax
from safetensors.numpy import save_file

from nla_jax import configlib, sharding
from nla_jax import weights
from nla_jax.weights import tokenizer as tokenizer_lib
from nla_jax.weights.hf import model_config as hf_config
from nla_jax.errors import UserError
from nla_jax.models import transformer as T
from numpy_reference import apply_rotary, rope_cos_sin

ARCH_FIELDS = ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size",
               "rope_theta", "rms_eps", "tie_embeddings", "qkv_bias")


# ----------------------------------------------------------------------------- writing HF checkpoints

def hf_tensors(params, cfg) -> dict[str, np.ndarray]:
    """Our params under Hugging Face names, in HF's [out, in] layouts."""
    p = jax.tree.map(np.asarray, params)
    D, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    t = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]}
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = p["lm_head"].T  # ours [D, V] -> [V, D]
    for i in range(cfg.n_layers):
        lp = {k: v[i] for k, v in p["layers"].items()}
        pre = f"model.layers.{i}."
        t[pre + "self_attn.q_proj.weight"] = lp["wq"].reshape(D, H * hd).T
        t[pre + "self_attn.k_proj.weight"] = lp["wk"].reshape(D, KV * hd).T
        t[pre + "self_attn.v_proj.weight"] = lp["wv"].reshape(D, KV * hd).T
        t[pre + "self_attn.o_proj.weight"] = lp["wo"].reshape(H * hd, D).T
        t[pre + "mlp.gate_proj.weight"] = lp["w_gate"].T
        t[pre + "mlp.up_proj.weight"] = lp["w_up"].T
        t[pre + "mlp.down_proj.weight"] = lp["w_down"].T
        t[pre + "input_layernorm.weight"] = lp["attn_norm"]
        t[pre + "post_attention_layernorm.weight"] = lp["mlp_norm"]
        if cfg.qkv_bias:
            t[pre + "self_attn.q_proj.bias"] = lp["bq"].reshape(H * hd)
            t[pre + "self_attn.k_proj.bias"] = lp["bk"].reshape(KV * hd)
            t[pre + "self_attn.v_proj.bias"] = lp["bv"].reshape(KV * hd)
    return {k: np.ascontiguousarray(v) for k, v in t.items()}


def hf_config_json(cfg, model_type: str | None = None) -> dict:
    c = {"model_type": model_type or cfg.family, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
         "intermediate_size": cfg.d_ff, "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta,
         "rms_norm_eps": cfg.rms_eps, "tie_word_embeddings": cfg.tie_embeddings,
         "max_position_embeddings": cfg.max_seq_len, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    if cfg.family == "llama":
        c["attention_bias"] = False  # qwen2 configs carry no such key: biases are implied
    return c


def write_hf_dir(path, params, cfg, tok, *, shards: int = 1, model_type: str | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_json(cfg, model_type), f)
    tok.tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": tok.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "pad_token": "<|im_end|>"}, f)
    tensors = hf_tensors(params, cfg)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            save_file({k: tensors[k] for k in part}, os.path.join(path, fn))
            weight_map.update({k: fn for k in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


def assert_same_params(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (kp, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert g.shape == w.shape, jax.tree_util.keystr(kp)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(kp))


# ----------------------------------------------------------------------------- HF safetensors

@pytest.mark.parametrize("shards", [1, 2])
def test_hf_safetensors_roundtrip(tiny, real, tmp_path, shards):
    cfg0, params0, _ = tiny
    d = write_hf_dir(tmp_path / "m", params0, cfg0, real.tok, shards=shards)
    if shards > 1:
        assert not os.path.exists(os.path.join(d, "model.safetensors"))
    cfg, params, tok = weights.load(d)
    for f in ARCH_FIELDS:
        assert getattr(cfg, f) == pytest.approx(getattr(cfg0, f)), f
    assert_same_params(params, params0)
    # the tokenizer came along: same ids as the GGUF one, chat template included
    assert tok.encode_chat("Hello there") == real.tok.encode_chat("Hello there")
    assert cfg.eos_ids == (2,) and cfg.bos_id == 1 and cfg.pad_id == 2
    # the loaded weights compute what the originals compute
    x = jnp.asarray([[5, 17, 300, 42]], jnp.int32)
    np.testing.assert_array_equal(T.forward(params, x, cfg)["logits"], T.forward(params0, x, cfg0)["logits"])


def test_hf_loading_with_shardings(tiny_qwen2, real, tmp_path):
    cfg0, params0, _ = tiny_qwen2
    d = write_hf_dir(tmp_path / "m", params0, cfg0, real.tok, shards=2)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    shardings = sharding.tree_shardings(T.param_axes(cfg0), T.abstract_params(cfg0), mesh, sharding.DEFAULT_RULES)
    cfg, params, _ = weights.load(d, shardings=shardings)
    assert_same_params(params, params0)
    for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert a.sharding == s


def test_hf_reader_slices(tiny_qwen2, real, tmp_path):
    """What a process holding one shard reads: arbitrary index slices of our layout."""
    cfg, params, _ = tiny_qwen2
    d = write_hf_dir(tmp_path / "m", params, cfg, real.tok)
    read = weights.hf_reader(d, cfg)
    cases = {
        "layers/wq": (slice(1, 2), slice(16, 48), slice(2, 4), slice(None)),
        "layers/wo": (slice(0, 2), slice(1, 3), slice(None), slice(0, 32)),
        "layers/w_down": (slice(None), slice(64, 128), slice(None)),
        "layers/bk": (slice(1, 2), slice(1, 2), slice(None)),
        "embed": (slice(256, 512), slice(0, 32)),
        "lm_head": (slice(32, 64), slice(128, 256)),
    }
    for path, idx in cases.items():
        node = params
        for part in path.split("/"):
            node = node[part]
        np.testing.assert_array_equal(read(path, idx), np.asarray(node)[idx], err_msg=path)


def test_hf_bfloat16_checkpoint(tiny_llama, real, tmp_path):
    cfg0, params0, _ = tiny_llama
    d = write_hf_dir(tmp_path / "m", params0, cfg0, real.tok)
    tensors = {k: jnp.asarray(v, jnp.bfloat16) for k, v in hf_tensors(params0, cfg0).items()}
    save_flax(tensors, os.path.join(d, "model.safetensors"))
    _, params, _ = weights.load(d)
    want = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params0)
    assert_same_params(params, want)
    _, params_bf16, _ = weights.load(d, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params_bf16))


def test_hf_generation_config_adds_eos(tiny_llama, real, tmp_path):
    cfg0, params0, _ = tiny_llama
    d = write_hf_dir(tmp_path / "m", params0, cfg0, real.tok)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 0]}, f)
    cfg, _, tok = weights.load(d)
    assert tok.eos_ids == (2, 0) and cfg.eos_ids == (2, 0)


def test_hf_errors(tiny_llama, real, tmp_path):
    cfg0, params0, _ = tiny_llama
    d = write_hf_dir(tmp_path / "m", params0, cfg0, real.tok)
    # unsupported architecture
    bad = str(tmp_path / "neox")
    shutil.copytree(d, bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(hf_config_json(cfg0, "gpt_neox"), f)
    with pytest.raises(UserError, match="unsupported architecture 'gpt_neox'"):
        weights.load(bad)
    # config.json claims a wider model than the weights hold
    wide = str(tmp_path / "wide")
    shutil.copytree(d, wide)
    c = hf_config_json(cfg0)
    c["intermediate_size"] = cfg0.d_ff * 2
    with open(os.path.join(wide, "config.json"), "w") as f:
        json.dump(c, f)
    with pytest.raises(UserError, match="does not match"):
        weights.load(wide)
    # a tensor is missing
    t = hf_tensors(params0, cfg0)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, os.path.join(d, "model.safetensors"))
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj.weight"):
        weights.load(d)
    # a truncated safetensors file
    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        head = f.read(1000)
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(head)
    with pytest.raises(UserError, match="truncated"):
        weights.load(d)
    # no weights / no tokenizer / no config
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(UserError, match="no model.safetensors"):
        weights.load(d)
    os.remove(os.path.join(d, "tokenizer.json"))
    with pytest.raises(UserError, match="no tokenizer.json"):
        weights.load(d)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(UserError, match="no config.json"):
        weights.load(d)


# ----------------------------------------------------------------------------- GGUF

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """How llama.cpp's converter reorders Q/K rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_unpermute_inverts_llama_cpp():
    rng = np.random.default_rng(0)
    H, hd, D = 3, 8, 5
    w = rng.normal(size=(H * hd, D))
    b = rng.normal(size=(H * hd,))
    assert not np.array_equal(llama_cpp_permute(w, H), w)
    np.testing.assert_array_equal(weights._unpermute_rope_rows(llama_cpp_permute(w, H), H), w)
    np.testing.assert_array_equal(weights._unpermute_rope_rows(llama_cpp_permute(b, H), H), b)


def test_gguf_interleaved_rope_equals_rotate_half():
    """Why the un-permutation is right: interleaved RoPE on GGUF rows == rotate-half on HF rows."""
    rng = np.random.default_rng(1)
    H, hd, D, pos = 2, 8, 6, 5
    w_hf = rng.normal(size=(H * hd, D))
    x = rng.normal(size=(D,))
    cos, sin = rope_cos_sin(pos + 1, hd, 10000.0)
    q_hf = (w_hf @ x).reshape(H, hd)
    want = np.stack([apply_rotary(q_hf[h][None], cos[pos:pos + 1], sin[pos:pos + 1])[0] for h in range(H)])
    q_gg = (llama_cpp_permute(w_hf, H) @ x).reshape(H, hd)
    ang = pos * 10000.0 ** (-np.arange(0, hd, 2) / hd)
    a, b = q_gg[:, 0::2], q_gg[:, 1::2]  # llama.cpp rotates adjacent pairs
    rot = np.empty_like(q_gg)
    rot[:, 0::2] = a * np.cos(ang) - b * np.sin(ang)
    rot[:, 1::2] = a * np.sin(ang) + b * np.cos(ang)
    got = weights._unpermute_rope_rows(rot.reshape(H * hd), H).reshape(H, hd)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_embedded_gguf_config(real):
    cfg = real.cfg
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
            cfg.vocab_size) == ("llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and not cfg.qkv_bias
    assert cfg.rms_eps == pytest.approx(1e-5)
    assert cfg.bos_id == 1 and cfg.eos_ids == (2,)
    assert "lm_head" not in real.params
    assert real.params["embed"].shape == (49152, 576) and real.params["embed"].dtype == jnp.float32


def test_gguf_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        weights.load(str(tmp_path / "missing.gguf"))
    src = weights.embedded_gguf_path()
    for size in (1 << 20, os.path.getsize(src) - 1000):  # header cut / tensor data cut
        trunc = tmp_path / f"trunc{size}.gguf"
        with open(src, "rb") as f:
            trunc.write_bytes(f.read(size))
        with pytest.raises(UserError, match="truncated"):
            weights.load(str(trunc))
    with pytest.raises(UserError, match="neither"):
        weights.load(str(tmp_path / "no_such_dir"))


def test_random_source_and_layer_range(tiny_llama):
    with pytest.raises(UserError, match="model.arch"):
        weights.load("random")
    c = configlib.get(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"), ["model.layer=2"])
    with pytest.raises(UserError, match="model.layer=2 is out of range"):
        weights.load_from_config(c.model)
    # same seed, same weights
    c = configlib.get(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    _, params, _ = weights.load_from_config(c.model)
    assert_same_params(params, tiny_llama.params)


# ----------------------------------------------------------------------------- tokenizer

def test_chat_encoding_has_one_bos(real):
    tok = real.tok
    rendered = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = tok.encode_chat("Hi")
    assert ids[0] == tok.bos_id == tok.token_to_id("<|im_start|>")
    assert ids[1] != tok.bos_id
    # a model that asks for BOS: the template's own leading BOS is not doubled ...
    forced = tokenizer_lib.Tokenizer(tok.tok, chat_template=tok.chat_template, bos_id=tok.bos_id,
                                     eos_ids=tok.eos_ids, pad_id=tok.pad_id, add_bos=True,
                                     special_ids=tok.special_ids)
    assert forced.encode_chat("Hi") == ids
    # ... and text that lacks one gets exactly one
    assert forced.bos(tok.encode("Hi")) == [tok.bos_id] + tok.encode("Hi")
    assert forced.bos([tok.bos_id, 5]) == [tok.bos_id, 5]
    assert tok.bos(tok.encode("Hi")) == tok.encode("Hi")  # SmolLM2 itself adds none


def test_special_tokens_are_single_ids(real):
    tok = real.tok
    assert tok.encode("<|im_end|>") == [2]
    assert tok.encode("<|im_start|>") == [1]
    ids = tok.encode("Hello<|im_end|>\n")
    assert ids.count(2) == 1 and ids[-2] == 2
    assert tok.decode([2]) == ""
    assert tok.decode([2], skip_special=False) == "<|im_end|>"


@pytest.mark.parametrize("text", [
    "Hello, world!", "The year 2024 has 366 days; 3.14159 * 2 = 6.28318.", "café naïve résumé é",
    "中文字符和日本語", "line one\nline two\n\n  indented\ttab", "  leading and trailing spaces  ",
    "emoji 🙂 and symbols <>&\"'", "",
])
def test_roundtrip(real, text):
    tok = real.tok
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < real.cfg.vocab_size for i in ids)


def test_digits_split_individually(real):
    # SmolLM2's pre-tokenizer splits numbers digit by digit
    assert len(real.tok.encode("12345")) == 5


def test_hf_config_rope_parameters_transformers5(tmp_path):
    """transformers >= 5 saves RoPE as `rope_parameters` with rope_theta null or absent: the theta and
    a llama3 scaling must come from there (a silent fallback to 10000 would be a different model)."""
    base = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512}
    cases = [
        ({"rope_theta": 5e5}, 5e5, None),
        ({"rope_theta": None, "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}, 1e5, None),
        ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, 5e5, 8.0),
    ]
    for i, (extra, theta, factor) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**base, **extra}))
        cfg, _ = hf_config(str(d))
        assert cfg.rope_theta == theta, extra
        assert (cfg.rope_scaling is None) == (factor is None), extra
        if factor is not None:
            assert dict(cfg.rope_scaling)["factor"] == factor and "rope_theta" not in dict(cfg.rope_scaling)
