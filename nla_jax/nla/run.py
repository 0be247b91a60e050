"""The run state every program builds on: mesh, target model, tokenizer, store, statistics, specs.

`build(cfg)` turns a config into one typed `Run`, the same way for the trainer, `evaluate`,
`explain`, `export` and `aot`, so that the programs differ only in what they do with it:

    build(cfg)                               trainer: real weights, the store, statistics from it
    build(cfg, store=False, stats=saved)     reading a trained pair: statistics saved with it
    build(cfg, store=False, weights=False, stats=saved)
                                             the same without the target's weights (abstract
                                             target: shapes and shardings only; the pair's own
                                             parameters come from its checkpoint)
    build(cfg, abstract=True)                `aot`: no file is read at all; the architecture comes
                                             from model.arch, prompt ids are synthetic ids of the
                                             configured lengths (aot.prompt_len, ...)

The checks that need only the config and the model's metadata (`check_config`, `check_store`)
live here too: every program that builds a run refuses the same bad settings the same way.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nla_jax import paths, sharding
from nla_jax import weights as weights_lib
from nla_jax.data import store as store_lib
from nla_jax.data import summaries as summaries_lib
from nla_jax.errors import UserError
from nla_jax.models import transformer
from nla_jax.models.config import ATTENTION_IMPLS, ModelConfig, from_dict
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import av as av_lib
from nla_jax.nla import stats as stats_lib
from nla_jax.nla import steps


@dataclasses.dataclass
class Run:
    """What a program needs to run the NLA's models on a mesh (see the module docstring)."""
    cfg: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    model_cfg: ModelConfig
    target: dict                  # the frozen target's params (AV and AR start from them); abstract
                                  # (ShapeDtypeStruct with shardings) when built without weights
    tokenizer: Any                # None when abstract
    store: store_lib.Store | None
    stats: stats_lib.ActStats | None  # None when abstract
    mean: Any                     # [d] float32 raw training mean, replicated (centring, injection)
    ctx: steps.Ctx                # the static bundle every compiled step closes over
    summaries: dict[int, str]     # warm-start texts by store row ({} without a store)

    @property
    def workdir(self) -> str:
        return self.cfg.train.workdir

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return sharding.named_sharding((), None, self.mesh, self.rules)

    @property
    def batch_shards(self) -> int:
        """How many ways a global batch is split (a batch must be a multiple of this)."""
        return sharding.batch_shards(self.mesh, self.rules)

    @property
    def batch_layout(self) -> sharding.BatchLayout:
        """Which rows of each global batch this process feeds (see sharding.BatchLayout)."""
        return sharding.batch_layout(self.mesh, self.rules)


# ============================================================================= config checks

def check_config(cfg) -> None:
    """Refuse bad settings before any compute (each names the key). Reads only model metadata."""
    for key in ("train.workdir", "data.store", "model.source"):
        section, name = key.split(".")
        try:
            paths.scheme(str(cfg[section][name]))
        except UserError as e:
            raise UserError(f"config key {key}: {e}") from None
    rl = cfg.rl
    if rl.group_size < 2:
        raise UserError(f"config key rl.group_size={rl.group_size}: GRPO needs groups of at least 2")
    if rl.advantage not in ("grpo", "drgrpo", "rloo"):
        raise UserError(f"config key rl.advantage={rl.advantage!r}: expected grpo, drgrpo or rloo")
    if rl.kl not in ("k1", "k2", "k3"):
        raise UserError(f"config key rl.kl={rl.kl!r}: expected k1, k2 or k3")
    if rl.agg not in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "drgrpo"):
        raise UserError(f"config key rl.agg={rl.agg!r}: expected token_mean, seq_mean_token_mean, "
                        "seq_mean_token_sum or drgrpo")
    for sec in ("sft_av", "sft_ar", "rl"):
        if cfg[sec].steps < 0 or cfg[sec].batch < 1:
            raise UserError(f"config keys {sec}.steps / {sec}.batch must be >= 0 / >= 1")
    for key in ("train.ckpt_every", "train.log_every", "train.max_nonfinite", "train.keep",
                "sft_av.eval_every", "sft_ar.eval_every"):
        sec, name = key.split(".")
        if key == "train.keep" and cfg[sec][name] is None:  # keep every checkpoint
            continue
        if not isinstance(cfg[sec][name], int) or cfg[sec][name] < 1:
            raise UserError(f"config key {key}={cfg[sec][name]!r}: must be an integer >= 1")
    keep_every = cfg.train.get("keep_every", 0)
    if not isinstance(keep_every, int) or isinstance(keep_every, bool) or keep_every < 0:
        raise UserError(f"config key train.keep_every={keep_every!r}: must be an integer >= 0 (0: keep only the newest)")
    for key in ("sft_av.optim", "sft_ar.optim", "rl.optim_av", "rl.optim_ar"):
        sec, name = key.split(".")
        if cfg[sec][name].schedule not in ("constant", "cosine"):
            raise UserError(f"config key {key}.schedule={cfg[sec][name].schedule!r}: expected 'constant' or 'cosine'")
    model_cfg = weights_lib.peek_config(cfg.model)  # reads metadata only
    if not 0 <= cfg.model.layer < model_cfg.n_layers:
        raise UserError(f"config key model.layer={cfg.model.layer} is out of range for {model_cfg.n_layers} blocks")
    if cfg.av.max_len >= model_cfg.max_seq_len:
        raise UserError(f"config key av.max_len={cfg.av.max_len}: the explanation cap must be below the model's "
                        f"context ({model_cfg.max_seq_len} tokens)")


