"""CLI: export a trained NLA pair as Hugging Face safetensors directories that PyTorch users can load.

    python -m nla_jax.export --checkpoint runs/smollm2_135m_quick/train --out runs/smollm2_135m_quick/hf

OUTDIR/
  nla_export.json        provenance: checkpoint, stage and step, target model, layer, the training config
  README.md              how to use both directories from PyTorch / transformers
  av/                    the verbalizer: a complete causal LM (LlamaForCausalLM / Qwen2ForCausalLM)
    config.json, model.safetensors (or shards + index), generation_config.json,
    tokenizer.json, tokenizer_config.json (chat template, BOS/EOS/pad), special_tokens_map.json
    nla_av.json          the fixed prompt (ids and text), the marker's position and id, the closing tag,
                         the injection mode / norm / block, centring, the explanation cap, and the recipe
    nla_av_extra.safetensors   "mean" [d] (the dataset mean, used with centring) and, when the run
                         learned one, "proj" [d, d] (the input projection: v @ proj)
  ar/                    the reconstructor: blocks 0..K of the target (K+1 blocks) as a base model
    config.json          num_hidden_layers = K+1, architectures LlamaModel / Qwen2Model (no LM head),
                         "tie_last_hidden_states": false (see below); model.norm.weight is all ones and
                         is NOT part of the AR
    model.safetensors, tokenizer files
    ar_head.safetensors  "w" [d, d] (input-major: prediction = features @ w + b), "b" [d]
    nla_ar.json          layer, wrapper prefix/suffix (ids and text; the prefix carries the BOS), the
                         config's wrapper strings and how they are tokenised (ar.tokenize), the
                         explanation cap, head normalisation (rms, eps 1e-6) and the dataset statistics
                         (mean, Var(v_nrm), floor) with the centring switch

The final norm: the AR reads block K's raw output (the residual stream after block K, Hugging Face
`hidden_states[K+1]` of the full model) at the wrapper's last token. A K+1-layer transformers model
applies `model.norm` to its last hidden state, and `hidden_states[-1]` is that normed state unless the
config says `tie_last_hidden_states: false` (honoured by transformers >= 5; with older versions replace
`model.norm` by `torch.nn.Identity()` or hook `model.layers[K]`). The weight is exported as ones so the
directory loads without "newly initialised" warnings.

Weights are written in the checkpoint's dtype, unchanged: loading an export back (`load(OUTDIR)`, or
`nla_jax.weights.load(OUTDIR/av)` for the AV's transformer) gives the checkpoint's
parameters bit for bit. RoPE: nla_jax keeps q/k in the rotate-half layout transformers uses, so
the projections are written as they are (only transposed to [out, in]); no llama.cpp-style permutation.

An existing non-empty OUTDIR is refused unless --force; the export is written to a temporary
directory beside OUTDIR and renamed into place, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from nla_jax import cli, fileio, official, weights
from nla_jax.cli import cli_main
from nla_jax.errors import UserError
from nla_jax.models import transformer
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import av as av_lib
from nla_jax.nla import stats as stats_lib
from nla_jax.nla import workdir as workdir_lib
from nla_jax.weights import hf as hf_weights
from nla_jax.weights import layout

FORMAT_AV = "nla_jax.av/1"
FORMAT_AR = "nla_jax.ar/1"
HEAD_NORM_EPS = 1e-6        # nla_jax.nla.ar.features: h * rsqrt(mean(h^2) + 1e-6)
SHARD_BYTES = hf_weights.SHARD_BYTES   # shard size above which the weights are split (index.json)
ONE_PROCESS = "export runs in one process (it gathers the parameters onto the host, one shard at a time)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nla_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a trained pair: WORKDIR (final), WORKDIR/rl, WORKDIR/rl@STEP or WORKDIR/sft_av")
    p.add_argument("--out", required=True, metavar="OUTDIR", help="the export directory (created)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUTDIR")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="official format: the weights' dtype on disk (auto: an imported release's own dtype, "
                        "else the checkpoint's float32)")
    p.add_argument("--format", choices=("nla_jax", "official"), default="nla_jax",
                   help="nla_jax: the layout above; official: the public release's (OUTDIR/av, OUTDIR/ar with "
                        "nla_meta.yaml sidecars and value_head.safetensors), what its inference code reads")
    return cli.add_distributed_flags(p)  # shared with the other programs; export itself refuses several


# ----------------------------------------------------------------------------- model directories

def hf_config(mcfg, *, layers: int | None = None, base_model: bool = False, dtype: str = "float32") -> dict:
    """transformers config.json for an nla_jax ModelConfig (optionally with fewer layers, no LM head)."""
    if mcfg.family == "llama" and mcfg.qkv_bias:
        # transformers' Llama puts `attention_bias` on q, k, v *and* o; ours has no o bias.
        raise UserError(f"model {mcfg.name!r}: a llama-family model with q/k/v biases has no transformers "
                        f"equivalent (Qwen2 has exactly those biases)")
    causal, base = hf_weights.ARCHITECTURES[mcfg.family]
    eos = list(mcfg.eos_ids)
    c: dict[str, Any] = {
        "architectures": [base if base_model else causal], "model_type": hf_weights.MODEL_TYPES[mcfg.family],
        "hidden_size": mcfg.d_model, "intermediate_size": mcfg.d_ff,
        "num_hidden_layers": mcfg.n_layers if layers is None else layers,
        "num_attention_heads": mcfg.n_heads, "num_key_value_heads": mcfg.n_kv_heads, "head_dim": mcfg.head_dim,
        "vocab_size": mcfg.vocab_size, "max_position_embeddings": mcfg.max_seq_len,
        "rope_theta": float(mcfg.rope_theta), "rms_norm_eps": float(mcfg.rms_eps),
        "rope_scaling": dict(mcfg.rope_scaling) if mcfg.rope_scaling else None,
        "hidden_act": "silu", "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "tie_word_embeddings": bool(mcfg.tie_embeddings) and not base_model,
        "bos_token_id": mcfg.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": mcfg.pad_id, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
    }
    if mcfg.family == "llama":
        c["attention_bias"] = False
    elif mcfg.family == "qwen3":
        c.update(attention_bias=bool(mcfg.qkv_bias), use_sliding_window=False, sliding_window=None,
                 max_window_layers=c["num_hidden_layers"])
    elif mcfg.family == "gemma3":
        n = c["num_hidden_layers"]
        kinds = mcfg.sliding_layers[:n]
        full = {"rope_type": "default", "rope_theta": float(mcfg.rope_theta)}
        if mcfg.rope_scaling:
            full.update(dict(mcfg.rope_scaling))
        del c["rope_theta"], c["rope_scaling"], c["hidden_act"]
        c.update(attention_bias=bool(mcfg.qkv_bias), hidden_activation="gelu_pytorch_tanh",
                 layer_types=["sliding_attention" if k else "full_attention" for k in kinds],
                 sliding_window=mcfg.sliding_window or 4096,
                 query_pre_attn_scalar=_scalar(mcfg),
                 rope_parameters={"full_attention": full, "sliding_attention": {
                     "rope_type": "default", "rope_theta": float(mcfg.rope_local_theta)}},
                 final_logit_softcapping=None, attn_logit_softcapping=None)
    else:
        # transformers' Qwen2 always has q/k/v biases (zeros are written when ours has none);
        # nla_jax's loader reads `attention_bias` to know whether they are part of the model.
        c.update(attention_bias=bool(mcfg.qkv_bias), use_sliding_window=False, sliding_window=None,
                 max_window_layers=c["num_hidden_layers"])
    return c


def _scalar(mcfg) -> int | float:
    """Gemma's query_pre_attn_scalar from attn_scale = scalar ** -0.5 (an int when it is one: transformers
    5 refuses a float there)."""
    if not mcfg.attn_scale:
        return mcfg.head_dim
    x = mcfg.attn_scale ** -2
    return int(round(x)) if abs(x - round(x)) < 1e-6 else float(x)


class Lazy(NamedTuple):
    """One exported tensor, fetched to host memory only when its safetensors shard is written."""
    nbytes: int
    load: Callable[[], np.ndarray]


@jax.jit
def _layer(w, i):                     # [L, ...] (sharded) -> [...] block i, one compiled program per shape
    return jax.lax.dynamic_index_in_dim(w, i, 0, keepdims=False)


def _nbytes(a) -> int:
    return int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize


def hf_tensor_sources(mcfg, params: dict, layers: int | None = None, final_norm: bool = True,
                      lm_head: bool = True) -> dict[str, Lazy]:
    """nla_jax params -> {transformers name: Lazy} (HF [out, in] layout, the params' dtype, unchanged).

    Nothing is gathered here: each block's tensors are sliced out of the stacked (possibly
    sharded) parameters when written, so exporting a model needs host memory for one safetensors
    shard (SHARD_BYTES) rather than for the whole model (~280 GB for a 70B verbalizer in float32).
    Names and layouts come from nla_jax.weights.layout, the table the Hugging Face reader uses, so
    what is written here is what `weights.load` reads back."""
    embed = params["embed"]
    dt = np.dtype(embed.dtype)
    out = {layout.HF_TOP["embed"]: Lazy(_nbytes(embed), lambda: np.asarray(embed))}
    stacked = params["layers"]
    n = _layer_count(stacked) if layers is None else layers
    for i in range(n):
        for leaf, w in stacked.items():
            fetch = lambda w=w, i=i, leaf=leaf: np.ascontiguousarray(
                layout.to_hf_layout(mcfg, leaf, np.asarray(_layer(w, i) if isinstance(w, jax.Array) else w[i])))
            out[layout.hf_layer_name(i, leaf, mcfg)] = Lazy(_nbytes(w) // int(w.shape[0]), fetch)
    if mcfg.family == "qwen2" and not mcfg.qkv_bias:
        # transformers' Qwen2 always has q/k/v biases: write zeros, which change nothing.
        q_size, kv_size = mcfg.n_heads * mcfg.head_dim, mcfg.n_kv_heads * mcfg.head_dim
        zeros = lambda size: Lazy(size * dt.itemsize, lambda: np.zeros((size,), dt))
        for i in range(n):
            out[layout.hf_layer_name(i, "bq")] = zeros(q_size)
            for leaf in ("bk", "bv"):
                out[layout.hf_layer_name(i, leaf)] = zeros(kv_size)
    if final_norm:
        # a base model without its final norm (the AR) still needs the weight to load cleanly: ones
        norm = params.get("final_norm")
        # (Gemma's norms scale by 1 + w: its identity is zeros)
        out[layout.HF_TOP["final_norm"]] = Lazy(mcfg.d_model * dt.itemsize, (lambda: np.asarray(norm)) if norm is not None
                                                else (lambda: (np.zeros if mcfg.norm_plus_one else np.ones)((mcfg.d_model,), dt)))
    if lm_head and not mcfg.tie_embeddings:
        head = params["lm_head"]
        out[layout.HF_TOP["lm_head"]] = Lazy(_nbytes(head), lambda: np.ascontiguousarray(np.asarray(head).T))
    return out


def hf_tensors(mcfg, params: dict, layers: int | None = None, final_norm: bool = True,
               lm_head: bool = True) -> dict[str, np.ndarray]:
    """hf_tensor_sources, every tensor fetched (small models, tests)."""
    return {k: t.load() for k, t in hf_tensor_sources(mcfg, params, layers, final_norm, lm_head).items()}


def _layer_count(stacked: dict) -> int:
    return int(next(iter(stacked.values())).shape[0])


def shard_plan(sizes: dict[str, int], shard_bytes: int | None = None) -> list[list[str]]:
    """Tensor names grouped into safetensors shards of at most shard_bytes (a larger tensor alone)."""
    shard_bytes = SHARD_BYTES if shard_bytes is None else shard_bytes
    if sum(sizes.values()) <= shard_bytes:
        return [list(sizes)]
    shards, cur, size = [], [], 0
    for k, n in sizes.items():
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    shards.append(cur)
    return shards


def write_safetensors(d: str, tensors: dict[str, np.ndarray | Lazy], shard_bytes: int | None = None) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json; Lazy
    tensors are fetched one shard at a time."""
    meta = {"format": "pt"}
    lazy = {k: t if isinstance(t, Lazy) else Lazy(t.nbytes, lambda t=t: t) for k, t in tensors.items()}
    shards = shard_plan({k: t.nbytes for k, t in lazy.items()}, shard_bytes)
    if len(shards) == 1:
        save_file({k: lazy[k].load() for k in shards[0]}, os.path.join(d, "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: lazy[k].load() for k in names}, os.path.join(d, name), metadata=meta)
        weight_map.update({k: name for k in names})
    _write_json(os.path.join(d, "model.safetensors.index.json"),
                {"metadata": {"total_size": sum(t.nbytes for t in lazy.values())}, "weight_map": weight_map})


def write_tokenizer(d: str, tok, mcfg) -> None:
    """tokenizer.json (with a BOS post-processor when the model wants one, so transformers' tokenizer
    adds it as nla_jax does), tokenizer_config.json (chat template), special_tokens_map.json."""
    t = tok.tok
    if tok.add_bos and tok.bos_id is not None:
        t = HFTokenizer.from_str(t.to_str())
        b = tok.id_to_token(tok.bos_id)
        t.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A $B", special_tokens=[(b, tok.bos_id)])
    fileio.write_atomic(os.path.join(d, "tokenizer.json"), t.to_str())
    name = lambda i: tok.id_to_token(i) if i is not None else None
    specials = {"bos_token": name(tok.bos_id), "eos_token": name(tok.eos_ids[0]) if tok.eos_ids else None,
                "pad_token": name(tok.pad_id)}
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": bool(tok.add_bos),
          "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": int(mcfg.max_seq_len)}
    if tok.chat_template:
        tc["chat_template"] = tok.chat_template
    _write_json(os.path.join(d, "tokenizer_config.json"), tc)
    _write_json(os.path.join(d, "special_tokens_map.json"), {k: v for k, v in specials.items() if v is not None})


def _write_json(path: str, obj) -> None:
    fileio.write_atomic(path, fileio.json_text(obj, ensure_ascii=False))


def _dtype_name(a) -> str:
    """The dtype's name (from the array's metadata: nothing is fetched from the devices)."""
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(np.dtype(a.dtype)), "float32")


