"""Building blocks the files in configs/ share (mesh, sharding rules, sampler defaults)."""
import ml_collections

from nla_jax.sharding import DEFAULT_RULES


def mesh(shape=(-1, 1, 1)) -> ml_collections.ConfigDict:
    """Mesh axes (data, fsdp, tensor); one -1 takes the remaining devices."""
    return ml_collections.ConfigDict({"shape": tuple(shape), "axes": ("data", "fsdp", "tensor")})


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
        batch_per_process=8,
        seq_multiple=64,     # pad batches to a multiple of this length (few compiled shapes)
        chunk_rows=256,
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
        teacher="target",            # or a model source (GGUF path / HF dir) for another teacher
        splits=("av_sft", "ar_sft"),
        prompt=TEACHER_PROMPT,       # {context}: decoded last context_tokens; {last}: the final tokens
        context_tokens=48,
        append_final_tokens=4,       # quote the context's last N tokens after the summary (0: off)
        max_new_tokens=96,
        temperature=0.7,
        top_p=0.9,
        batch=16,
        seed=0,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)