def check_store(cfg, manifest: dict | None = None, d_model: int | None = None) -> None:
    """The store must come from this target at this layer (a store of another target is refused).
    Without arguments reads only the store manifest and the model's metadata."""
    if manifest is None:
        manifest = store_lib.open_store(cfg.data.store).manifest
    if d_model is None:
        d_model = weights_lib.peek_config(cfg.model).d_model
    meta = manifest.get("meta", {})
    if meta.get("layer") != cfg.model.layer or manifest.get("d") != d_model:
        raise UserError(f"store {cfg.data.store} holds layer {meta.get('layer')} (d={manifest.get('d')}) activations, "
                        f"but the config trains layer {cfg.model.layer} of a d={d_model} model")


# ============================================================================= abstract models (aot)

def model_config_from_arch(cfg) -> ModelConfig:
    """The architecture from model.arch without reading weights; checked against model.source's
    own config.json when that directory exists (a stale arch would compile the wrong model)."""
    arch = cfg.model.get("arch")
    arch = arch.to_dict() if hasattr(arch, "to_dict") else dict(arch or {})
    if not arch:
        return weights_lib.peek_config(cfg.model)  # reads metadata only (embedded / GGUF / HF directory)
    model_cfg = from_dict(arch)
    src = cfg.model.source
    if src != "random" and os.path.isdir(src):
        real = weights_lib.peek_config(cfg.model)
        for f in ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size",
                  "tie_embeddings", "qkv_bias", "layer_types", "sliding_window", "rope_local_theta"):
            if getattr(real, f) != getattr(model_cfg, f):
                raise UserError(f"config key model.arch.{f}={getattr(model_cfg, f)!r} disagrees with "
                                f"{src}/config.json ({getattr(real, f)!r}); fix the config's arch")
    return model_cfg


def synthetic_specs(cfg, model_cfg: ModelConfig) -> tuple[av_lib.AVSpec, ar_lib.ARSpec]:
    """AV and AR specs whose prompts are synthetic token ids of the lengths in the config's `aot`
    section (prompt_len, closer_len, ar_prefix_len, ar_suffix_len): compiled programs depend on
    the lengths only, so no tokenizer is needed."""
    a = cfg.get("aot") or {}
    prompt_len, closer_len = int(a.get("prompt_len", 64)), int(a.get("closer_len", 4))
    ar_prefix_len, ar_suffix_len = int(a.get("ar_prefix_len", 4)), int(a.get("ar_suffix_len", 5))
    vocab = model_cfg.vocab_size
    ids = lambda start, n: tuple((start + i) % vocab for i in range(n))
    if prompt_len < 4 or closer_len < 1 or ar_suffix_len < 1:
        raise UserError("config keys aot.prompt_len >= 4, aot.closer_len >= 1, aot.ar_suffix_len >= 1 expected")
    marker_pos = prompt_len // 2
    prompt = list(ids(1000, prompt_len))
    prompt[marker_pos] = vocab - 1
    max_len = int(cfg.av.max_len)
    if prompt_len + max_len > model_cfg.max_seq_len:
        raise UserError(f"config key av.max_len={max_len}: prompt ({prompt_len}) + cap exceeds the model's "
                        f"context ({model_cfg.max_seq_len})")
    av = av_lib.AVSpec(prompt=tuple(prompt), marker_pos=marker_pos, marker_id=vocab - 1, closer=ids(2000, closer_len),
                       eos=(model_cfg.eos_ids or (0,))[0], mode=cfg.av.inject, add_after=int(cfg.av.add_after),
                       inject_norm=float(cfg.av.inject_norm) or 100.0, center=bool(cfg.av.center), max_len=max_len)
    ar = ar_lib.ARSpec(prefix=ids(3000, ar_prefix_len), suffix=ids(4000, ar_suffix_len), max_len=max_len,
                       pad_id=model_cfg.pad_id, layer=int(cfg.model.layer), head_norm=cfg.ar.head_norm)
    return av, ar