def write_model_dir(d: str, mcfg, params: dict, tok, *, layers: int | None = None, base_model: bool = False) -> None:
    """A transformers model directory for nla_jax params (all blocks, or the first `layers`)."""
    os.makedirs(d, exist_ok=True)
    dtype = _dtype_name(params["embed"])
    _write_json(os.path.join(d, "config.json"), hf_config(mcfg, layers=layers, base_model=base_model, dtype=dtype))
    write_safetensors(d, hf_tensor_sources(mcfg, params, layers, lm_head=not base_model))
    eos = list(mcfg.eos_ids)
    _write_json(os.path.join(d, "generation_config.json"),
                {"bos_token_id": mcfg.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
                 "pad_token_id": mcfg.pad_id})
    if tok is not None:
        write_tokenizer(d, tok, mcfg)


# ----------------------------------------------------------------------------- NLA extras

def av_json(spec, tok, mcfg, layer: int, input_proj: bool) -> dict:
    dec = lambda ids: tok.decode(list(ids), skip_special=False)
    return {
        "format": FORMAT_AV, "layer": int(layer), "d_model": int(mcfg.d_model),
        "prompt_ids": list(spec.prompt), "prompt_text": dec(spec.prompt), "marker_pos": spec.marker_pos,
        "marker_id": spec.marker_id, "marker_token": tok.id_to_token(spec.marker_id),
        "closer_ids": list(spec.closer), "closer_text": dec(spec.closer), "eos_id": spec.eos,
        "inject": spec.mode, "add_after": spec.add_after, "inject_norm": spec.inject_norm, "center": spec.center,
        "max_len": spec.max_len, "input_proj": bool(input_proj),
        "recipe": [
            "v = the target's residual stream after block `layer` (HF hidden_states[layer+1]) at one token, float32",
            "if center: v = v - mean            (mean: nla_av_extra.safetensors)",
            "if input_proj: v = v @ proj        (proj: nla_av_extra.safetensors, [d, d], row vector on the left)",
            "u = v / max(|v|, 1e-12)",
            "inject == 'replace': the input embedding at prompt position marker_pos is replaced by u * inject_norm",
            "inject == 'add': the residual stream h after block add_after at marker_pos becomes h + |h| * u",
            "generate from prompt_ids (up to max_len new tokens, EOS eos_id); the explanation is the text "
            "before the first closer_ids",
        ],
    }


