"""The official NLA release's on-disk format: read and check a released AV/AR pair, and the sidecars.

A released pair is two Hugging Face directories, each with an `nla_meta.yaml` sidecar (kind
nla_model, role av | ar, schema_version 2; facts in ../shared/OFFICIAL_FORMAT.md):

  AV_DIR   a full causal LM of the target's family
  AR_DIR   the target's blocks 0..K as a causal LM (its final norm and LM head are not used) plus
           value_head.safetensors: one tensor `weight` [d_out, d_in], y = W h, no bias

Everything is checked before any weight is read (`check_pair`): the sidecars exist and say what
they are, the AR holds K+1 blocks for the sidecar's extraction layer K, both models have the
sidecar's d_model, the head is [d, d]; the marker check (one id, stated neighbours) runs when the
AV prompt is built (nla_jax.nla.av.text_marker_prompt) on the AV's own tokenizer. The release's
conventions become ordinary config values (`apply_to_config`): nothing about them is hard-wired.

Conversion is exact: weights keep their dtype and values (the head is only transposed to nla_jax's
input-major layout), so official -> nla_jax -> official is bitwise (tests/test_official.py).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import yaml
from safetensors import safe_open

from nla_jax import fileio
from nla_jax.errors import UserError
from nla_jax.models import transformer
from nla_jax.models.config import ModelConfig
from nla_jax.weights import hf

SIDECAR = "nla_meta.yaml"
VALUE_HEAD = "value_head.safetensors"
SCHEMA_VERSION = 2
AV_TEMPLATE_KEYS = ("av", "actor")      # the reader accepts either name
AR_TEMPLATE_KEYS = ("ar", "critic")
ROLES = {"av": ("av", "actor"), "ar": ("ar", "critic")}
OPENER, CLOSER = "<explanation>", "</explanation>"   # the release's answer tags (its reader's regex)


def read_sidecar(d: str, role: str) -> dict[str, Any]:
    """The parsed nla_meta.yaml of a model directory of the given role ("av" / "ar")."""
    path = os.path.join(d, SIDECAR)
    if not os.path.isdir(d):
        raise UserError(f"--{role} {d}: no such directory")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; an official NLA directory carries its sidecar (the release's reader "
                        f"refuses a directory without it)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(meta, dict) or meta.get("kind") != "nla_model":
        raise UserError(f"{path}: key kind={None if not isinstance(meta, dict) else meta.get('kind')!r}, "
                        f"expected 'nla_model'")
    if meta.get("role") not in ROLES[role]:
        raise UserError(f"{path}: key role={meta.get('role')!r}, expected {role!r} (is --{role} the other model?)")
    for key in ("d_model", "tokens", "prompt_templates"):
        if key not in meta:
            raise UserError(f"{path}: key {key} is missing")
    return meta


def template(meta: dict, keys: tuple[str, ...], path: str) -> str:
    t = meta.get("prompt_templates") or {}
    for k in keys:
        if t.get(k):
            return str(t[k])
    raise UserError(f"{path}: key prompt_templates.{keys[0]} (or .{keys[1]}) is missing")


def injection_scale(meta: dict, path: str, override: float | None = None) -> float:
    """extraction.injection_scale; absent means "not set" and must be given explicitly."""
    v = (meta.get("extraction") or {}).get("injection_scale")
    if v is None:
        v = override
    if v is None:
        raise UserError(f"{path}: key extraction.injection_scale is not set; pass --injection-scale")
    if v == "sqrt_d_model":
        return math.sqrt(int(meta["d_model"]))
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{path}: key extraction.injection_scale={v!r} is not a number") from None
    if not v > 0:
        raise UserError(f"{path}: key extraction.injection_scale={v} must be positive")
    return v


def mse_scale(meta: dict, d: int) -> float:
    """extraction.mse_scale; absent means sqrt(d_model)."""
    v = (meta.get("extraction") or {}).get("mse_scale")
    return math.sqrt(d) if v in (None, "sqrt_d_model") else float(v)


def extraction_layer(meta: dict, path: str) -> int:
    k = (meta.get("critic") or {}).get("extraction_layer_index")
    if not isinstance(k, int) or k < 0:
        raise UserError(f"{path}: key critic.extraction_layer_index={k!r}, expected a block index >= 0")
    return k


def _tokens(meta: dict, path: str) -> dict:
    t = meta.get("tokens") or {}
    for k in ("injection_char", "injection_token_id", "injection_left_neighbor_id", "injection_right_neighbor_id"):
        if t.get(k) is None:
            raise UserError(f"{path}: key tokens.{k} is missing")
    return t


def check_pair(av_dir: str, ar_dir: str, injection_scale_override: float | None = None) -> dict:
    """Everything about a released pair that can be checked without reading weights; returns
    {"av_meta", "ar_meta", "av_cfg", "ar_cfg", "layer", "d", "injection_scale"}."""
    av_meta, ar_meta = read_sidecar(av_dir, "av"), read_sidecar(ar_dir, "ar")
    av_path, ar_path = os.path.join(av_dir, SIDECAR), os.path.join(ar_dir, SIDECAR)
    av_cfg, _ = hf.model_config(av_dir)
    ar_cfg, _ = hf.model_config(ar_dir)
    d = int(av_meta["d_model"])
    for name, cfg, meta, p in (("AV", av_cfg, av_meta, av_path), ("AR", ar_cfg, ar_meta, ar_path)):
        if cfg.d_model != int(meta["d_model"]):
            raise UserError(f"{p}: key d_model={meta['d_model']} but the {name}'s config.json has hidden_size "
                            f"{cfg.d_model}")
    if int(ar_meta["d_model"]) != d:
        raise UserError(f"{ar_path}: key d_model={ar_meta['d_model']} differs from the AV's {d}")
    K = extraction_layer(ar_meta, ar_path)
    if ar_cfg.n_layers != K + 1:
        raise UserError(f"{ar_path}: key critic.extraction_layer_index={K} needs an AR of {K + 1} blocks, but "
                        f"{os.path.join(ar_dir, 'config.json')} has num_hidden_layers={ar_cfg.n_layers}")
    if not K < av_cfg.n_layers:
        raise UserError(f"{ar_path}: key critic.extraction_layer_index={K} is out of range for the AV's "
                        f"{av_cfg.n_layers} blocks")
    av_k = (av_meta.get("critic") or {}).get("extraction_layer_index")
    if av_k is not None and av_k != K:
        raise UserError(f"{av_path}: key critic.extraction_layer_index={av_k} differs from the AR's {K}")
    for f in ("family", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size"):
        if getattr(av_cfg, f) != getattr(ar_cfg, f):
            raise UserError(f"{os.path.join(ar_dir, 'config.json')}: {f}={getattr(ar_cfg, f)!r} differs from the AV's "
                            f"{getattr(av_cfg, f)!r}")
    if ar_cfg.sliding_layers != av_cfg.sliding_layers[:K + 1]:
        raise UserError(f"{os.path.join(ar_dir, 'config.json')}: layer_types {list(ar_cfg.layer_types)} are not the "
                        f"AV's first {K + 1} ({list(av_cfg.layer_types[:K + 1])})")
    ms = mse_scale(ar_meta, d)
    if abs(ms - math.sqrt(d)) > 1e-6 * math.sqrt(d):
        raise UserError(f"{ar_path}: key extraction.mse_scale={ms} is not sqrt(d_model)={math.sqrt(d):.6g} "
                        f"(nla_jax normalises to sqrt(d))")
    head_shape = value_head_shape(ar_dir)
    if head_shape != (d, d):
        raise UserError(f"{os.path.join(ar_dir, VALUE_HEAD)}: weight has shape {head_shape}, expected [{d}, {d}]")
    _tokens(av_meta, av_path)
    template(av_meta, AV_TEMPLATE_KEYS, av_path)
    template(ar_meta, AR_TEMPLATE_KEYS, ar_path)
    return {"av_meta": av_meta, "ar_meta": ar_meta, "av_cfg": av_cfg, "ar_cfg": ar_cfg, "layer": K, "d": d,
            "injection_scale": injection_scale(av_meta, av_path, injection_scale_override)}


def release_dtype(av_dir: str) -> str:
    """The dtype a release stores its weights in (the AV's config.json `torch_dtype` / `dtype`):
    "float32", "bfloat16" or "float16". An imported pair trains in float32 masters; `export
    --format official` writes this dtype back, so a bf16 release round-trips bit for bit."""
    with open(os.path.join(av_dir, "config.json"), encoding="utf-8") as f:
        c = json.load(f)
    name = str(c.get("torch_dtype") or c.get("dtype") or "float32").replace("torch.", "")
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"{os.path.join(av_dir, 'config.json')}: key torch_dtype={name!r}: expected float32, bfloat16 "
                        f"or float16")
    return name


def value_head_shape(ar_dir: str) -> tuple[int, ...]:
    path = os.path.join(ar_dir, VALUE_HEAD)
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; the AR's linear head ships beside its config.json")
    try:
        with safe_open(path, "numpy") as f:
            keys = list(f.keys())
            if keys != ["weight"]:
                raise UserError(f"{path}: holds {keys}, expected the one tensor 'weight' (a Linear without bias)")
            return tuple(f.get_slice("weight").get_shape())
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file: {e}") from None


def apply_to_config(cfg, info: dict, av_dir: str) -> None:
    """The release's conventions as the config values nla_jax runs with (in place)."""
    av_meta, ar_meta = info["av_meta"], info["ar_meta"]
    av_path, ar_path = os.path.join(av_dir, SIDECAR), "AR " + SIDECAR
    tok = _tokens(av_meta, av_path)
    av_t = template(av_meta, AV_TEMPLATE_KEYS, av_path)
    if "{injection_char}" not in av_t:
        raise UserError(f"{av_path}: key prompt_templates.av has no {{injection_char}} placeholder: {av_t!r}")
    ar_t = template(ar_meta, AR_TEMPLATE_KEYS, ar_path)
    if ar_t.count("{explanation}") != 1:
        raise UserError(f"{ar_path}: key prompt_templates.ar must hold {{explanation}} once: {ar_t!r}")
    prefix, suffix = ar_t.split("{explanation}")
    with cfg.unlocked():
        cfg.model.source = os.path.abspath(av_dir)
        cfg.model.layer = int(info["layer"])
        cfg.av.user = av_t.replace("{injection_char}", "{marker}")
        cfg.av.marker = str(int(tok["injection_token_id"]))
        cfg.av.marker_text = str(tok["injection_char"])
        cfg.av.marker_neighbors = (int(tok["injection_left_neighbor_id"]), int(tok["injection_right_neighbor_id"]))
        cfg.av.inject = "replace"
        cfg.av.inject_norm = float(info["injection_scale"])
        cfg.av.center = False
        cfg.av.input_proj = False
        cfg.ar.prefix, cfg.ar.suffix = prefix, suffix
        cfg.ar.head_norm = "none"
        cfg.ar.head_bias = False
        cfg.nla.center = False


def read_ar(ar_dir: str, ar_cfg: ModelConfig) -> dict:
    """AR params {"embed", "layers" (K+1 blocks), "head": {"w" [d_in, d_out]}} as float32/bf16 host
    arrays in the files' values (the head transposed from torch's [out, in])."""
    read = hf.leaf_reader(ar_dir, ar_cfg)
    abstract = transformer.abstract_params(ar_cfg)
    full = lambda a: tuple(slice(None) for _ in a.shape)
    layers = {k: read(f"layers/{k}", full(a)) for k, a in abstract["layers"].items()}
    with safe_open(os.path.join(ar_dir, VALUE_HEAD), "numpy") as f:
        w = np.asarray(f.get_tensor("weight"), np.float32)
    return {"embed": read("embed", full(abstract["embed"])), "layers": layers, "head": {"w": np.ascontiguousarray(w.T)}}


def sidecars(*, d: int, layer: int, tok, av_spec, ar_spec, cfg, base: str, injection_char: str) -> tuple[dict, dict]:
    """(AV sidecar, AR sidecar) in the release's schema for a pair nla_jax holds (export
    --format official). Templates and token fields are the pair's own, recovered from its config."""
    p = av_spec.marker_pos
    prompt = av_spec.prompt
    tokens = {"injection_char": injection_char, "injection_token_id": int(av_spec.marker_id),
              "injection_left_neighbor_id": int(prompt[p - 1]), "injection_right_neighbor_id": int(prompt[p + 1]),
              "critic_suffix_ids": [int(i) for i in ar_spec.suffix]}
    templates = {"av": cfg.av.user.replace("{marker}", "{injection_char}"),
                 "ar": cfg.ar.prefix + "{explanation}" + cfg.ar.suffix}
    common = {"kind": "nla_model", "schema_version": SCHEMA_VERSION, "stage": "rl", "base_checkpoint": base,
              "d_model": int(d), "tokens": tokens, "prompt_templates": templates,
              "critic": {"extraction_layer_index": int(layer)}, "trained_on": None, "parent_checkpoints": [],
              "training": {"framework": "nla_jax"}}
    av = dict(common, role="av", extraction={"injection_scale": float(av_spec.inject_norm), "mse_scale": math.sqrt(d)})
    ar = dict(common, role="ar", extraction={"injection_scale": None, "mse_scale": math.sqrt(d)})
    return av, ar


def write_sidecar(d: str, meta: dict) -> None:
    fileio.write_atomic(os.path.join(d, SIDECAR), yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))