def abstract_target(model_cfg: ModelConfig, dtype, mesh, rules) -> dict:
    """The target's parameters as ShapeDtypeStructs carrying their shardings (nothing allocated)."""
    shapes = transformer.abstract_params(model_cfg, dtype)
    shardings = sharding.tree_shardings(transformer.param_axes(model_cfg), shapes, mesh, rules)
    return with_shardings(shapes, shardings)


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `shapes` carrying `shardings` (what orbax restores into, what jit lowers)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


# ============================================================================= build

def build(cfg, *, store: bool = True, abstract: bool = False, weights: bool = True,
          stats: stats_lib.ActStats | None = None, compute_dtype=None, weight_dtype=None, devices=None) -> Run:
    """The run for `cfg` (see the module docstring). `stats`: the statistics a trained pair was
    saved with (else computed from the store). `compute_dtype` / `weight_dtype` override
    model.dtype / model.weight_dtype (aot compiles bfloat16 as float16 on CPU). `devices`: the
    mesh's devices when not this process's (aot's TPU topologies; abstract runs only).

    Parameters (the target, hence the AV and AR initialised from it, and their optimizer state)
    are held in model.weight_dtype; forward passes compute in model.dtype (steps.for_compute)."""
    mesh = sharding.mesh_from_config(cfg.mesh, check=not abstract, devices=devices if abstract else None)
    rules = cfg.rules
    dtype = weight_dtype or weights_lib.dtype_of(weights_lib.weight_dtype_name(cfg.model))
    compute = compute_dtype or weights_lib.dtype_of(cfg.model.dtype)
    compute = None if jnp.dtype(compute) == jnp.dtype(dtype) else compute
    if abstract:
        model_cfg = model_config_from_arch(cfg).replace(attention=attention_impl(cfg, mesh))
        target = abstract_target(model_cfg, dtype, mesh, rules)
        av_spec, ar_spec = synthetic_specs(cfg, model_cfg)
        ctx = steps.Ctx(cfg=model_cfg, av=av_spec, ar=ar_spec, center=bool(cfg.nla.center),
                        remat=remat_policy(cfg), var_nrm=1.0, compute_dtype=compute,
                        decode_scan=decode_scan(cfg, mesh, abstract=True))
        mean = jax.ShapeDtypeStruct((model_cfg.d_model,), jnp.float32,
                                    sharding=sharding.named_sharding((), None, mesh, rules))
        return Run(cfg, mesh, rules, model_cfg, target, None, None, stats, mean, ctx, {})

    opened = store_lib.open_store(cfg.data.store) if store else None
    if weights:
        model_cfg, target, tokenizer = weights_lib.load_from_config(cfg.model, mesh, rules, dtype=dtype)
    else:
        model_cfg, tokenizer = weights_lib.config_and_tokenizer(cfg.model)
        target = abstract_target(model_cfg, dtype, mesh, rules)
    model_cfg = model_cfg.replace(attention=attention_impl(cfg, mesh))
    if tokenizer is None:
        raise UserError(f"model source {cfg.model.source!r} has no tokenizer; the NLA needs text")
    if opened is not None:
        check_store(cfg, opened.manifest, model_cfg.d_model)
    if stats is None:
        if opened is None:
            raise ValueError("build(store=False) needs the statistics a pair was saved with")
        stats = stats_lib.from_store(opened, cfg.nla.stats_splits, cfg.nla.stats_rows, cfg.nla.seed)
    av_spec = av_lib.build_spec(tokenizer, model_cfg, cfg.av, stats.mean_norm)
    ar_spec = ar_lib.build_spec(tokenizer, model_cfg, cfg.ar, cfg.model.layer, max_len=cfg.av.max_len)
    ctx = steps.Ctx(cfg=model_cfg, av=av_spec, ar=ar_spec, center=bool(cfg.nla.center), remat=remat_policy(cfg),
                    var_nrm=stats.var(bool(cfg.nla.center)), compute_dtype=compute,
                    decode_scan=decode_scan(cfg, mesh, abstract=False))
    summaries = summaries_lib.read_texts(summaries_lib.path_in(cfg.data.store)) if opened is not None else {}
    mean = jax.device_put(jnp.asarray(stats.mean_array()), sharding.named_sharding((), None, mesh, rules))
    return Run(cfg, mesh, rules, model_cfg, target, tokenizer, opened, stats, mean, ctx, summaries)


