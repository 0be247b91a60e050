"""Building blocks the files in configs/ share (mesh, sharding rules, sampler defaults)."""
import ml_collections

from nla_jax.sharding import DEFAULT_RULES


def variants(arg: str | None, allowed) -> list[str]:
    """The comma-separated `:variant` list of a config file, each checked against `allowed`."""
    chosen = [v for v in (arg or "").split(",") if v]
    for v in chosen:
        if v not in allowed:
            raise ValueError(f"unknown variant {v!r} (one of {', '.join(allowed)})")
    return chosen


def mesh(shape=(-1, 1, 1), platform: str = "any") -> ml_collections.ConfigDict:
    """Mesh axes (data, fsdp, tensor); one -1 takes the remaining devices. `platform` ("any", "cpu",
    "gpu", "tpu"): the JAX backend the config is meant for; a run on another backend is refused
    (a 7B config on a CPU-only install would otherwise train on CPU)."""
    return ml_collections.ConfigDict({"shape": tuple(shape), "axes": ("data", "fsdp", "tensor"),
                                      "platform": platform})


def tpu(cfg, topology: str, chips: int, shape, hbm_gb: float) -> None:
    """Make `cfg` a TPU variant: the mesh `shape` on the `chips` chips of slice `topology` (libtpu's
    name, e.g. "v5p:2x2x2"), which `python -m nla_jax.aot` compiles for with the real TPU compiler."""
    cfg.mesh.platform = "tpu"
    cfg.model.attention = "splash"   # the TPU attention kernel (models/attention.py)
    cfg.mesh.shape = tuple(shape)
    cfg.aot.update(dict(topology=topology, devices=chips, device_memory_gb=hbm_gb, usable_fraction=0.95,
                        accelerator=f"TPU-{topology.split(':')[0]}-{hbm_gb:g}GB"))


def rules(**overrides) -> tuple:
    """The logical-axis -> mesh-axis table. Override a name with rules(embed=None, ...)."""
    table = dict(DEFAULT_RULES)
    table.update(overrides)
    return tuple((k, v) for k, v in table.items())