def ar_json(spec, tok, stats, center: bool) -> dict:
    dec = lambda ids: tok.decode(list(ids), skip_special=False)
    return {
        "format": FORMAT_AR, "layer": spec.layer, "blocks": spec.layer + 1,
        "prefix_ids": list(spec.prefix), "prefix_text": dec(spec.prefix),
        "suffix_ids": list(spec.suffix), "suffix_text": dec(spec.suffix), "max_len": spec.max_len,
        # the config's wrapper strings and how host paths tokenise them (ar.tokenize), so that an imported
        # pair reads explanations exactly as the trained one did
        "tokenize": "joint" if spec.joint else "pieces", "prefix_string": spec.prefix_text,
        "suffix_string": spec.suffix_text,
        "pad_id": spec.pad_id, "head_norm": spec.head_norm, "head_norm_eps": HEAD_NORM_EPS, "center": bool(center),
        "var_nrm": stats.var(center), "floor_fve": stats.floor(center), "stats": stats.to_json(),
        "recipe": [
            "ids = prefix_ids + (explanation ids, at most max_len) + suffix_ids   (the prefix carries the BOS)",
            "if tokenize == 'joint': ids = BOS + tokens of (prefix_string + explanation.strip() + suffix_string) "
            "as one string, when that fits in len(prefix_ids) + max_len + len(suffix_ids) tokens",
            "h = the residual stream after block `layer` (the last of the `blocks` blocks, BEFORE model.norm) at "
            "the last token",
            "if head_norm == 'rms': h = h / sqrt(mean(h**2) + head_norm_eps)",
            "prediction = h @ w + b   (ar_head.safetensors; w is [in, out])",
            "compare with the activation after normalising both: x_nrm = sqrt(d) * u/|u|, u = x - mean if center "
            "else x (mean: stats.mean); mse_nrm = mean((p_nrm - t_nrm)**2) = 2 (1 - cos); "
            "fve_nrm = 1 - mse_nrm / var_nrm",
        ],
    }