def remat_policy(cfg) -> str:
    """model.remat by name: none | minimal | full (True / False mean full / minimal)."""
    try:
        return transformer.remat_name(cfg.model.remat)
    except ValueError:
        raise UserError(f"config key model.remat={cfg.model.remat!r}: expected one of "
                        f"{', '.join(transformer.REMAT_POLICIES)}") from None


def attention_impl(cfg, mesh) -> str:
    """model.attention (models/attention.py): einsum (the reference), xla, cudnn (NVIDIA GPUs) or
    splash (TPU; on CPU it runs in Pallas interpret mode, for tests). Checked against the mesh's
    platform here, before anything compiles."""
    impl = cfg.model.get("attention", "einsum")
    if impl not in ATTENTION_IMPLS:
        raise UserError(f"config key model.attention={impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    platform = mesh.devices.flat[0].platform
    if impl == "cudnn" and platform != "gpu":
        raise UserError(f"config key model.attention=cudnn needs NVIDIA GPUs; this mesh is on {platform} "
                        f"(use einsum or xla)")
    if impl == "splash" and platform == "gpu":
        raise UserError("config key model.attention=splash is a TPU kernel; on GPUs use cudnn or xla")
    return impl


def decode_scan(cfg, mesh, abstract: bool) -> bool:
    """Whether the sampler scans its layers (config key model.decode: "auto", "scan", "unrolled").
    auto: scan on accelerators, where it keeps the decode loop's fsdp gathers one layer at a time
    (sampling._layers_with_cache_scanned); unrolled on XLA:CPU, where it is faster; scan in `aot`
    (abstract runs compile the accelerator's program)."""
    mode = cfg.model.get("decode", "auto")
    if mode not in ("auto", "scan", "unrolled"):
        raise UserError(f"config key model.decode={mode!r}: expected auto, scan or unrolled")
    if mode != "auto":
        return mode == "scan"
    return abstract or mesh.devices.flat[0].platform != "cpu"


def load_target(run: Run) -> dict:
    """The target's real weights on the run's mesh (for a run built with weights=False that
    needs them after all, e.g. the target-initialised reference verbalizer)."""
    if not _is_abstract(run.target):
        return run.target
    _, target, _ = weights_lib.load_from_config(run.cfg.model, run.mesh, run.rules,
                                                dtype=weights_lib.dtype_of(weights_lib.weight_dtype_name(run.cfg.model)))
    return target


def _is_abstract(tree) -> bool:
    return any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(tree))


def rows_with_summaries(run: Run, split: str) -> np.ndarray:
    """Store rows of `split` that have a warm-start text (what the SFT stages train on)."""
    rows = run.store.rows_of_split(split)
    have = rows[np.isin(rows, np.fromiter(run.summaries, np.int64, len(run.summaries)))].astype(np.int64)
    if len(have) == 0:
        raise UserError(f"no teacher summaries for split {split!r} in {run.cfg.data.store}/{summaries_lib.FILE}; "
                        f"run: python -m nla_jax.summarize --config ...")
    return have