def sample(**kw) -> ml_collections.ConfigDict:
    base = dict(max_new_tokens=128, temperature=0.7, top_k=0, top_p=0.9, greedy=False, seed=0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def data(**kw) -> ml_collections.ConfigDict:
    """Corpus -> positions -> splits -> activation store (see nla_jax/extract.py)."""
    base = dict(
        # {"kind": text_dir|jsonl|parquet, "path": ..., "name": ...}; default: the embedded default
        # corpus, built by `python -m nla_jax.data.default_corpus --out runs/default_corpus`
        sources=[{"kind": "jsonl", "path": "runs/default_corpus/chat.jsonl", "name": "chat"},
                 {"kind": "jsonl", "path": "runs/default_corpus/prose.jsonl", "name": "prose"}],
        store="runs/acts",
        seed=0,
        k=8,                 # positions per document
        min_position=50,     # never position 0 (attention sink) nor the first tokens
        max_len=256,         # documents are truncated to this many tokens
        splits=(("av_sft", 0.25), ("ar_sft", 0.25), ("rl", 0.45), ("eval", 0.05)),
        dtype="float32",     # store dtype: float32 or bfloat16
        batch=8,             # documents per global extraction batch (rounded up to whole batch shards)
        seq_multiple=64,     # pad batches to a multiple of this length (few compiled shapes)
        chunk_rows=256,
        top_k=0,             # store the target's top_k next tokens (ids + probabilities) per row, from the same
                             # forward pass (the blocks after K run too); summarize's "predict" warm start reads them
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


TEACHER_PROMPT = (
    "Here is the end of a text:\n\n{context}\n\n"
    "In two or three sentences, say what matters most for predicting the next word: the topic, "
    "the style, and what the last words set up. Finish with a sentence about the final word "
    "\u00ab{last}\u00bb.")


def summarize(**kw) -> ml_collections.ConfigDict:
    """Teacher summaries for the warm start (see nla_jax/summarize.py)."""
    base = dict(
        teacher="target",            # or a model source (GGUF path / HF dir), "quote" (no model: final tokens only),
                                     # or "predict" (the target's own next-token predictions: nla/selftext.py)
        splits=("av_sft", "ar_sft"),
        prompt=TEACHER_PROMPT,       # {context}: decoded last context_tokens; {last}: the final tokens
        context_tokens=48,
        append_final_tokens=4,       # quote the context's last N tokens after the summary (0: off)
        quote_tokens=8,              # teacher="quote": how many final tokens the text quotes
        predict_k=3,                 # teacher="predict": the target's top next tokens named, with probabilities
        before_tokens=3,             # teacher="predict": tokens before the current one quoted
        predict_style="token",       # teacher="predict": "token" (Token «x» after «...») | "quote" (in reading order)
                                     # | "next_first" (the predictions, then the quote: ends with the current token)
        max_new_tokens=96,
        temperature=0.7,
        top_p=0.9,
        batch=16,
        seed=0,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


# ----------------------------------------------------------------------------- the NLA (issue 4)

def optim(lr: float, lr_head: float = 1e-4, lr_proj: float = 1e-3, **kw) -> ml_collections.ConfigDict:
    """AdamW per parameter group (body / AR head / AV input projection); embeddings frozen by default."""
    base = dict(lr=lr, lr_head=lr_head, lr_proj=lr_proj, warmup=10, schedule="constant", clip=1.0,
                weight_decay=0.0, b1=0.9, b2=0.999, train_embed=False,
                train_blocks=(0, -1))    # lever: blocks [start, stop) that train; -1 = to the end
    base.update(kw)
    return ml_collections.ConfigDict(base)


def nla(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Add the NLA sections (av, ar, nla, sft_av, sft_ar, rl, train) to a target config."""
    cfg.nla = ml_collections.ConfigDict(dict(
        center=False,               # lever: targets are normalise(v - mean) instead of normalise(v)
        stats_rows=4096,            # rows sampled for mean / norm / Var(v_nrm)
        stats_splits=("av_sft", "ar_sft"),
        seed=0,
    ))
    cfg.av = ml_collections.ConfigDict(dict(
        user="<concept>{marker}</concept>\nDescribe the text this concept came from.",
        answer_prefix="<explanation>",
        closer="</explanation>",
        marker="auto",              # "auto": an unused special token; or a token string / id
        marker_text="",             # the official release's rule: this character written as text (one token,
        marker_neighbors=(),        #   id av.marker), found once with these (left, right) neighbour ids
        inject="replace",           # replace | add (added norm-matched after block add_after)
        add_after=1,
        inject_norm=0.0,            # replace mode: L2 norm of the injected vector; 0 = ~1.1 x mean norm
        center=False,               # inject v - mean
        input_proj=False,           # lever: learned [d, d] projection (identity at init)
        max_len=64,                 # explanation cap (tokens, closing tag and EOS included)
    ))
    cfg.ar = ml_collections.ConfigDict(dict(
        prefix="Explanation: ",
        suffix="\nThe concept:",
        head_norm="rms",            # lever: rms-normalise the head input | none
        head_bias=True,             # the head's bias (the official release's head has none)
        tokenize="pieces",          # explain/evaluate: "joint" tokenises prefix + text + suffix as one string
        head_init="identity",       # lever: identity | ridge (ridge from ~500 rows overfit: benchmarks/levers.py)
    ))
    cfg.sft_av = ml_collections.ConfigDict(dict(
        steps=200, batch=8, val_rows=64, eval_every=50,
        optim=optim(5e-5),
    ))
    cfg.sft_ar = ml_collections.ConfigDict(dict(
        steps=200, batch=16, val_rows=128, eval_every=50,
        ridge_rows=1024, ridge_lambda=1e-2,         # ar.head_init="ridge" only
        optim=optim(3e-5, lr_head=1e-4),
    ))
    cfg.rl = ml_collections.ConfigDict(dict(
        steps=50, batch=8, group_size=4,
        beta=0.01, kl="k3",                         # KL to the SFT verbalizer
        eps_low=0.2, eps_high=0.2,                  # clip range (eps_high > eps_low: "clip higher")
        advantage="grpo", adv_eps=1e-4, adv_ddof=1,
        agg="token_mean",                           # token_mean | seq_mean_token_mean | seq_mean_token_sum | drgrpo
        fail_reward=-2.0,                           # explanation without a closing tag, or empty
        temperature=1.0, top_k=0, top_p=1.0,
        share_prompt=True,                          # run each group's shared prompt once in the update's forward
        init_from_sft=True, seed=0,
        optim_av=optim(5e-6, warmup=0), optim_ar=optim(3e-5, lr_head=1e-4, warmup=0),
    ))
    cfg.train = ml_collections.ConfigDict(dict(
        workdir=workdir, stages=("sft_av", "sft_ar", "rl", "eval"),
        keep=2, ckpt_every=50, log_every=1, async_checkpoint=True, max_nonfinite=5,
        # Also keep every checkpoint whose step is a multiple of this (0: only the newest `keep`): a stage
        # read back part way, e.g. evaluate WORKDIR/sft_av@700 against the final sft_av (a shorter warm start).
        keep_every=0,
        # SFT batches padded to their longest warm-start text rounded up to this many tokens, not to
        # the explanation cap (batches.text_widths), and the RL update run on its rollouts up to the
        # longest sampled one, rounded alike (steps.rl_update): same losses, less padding; each width
        # compiles once. 0: every batch to the cap, and RL as one function (rollout + update).
        text_bucket=8,
    ))
    cfg.eval = ml_collections.ConfigDict(dict(
        rows=128, split="eval", temperature=0.0, n_examples=4, n_boot=1000, seed=0,
        batch=16,                   # rows per compiled batch (explain, AR, KL; downstream in evaluate)
        zero_rows=32,               # eval stage: zero-vector explanations (the injection check) on this many rows; 0 = all
        # -- `python -m nla_jax.evaluate` only (the trainer's eval stage ignores these)
        context_tokens=16,          # raw-context baseline: the last N tokens up to the position, read by the AR
        quote_window=0,             # quote hallucinations: tokens up to the position that count as context; 0 = all
        position_bins=4,            # fve by token position: equal-count bins of the evaluated positions
        downstream=True,            # next-token KL with block K's output replaced (target forwards over contexts)
        kl_ref=True,                # KL of the AV to its reference verbalizer along its explanations
        summaries="",               # teacher-summary baseline: a summaries.jsonl; "" = STORE/summaries.jsonl
        seq_multiple=64,            # downstream contexts are cut to a multiple of this (few compiled shapes)
        sample_context_tokens=32,   # the report's sample explanations show this many context tokens
    ))
    return cfg