_README = """# NLA export ({label})

Exported by `python -m nla_jax.export` from `{checkpoint}` (stage {kind}, step {step}); target
`{model}`, block K = {layer}. Both directories load with transformers; the NLA-specific pieces
are in their own files (`av/nla_av.json`, `av/nla_av_extra.safetensors`, `ar/nla_ar.json`,
`ar/ar_head.safetensors`), each with a `recipe`. Below, `v` is a float32 activation [d] of the target
at block K (Hugging Face `hidden_states[K+1]` of the original model).

```python
import json, torch, transformers
from safetensors.torch import load_file
torch.set_grad_enabled(False)

# verbalizer: inject an activation v [d] (float32) and generate its explanation
av = transformers.AutoModelForCausalLM.from_pretrained("av", dtype=torch.float32)
tok = transformers.AutoTokenizer.from_pretrained("av")
spec, extra = json.load(open("av/nla_av.json")), load_file("av/nla_av_extra.safetensors")
if spec["center"]: v = v - extra["mean"]
if spec["input_proj"]: v = v @ extra["proj"]
u = v / v.norm().clamp_min(1e-12)
ids = torch.tensor([spec["prompt_ids"]])
emb = av.get_input_embeddings()(ids)
emb[0, spec["marker_pos"]] = u * spec["inject_norm"]          # inject == "replace"
out = av.generate(inputs_embeds=emb, attention_mask=torch.ones_like(ids), max_new_tokens=spec["max_len"])
text = tok.decode(out[0]).split(spec["closer_text"])[0]

# reconstructor: explanation text -> predicted activation direction
ar = transformers.AutoModel.from_pretrained("ar", dtype=torch.float32)   # K+1 blocks
ar.norm = torch.nn.Identity()               # the AR reads block K's raw output (any transformers version)
rs, head = json.load(open("ar/nla_ar.json")), load_file("ar/ar_head.safetensors")
e = tok(" ".join(text.split()), add_special_tokens=False).input_ids[: rs["max_len"]]
x = torch.tensor([rs["prefix_ids"] + e + rs["suffix_ids"]])
h = ar(x, output_hidden_states=True).hidden_states[-1][0, -1]
if rs["head_norm"] == "rms": h = h * torch.rsqrt(h.pow(2).mean() + rs["head_norm_eps"])
pred = h @ head["w"] + head["b"]
```
"""


