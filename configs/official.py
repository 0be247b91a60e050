"""The settings an imported official NLA pair runs with (`python -m nla_jax.import_official`).

    python -m nla_jax.import_official --av AV_DIR --ar AR_DIR --out WORKDIR [--config configs/official.py]

The importer fills model.source (the AV directory: its config.json and tokenizer), model.layer, the
marker (the release's character + id + neighbour ids), the AV prompt and AR wrapper templates, the
injection scale and the head convention (no input norm, no bias) from the pair's nla_meta.yaml
sidecars; what is set here is everything else (mesh, sampling, evaluation, RL settings if the pair is
trained further). Real-scale targets: configs/gemma3_12b.py / gemma3_27b.py / qwen2_5_7b.py give
their meshes; pass one of those with --config instead.

    configs/official.py:WORKDIR   the config an import saved in WORKDIR/import_config.json (continue
                                  with RL: python -m nla_jax.train --config configs/official.py:WORKDIR ...)
"""
import json
import os

import ml_collections

from configs import common


def get_config(arg=None):
    if arg:
        path = os.path.join(arg, "import_config.json")
        if not os.path.isfile(path):
            raise ValueError(f"{path} does not exist (not a work directory written by nla_jax.import_official)")
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dict(source="", dtype="float32", weight_dtype="float32", layer=0,
                                               remat="minimal", decode="auto", attention="einsum", seed=0))
    cfg.mesh = common.mesh((-1, 1, 1))
    cfg.rules = common.rules()
    cfg.data = common.data(store="")
    cfg.summarize = common.summarize()
    cfg.sample = common.sample()
    common.nla(cfg, workdir="")
    official(cfg)
    return cfg


def official(cfg) -> None:
    """The release's conventions (the importer overwrites the values its sidecars state)."""
    cfg.av.update(answer_prefix="<explanation>\n", closer="</explanation>", max_len=150)
    cfg.ar.update(head_norm="none", head_bias=False, head_init="identity", tokenize="joint")