# ----------------------------------------------------------------------------- export / load

def export_pair(pair, out: str, force: bool = False, fmt: str = "nla_jax", dtype: str = "auto") -> str:
    """Write the export of a loaded pair (nla_jax.nla.workdir.load_pair) to `out`, atomically.
    `dtype` (official format): the weights' dtype on disk; auto = an imported release's own dtype,
    else the checkpoint's (float32 masters)."""
    if jax.process_count() > 1:
        raise UserError(ONE_PROCESS)
    out = os.path.abspath(out)
    _check_out(out, force)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        if fmt == "official":
            _write_official(pair, tmp, dtype)
        else:
            _write_export(pair, tmp)
        _publish_modes(tmp)
        _check_out(out, force)  # again: another process may have written it meanwhile
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish_modes(root: str) -> None:
    """mkdtemp makes 0700 directories and safetensors writes 0600 files: give the export the
    modes of ordinary files (0666 / 0777 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~umask)


def _check_out(out: str, force: bool) -> None:
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UserError(f"--out {out}: directory exists and is not empty (pass --force to replace it)")


def _write_export(pair, d: str) -> None:
    run, cfg = pair.run, pair.cfg
    K = int(cfg.model.layer)
    mcfg, tok, ctx = run.model_cfg, run.tokenizer, run.ctx
    av, ar = pair.av, pair.ar
    # the AV: a full causal LM plus its prompt/injection and extra parameters
    write_model_dir(os.path.join(d, "av"), mcfg, av["model"], tok)
    use_proj = "proj" in av["extra"]
    _write_json(os.path.join(d, "av", "nla_av.json"), av_json(ctx.av, tok, mcfg, K, use_proj))
    extra = {"mean": np.asarray(run.mean, np.float32)}
    if use_proj:
        extra["proj"] = np.asarray(av["extra"]["proj"])
    save_file(extra, os.path.join(d, "av", "nla_av_extra.safetensors"), metadata={"format": "pt"})
    # the AR: K+1 blocks as a base model, its head and wrapper
    ar_params = {"embed": ar["embed"], "layers": ar["layers"]}
    write_model_dir(os.path.join(d, "ar"), mcfg, ar_params, tok, layers=K + 1, base_model=True)
    with open(os.path.join(d, "ar", "config.json")) as f:
        c = json.load(f)
    c["tie_last_hidden_states"] = False
    _write_json(os.path.join(d, "ar", "config.json"), c)
    save_file({"w": np.asarray(ar["head"]["w"]), "b": np.asarray(ar["head"]["b"])},
              os.path.join(d, "ar", "ar_head.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(d, "ar", "nla_ar.json"), ar_json(ctx.ar, tok, run.stats, ctx.center))
    prov = {"checkpoint": os.path.abspath(pair.path), "label": pair.label, "kind": pair.kind, "step": int(pair.step),
            "workdir": pair.workdir, "model": cfg.model.source, "layer": K, "center": bool(ctx.center),
            "config": cfg.to_dict()}
    _write_json(os.path.join(d, "nla_export.json"), prov)
    fileio.write_atomic(os.path.join(d, "README.md"),
                        _README.format(label=pair.label, checkpoint=pair.path, kind=pair.kind, step=pair.step,
                                       model=cfg.model.source, layer=K))


def _write_official(pair, d: str, dtype: str = "auto") -> None:
    """The public release's layout: av/ (causal LM + nla_meta.yaml), ar/ (K+1 blocks as a causal LM with
    a tied head, final norm at identity, neither used; value_head.safetensors `weight` [out, in]; sidecar).
    An imported pair's original sidecar fields are carried over; the computed ones (tokens, templates,
    scales, layer) come from the pair's own config and equal them."""
    run, cfg = pair.run, pair.cfg
    K, mcfg, tok, ctx = int(cfg.model.layer), run.model_cfg, run.tokenizer, run.ctx
    av, ar = pair.av, pair.ar
    if ctx.av.mode != "replace" or "proj" in av["extra"] or ctx.center:
        raise UserError(f"checkpoint {pair.path}: the official format injects by replacement without centring or an "
                        f"input projection (this pair: inject={ctx.av.mode}, center={ctx.center}, "
                        f"input_proj={'proj' in av['extra']})")
    if cfg.av.closer != official.CLOSER or not cfg.av.answer_prefix.startswith(official.OPENER):
        raise UserError(f"checkpoint {pair.path}: the official reader extracts the explanation between "
                        f"{official.OPENER} and {official.CLOSER}; this pair uses av.answer_prefix="
                        f"{cfg.av.answer_prefix!r}, av.closer={cfg.av.closer!r}")
    if ctx.ar.head_norm != "none":
        raise UserError(f"checkpoint {pair.path}: ar.head_norm={ctx.ar.head_norm!r}; the official AR head reads the raw "
                        f"block output (train with --config.ar.head_norm=none)")
    if "b" in ar["head"] and np.any(np.asarray(ar["head"]["b"]) != 0):
        raise UserError(f"checkpoint {pair.path}: the AR head has a non-zero bias; the official head has none "
                        f"(train with --config.ar.head_bias=false)")
    char = cfg.av.get("marker_text") or tok.decode([ctx.av.marker_id], skip_special=False)
    av_meta, ar_meta = official.sidecars(d=mcfg.d_model, layer=K, tok=tok, av_spec=ctx.av, ar_spec=ctx.ar, cfg=cfg,
                                         base=str(cfg.model.source), injection_char=char)
    orig = pair.meta.get("official") or {}
    av_meta = {**(orig.get("av_meta") or {}), **av_meta} if orig else av_meta
    ar_meta = {**(orig.get("ar_meta") or {}), **ar_meta} if orig else ar_meta
    if orig:  # fields nla_jax does not compute stay as the release wrote them
        for m, o in ((av_meta, orig.get("av_meta") or {}), (ar_meta, orig.get("ar_meta") or {})):
            for k in ("stage", "base_checkpoint", "trained_on", "parent_checkpoints", "training", "schema_version"):
                if k in o:
                    m[k] = o[k]
            if "critic_suffix_ids" not in (o.get("tokens") or {}):
                m["tokens"].pop("critic_suffix_ids", None)
            for k in ("extraction", "critic"):
                if isinstance(o.get(k), dict):
                    m[k] = {**o[k], **{kk: v for kk, v in m[k].items() if kk in o[k]}}
    if dtype == "auto":
        dtype = orig.get("dtype") or _dtype_name(av["model"]["embed"])
    cast = lambda tree: jax.tree.map(lambda a: a.astype(weights.DTYPES[dtype]), tree)   # on device: shards stay
    av_model = cast(av["model"])
    ar = {"embed": cast(ar["embed"]), "layers": cast(ar["layers"]), "head": {"w": cast(ar["head"]["w"])}}
    write_model_dir(os.path.join(d, "av"), mcfg, av_model, tok)
    official.write_sidecar(os.path.join(d, "av"), av_meta)
    ar_cfg = mcfg.replace(tie_embeddings=True)   # no LM head to write: the official reader drops it
    write_model_dir(os.path.join(d, "ar"), ar_cfg, {"embed": ar["embed"], "layers": ar["layers"]}, tok, layers=K + 1)
    save_file({"weight": np.ascontiguousarray(np.asarray(ar["head"]["w"]).T)},
              os.path.join(d, "ar", official.VALUE_HEAD), metadata={"format": "pt"})
    official.write_sidecar(os.path.join(d, "ar"), ar_meta)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (not an nla_jax export?)")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from e


def load(outdir: str, dtype=None) -> tuple[dict, dict, dict]:
    """An export back into nla_jax: (av params {"model", "extra"}, ar params {"embed", "layers", "head"},
    specs {"mcfg", "av" (AVSpec), "ar" (ARSpec), "stats" (ActStats), "center", "tok"}).

    The AV's transformer goes through nla_jax's ordinary Hugging Face loader; dtype defaults to
    the exported one, so float32 (and bfloat16) weights come back bit for bit."""
    av_dir, ar_dir = os.path.join(outdir, "av"), os.path.join(outdir, "ar")
    a, r = _read_json(os.path.join(av_dir, "nla_av.json")), _read_json(os.path.join(ar_dir, "nla_ar.json"))
    if a.get("format") != FORMAT_AV or r.get("format") != FORMAT_AR:
        raise UserError(f"{outdir}: export format {a.get('format')!r}/{r.get('format')!r}, this nla_jax reads "
                        f"{FORMAT_AV}/{FORMAT_AR}")
    if dtype is None:
        dtype = weights.DTYPES[_read_json(os.path.join(av_dir, "config.json")).get("torch_dtype", "float32")]
    mcfg, model, tok = weights.load(av_dir, dtype)
    extra_f = load_file(os.path.join(av_dir, "nla_av_extra.safetensors"))
    extra = {"proj": jnp.asarray(extra_f["proj"])} if a["input_proj"] else {}
    av_spec = av_lib.AVSpec(prompt=tuple(a["prompt_ids"]), marker_pos=a["marker_pos"], marker_id=a["marker_id"],
                            closer=tuple(a["closer_ids"]), eos=a["eos_id"], mode=a["inject"],
                            add_after=a["add_after"], inject_norm=a["inject_norm"], center=a["center"],
                            max_len=a["max_len"])
    # the AR: embed + K+1 blocks read through the same safetensors reader, then its head
    K = int(r["layer"])
    acfg, _ = hf_weights.model_config(ar_dir)
    if acfg.n_layers != K + 1:
        raise UserError(f"{ar_dir}/config.json: {acfg.n_layers} layers, nla_ar.json says layer {K} (K+1 blocks)")
    read = hf_weights.leaf_reader(ar_dir, acfg)
    abstract = transformer.abstract_params(acfg, dtype)
    full = lambda s: tuple(slice(None) for _ in s.shape)
    ar_params = {"embed": jnp.asarray(read("embed", full(abstract["embed"])), dtype),
                 "layers": {k: jnp.asarray(read(f"layers/{k}", full(v)), dtype) for k, v in abstract["layers"].items()}}
    head = load_file(os.path.join(ar_dir, "ar_head.safetensors"))
    ar_params["head"] = {"w": jnp.asarray(head["w"]), "b": jnp.asarray(head["b"])}
    ar_spec = ar_lib.ARSpec(prefix=tuple(r["prefix_ids"]), suffix=tuple(r["suffix_ids"]), max_len=r["max_len"],
                            pad_id=r["pad_id"], layer=K, head_norm=r["head_norm"],
                            joint=r.get("tokenize", "pieces") == "joint",  # older exports: pieces
                            prefix_text=r.get("prefix_string", ""), suffix_text=r.get("suffix_string", ""))
    specs = {"mcfg": mcfg, "av": av_spec, "ar": ar_spec, "stats": stats_lib.ActStats.from_json(r["stats"]),
             "center": bool(r["center"]), "tok": tok, "mean": extra_f["mean"]}
    return {"model": model, "extra": extra}, ar_params, specs


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = os.path.abspath(args.out)
    _check_out(out, args.force)  # before the slow load
    if args.num_processes > 1:
        raise UserError(ONE_PROCESS)  # before connecting to anyone
    cli.start_distributed(args)
    if jax.process_count() > 1:
        raise UserError(ONE_PROCESS)
    cli.enable_compilation_cache()
    cli.quiet_orbax_readonly()
    pair = workdir_lib.load_pair_here(args.checkpoint, with_target=False, dtype="weight")  # the masters as saved
    export_pair(pair, out, args.force, args.format, args.dtype)
    sizes = {sub: sum(os.path.getsize(os.path.join(out, sub, f)) for f in os.listdir(os.path.join(out, sub)))
             for sub in ("av", "ar")}
    print(f"exported {pair.label} to {out}: av/ ({sizes['av'] / 1e6:.1f} MB, {pair.run.model_cfg.n_layers} blocks), "
          f"ar/ ({sizes['ar'] / 1e6:.1f} MB, {pair.cfg.model.layer + 1} blocks + head)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
