"""Measurements of a trained (AV, AR) pair, shared by the trainer's eval stage (`nla/evaluation.py`),
`python -m nla_jax.evaluate` and `python -m nla_jax.explain`.

Everything is per row first (one number per evaluated activation), then averaged with a 95%
interval over *documents* (rows of one document move together): a cluster-robust t-interval for
means and paired differences (`ci`), a document bootstrap for ratios of totals (`ratio_ci`).
Definitions:

  target      t = v_nrm = sqrt(d) * u/|u|, u = v (or v - mean with nla.center), float64 on the host;
  mse_nrm     mean over dimensions of (normalise(prediction) - t)^2 = 2 (1 - cos);
  fve_nrm     1 - mse_nrm / Var(v_nrm), Var from the pair's saved training statistics (the same
              denominator the trainer logs, so numbers line up with metrics.jsonl and eval.json);
  cosine      cos(prediction, t) = 1 - mse_nrm / 2;
  floor       the renormalised mean of the training targets, sqrt(d) * mu/|mu|, as a constant
              prediction: the best constant *direction* (on the statistics sample its fve_nrm is
              exactly ActStats.floor);
  mean        the training mean mu of the normalised targets, *not* renormalised, scored without
              normalising it: fve_nrm = 0 on the statistics sample by construction (a check);
  shuffled    explanations of other rows' activations (a permutation that never keeps a
              document: `derangement_by_doc`) scored against the true row.

Explanations are produced and read in fixed-size batches (the last one padded by repeating a
row, then trimmed), so one compiled function serves every call.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nla_jax import distributed, sampling
from nla_jax.models import transformer
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import av as av_lib
from nla_jax.nla import stats as stats_lib
from nla_jax.nla import batches as batches_lib
from nla_jax.nla import steps
from nla_jax.nla.run import Run

Progress = Callable[[int], None] | None


# ============================================================================= rows and permutations

def pick_rows(store, split: str, n: int, seed: int) -> np.ndarray:
    """Up to n rows of a split, a seeded choice, ascending (the trainer's eval stage picks the same)."""
    rows = store.rows_of_split(split)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, min(n, len(rows)), replace=False))


def derangement_by_doc(docs: np.ndarray, seed: int) -> np.ndarray:
    """A permutation p with docs[p[i]] != docs[i] wherever possible (the shuffled control)."""
    rng = np.random.default_rng(seed)
    n = len(docs)
    p = rng.permutation(n)
    for _ in range(20):
        bad = np.nonzero(docs[p] == docs)[0]
        if len(bad) == 0:
            break
        for i in bad:
            j = rng.integers(n)
            p[i], p[j] = p[j], p[i]
    return p


# ============================================================================= batching

def batched(run, fn: Callable, arrays: dict[str, np.ndarray], batch: int, progress: Progress = None,
            with_offset: bool = False) -> dict[str, np.ndarray]:
    """Apply fn(global batch dict[, row offset]) -> dict of [b, ...] arrays over rows in global batches.

    `arrays` are host arrays of the same leading length n (identical on every process); the last
    batch is padded by repeating its last row and the outputs are trimmed back to n. Each process
    feeds the positions of every batch its devices hold (sharding.BatchLayout); outputs come back as
    numpy on every process. `batch` must be a multiple of the batch shards.
    """
    n = len(next(iter(arrays.values())))
    layout = run.batch_layout
    if batch % layout.shards:
        raise ValueError(f"batch {batch} must be a multiple of the {layout.shards} batch shards")
    mine = layout.local_positions(batch)
    outs = []
    for i in range(0, n, batch):
        idx = np.minimum(np.arange(i, i + batch), n - 1)[mine]
        g = batches_lib.to_global(run, {k: v[idx] for k, v in arrays.items()}, batch)
        o = fn(g, i) if with_offset else fn(g)
        outs.append({k: distributed.host_array(v) for k, v in o.items()})
        if progress is not None:
            progress(1)
    return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}


def n_batches(n: int, batch: int) -> int:
    return -(-n // batch)


@functools.lru_cache(maxsize=16)
def _explain_fn(ctx: steps.Ctx, sc: sampling.SampleConfig):
    return jax.jit(functools.partial(steps.explain, ctx=ctx, sc=sc))


@functools.lru_cache(maxsize=16)
def _predict_fn(ctx: steps.Ctx):
    return jax.jit(lambda ar, expl, expl_len: ar_lib.predict(steps.for_compute(ar, ctx), ctx.cfg, ctx.ar, expl,
                                                              expl_len))


# ============================================================================= explain and reconstruct

def explain_rows(run: Run, av: dict, acts: np.ndarray, batch: int, sc: sampling.SampleConfig, seed: int,
                 progress: Progress = None) -> dict:
    """One explanation per activation row [n, d]: tokens [n, N], lengths, expl_len, ok, logprobs (numpy).
    The sampling key of the batch starting at row i is fold_in(key(seed), i)."""
    fn = _explain_fn(run.ctx, sc)
    key = jax.random.key(seed)
    return batched(run, lambda g, i: fn(av, g["acts"], run.mean, jax.random.fold_in(key, i)), {"acts": acts}, batch,
                   progress, with_offset=True)


def permuted(out: dict[str, np.ndarray], perm: np.ndarray) -> dict[str, np.ndarray]:
    """explain_rows' per-row arrays reordered: row i gets row perm[i]'s explanation. The shuffled
    control is "the explanation of another row's activation", which the real decode already wrote
    (greedy: exactly what decoding acts[perm] would give), so it costs no second decode."""
    return {k: np.asarray(v)[perm] for k, v in out.items()}


@functools.lru_cache(maxsize=16)
def _predict_wrapped_fn(ctx: steps.Ctx):
    def f(ar, tokens, valid, read_at):
        ar = steps.for_compute(ar, ctx)
        return ar_lib.head(ar, ar_lib.features(ar, ctx.cfg, ctx.ar, tokens, valid, read_at))
    return jax.jit(f)


def reconstruct(run: Run, ar: dict, expl: np.ndarray, expl_len: np.ndarray, batch: int, progress: Progress = None) -> np.ndarray:
    """The AR's predictions [n, d] (raw head outputs; compare after normalising) from explanation ids.
    With ar.tokenize="joint" the ids are decoded and the wrapper is tokenised as one string."""
    if run.ctx.ar.joint:
        texts = [run.tokenizer.decode(np.asarray(r[:n]).tolist()) for r, n in zip(expl, expl_len)]
        toks, valid, read_at = ar_lib.host_wrapped(run.tokenizer, texts, run.ctx.ar)
        fn = _predict_wrapped_fn(run.ctx)
        out = batched(run, lambda g: {"pred": fn(ar, g["tokens"], g["valid"], g["read_at"])},
                      {"tokens": toks, "valid": valid, "read_at": read_at}, batch, progress)
        return out["pred"]
    fn = _predict_fn(run.ctx)
    out = batched(run, lambda g: {"pred": fn(ar, g["expl"], g["expl_len"])},
                  {"expl": np.asarray(expl, np.int32), "expl_len": np.asarray(expl_len, np.int32)}, batch, progress)
    return out["pred"]


def texts_to_expl(tok, texts: Sequence[str], spec: ar_lib.ARSpec, keep: str = "start") -> tuple[np.ndarray, np.ndarray]:
    """Texts -> explanation ids [n, max_len] and lengths, whitespace collapsed as in training.
    A text longer than the AR's capacity keeps its first tokens (keep="start", as the SFT AR was
    trained) or its last ones (keep="end": the raw-context baseline, whose signal is at the end)."""
    if keep == "start":
        return ar_lib.host_explanations(tok, texts, spec)
    ids = np.full((len(texts), spec.max_len), spec.pad_id, np.int32)
    lens = np.zeros(len(texts), np.int32)
    for i, t in enumerate(texts):
        row = tok.encode(" ".join(t.split()))[-spec.max_len:] if t.strip() else []
        ids[i, :len(row)] = row
        lens[i] = len(row)
    return ids, lens


def decode_explanations(tok, ex: dict) -> list[str]:
    return [tok.decode(r[:n].tolist()) for r, n in zip(ex["tokens"], ex["expl_len"])]


def context_text(tok, tokens_row: np.ndarray, position: int, n: int) -> str:
    """The decoded last n tokens up to and including `position` (n <= 0: the whole prefix)."""
    start = 0 if n <= 0 else max(0, position + 1 - n)
    return tok.decode(np.asarray(tokens_row[start:position + 1]).tolist())


# ============================================================================= per-row scores

def targets(acts: np.ndarray, stats: stats_lib.ActStats, center: bool) -> np.ndarray:
    """Normalised targets t [n, d] float64 (centred on the float64 mean the statistics were computed with)."""
    return stats_lib.normalise_np(acts, np.asarray(stats.mean, np.float64) if center else None)


def mse_rows(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-row mse_nrm between a prediction (normalised here) and normalised targets."""
    p = stats_lib.normalise_np(np.broadcast_to(pred, target.shape))
    return ((p - target) ** 2).mean(-1)


def fve(mse: np.ndarray, var: float) -> np.ndarray:
    return 1.0 - np.asarray(mse, np.float64) / var


def cosine(mse: np.ndarray) -> np.ndarray:
    return 1.0 - np.asarray(mse, np.float64) / 2.0


def floor_mse(target: np.ndarray, stats: stats_lib.ActStats, center: bool) -> np.ndarray:
    """Per-row mse_nrm of the renormalised training mean (the floor)."""
    return mse_rows(stats.floor_prediction(center)[None], target)


def mean_mse(target: np.ndarray, stats: stats_lib.ActStats, center: bool) -> np.ndarray:
    """Per-row squared error of the *unnormalised* training mean of the targets (fve 0 by construction)."""
    mu = np.asarray(stats.mean_nrm_centered if center else stats.mean_nrm, np.float64)
    return ((target - mu[None]) ** 2).mean(-1)


def score(run: Run, ar: dict, ex: dict, acts: np.ndarray, batch: int, progress: Progress = None) -> np.ndarray:
    """Per-row mse_nrm of the AR reading explanations `ex` (tokens, expl_len). A row without a closing
    tag is read up to its cap (as the RL metrics do); the failure rate is reported beside it."""
    pred = reconstruct(run, ar, ex["tokens"], ex["expl_len"], batch, progress)
    return mse_rows(pred, targets(acts, run.stats, run.ctx.center))


# ============================================================================= intervals

def ci(values: np.ndarray, docs: np.ndarray) -> dict:
    """{"mean", "lo", "hi", "n"}: mean of per-row values, 95% cluster-robust t-interval over
    documents (`stats.cluster_t_ci`; a paired difference is the interval of per-row differences).
    lo/hi are None with fewer than two documents."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    m, lo, hi = stats_lib.cluster_t_ci(values, docs)
    none = lambda x: None if np.isnan(x) else x
    return {"mean": m, "lo": none(lo), "hi": none(hi), "n": int(len(values))}


def ratio_ci(num: np.ndarray, den: np.ndarray, docs: np.ndarray, n_boot: int, seed: int,
             transform: Callable[[np.ndarray], np.ndarray] = lambda r: r) -> dict:
    """transform(sum(num) / sum(den)) with a 95% bootstrap CI resampling documents.

    For ratios of totals (loss recovered = 1 - sum KL_recon / sum KL_mean; the span-level
    share of quoted spans absent = absent spans / spans), which are not means of per-row values."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if len(num) == 0 or den.sum() <= 0:
        return {"mean": None, "lo": None, "hi": None, "n": int(len(num))}
    uniq, inv = np.unique(docs, return_inverse=True)
    sn = np.bincount(inv, num, minlength=len(uniq))
    sd = np.bincount(inv, den, minlength=len(uniq))
    idx = np.random.default_rng(seed).integers(0, len(uniq), size=(n_boot, len(uniq)))
    bn, bd = sn[idx].sum(1), sd[idx].sum(1)
    ok = bd > 0
    boots = transform(bn[ok] / bd[ok])
    return {"mean": float(transform(np.asarray(num.sum() / den.sum()))), "lo": float(np.quantile(boots, 0.025)),
            "hi": float(np.quantile(boots, 0.975)), "n": int(len(num))}


# ============================================================================= quoted spans

# A quoted span: the text between a pair of straight double quotes "…", curly double quotes “…”,
# guillemets «…» or backticks `…` (each style matched left to right, non-overlapping, never across
# another quote mark of the same style; an unclosed mark, e.g. cut by the cap, opens no span).
_QUOTE_RE = re.compile(r'"([^"]*)"|\u201c([^\u201c\u201d]*)\u201d|\u00ab([^\u00ab\u00bb]*)\u00bb|`([^`]*)`')


def _norm_text(s: str) -> str:
    return " ".join(s.casefold().split())


def quoted_spans(text: str) -> list[str]:
    """The non-empty quoted spans of an explanation (see _QUOTE_RE), normalised: case-folded and
    every whitespace run collapsed to one space, stripped."""
    out = []
    for m in _QUOTE_RE.finditer(text):
        span = _norm_text(next(g for g in m.groups() if g is not None))
        if span:
            out.append(span)
    return out


_NEXT = re.compile(r"(?<!\w)next(?!\w)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]\s+")


def split_predictions(text: str) -> tuple[str, str]:
    """(what the text says about the context, its stated predictions): the predictions run from the
    first whole word "next" (any case) outside a quoted span ("Next: «to» 93%", "the next word is
    likely to") to the end of its sentence (".", "!" or "?" outside a quote, then whitespace); what
    follows that sentence is about the context again ("Next: «to» 93%. The text ends with: «…»").
    The predictions are about a token that is not in the context yet, so quote and current-token
    checks read only the context part; a text without such a "next" is all context claims."""
    quoted = [m.span() for m in _QUOTE_RE.finditer(text)]

    def in_quote(i: int) -> bool:
        return any(a <= i < b for a, b in quoted)

    for m in _NEXT.finditer(text):
        if not in_quote(m.start()):
            for e in _SENTENCE_END.finditer(text, m.end()):
                if not in_quote(e.start()):
                    return text[:m.start()] + text[e.end():], text[m.end():e.start() + 1]
            return text[:m.start()], text[m.end():]
    return text, ""


# ============================================================================= KL between verbalizers

@functools.lru_cache(maxsize=16)
def _av_kl_fn(ctx: steps.Ctx):
    def f(av, ref, acts, tokens, lengths, mean):
        """Exact per-token KL(av || ref) over the vocabulary along given explanation tokens (teacher
        forced): per-row sum over the first `lengths` generated tokens, and that count."""
        b, L = tokens.shape

        def logp(p):
            p = steps.for_compute(p, ctx)
            logits = av_lib.teacher_logits(p["model"], p["extra"], ctx.cfg, ctx.av, acts, tokens, mean)
            return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)           # [b, L, V]

        lp, lq = logp(av), logp(ref)
        kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)                           # [b, L]
        m = (jnp.arange(L)[None, :] < lengths[:, None]).astype(jnp.float32)
        return {"kl_sum": (kl * m).sum(1), "tokens": m.sum(1)}
    return jax.jit(f)


def av_kl_rows(run: Run, av: dict, ref: dict, acts: np.ndarray, ex: dict, batch: int, progress: Progress = None) -> dict:
    """Per-row {"kl_sum", "tokens"}: KL(AV || reference AV) summed over each row's generated tokens
    (closing tag and EOS included, as in the RL loss), exact over the vocabulary at temperature 1."""
    fn = _av_kl_fn(run.ctx)
    return batched(run, lambda g: fn(av, ref, g["acts"], g["tokens"], g["lengths"], run.mean),
                   {"acts": acts, "tokens": np.asarray(ex["tokens"], np.int32),
                    "lengths": np.asarray(ex["lengths"], np.int32)}, batch, progress)


# ============================================================================= downstream effect

def denormalise(pred: np.ndarray, original: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """A reconstruction back in activation space: pred's direction at the original vector's norm,
    or, for centred targets, at |original - mean| with the mean added back."""
    pred = np.asarray(pred, np.float64)
    u = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
    o = np.asarray(original, np.float64) - (0 if mean is None else mean)
    return u * np.linalg.norm(o, axis=-1, keepdims=True) + (0 if mean is None else mean)


@functools.lru_cache(maxsize=8)
def _lower_fn(cfg, layer: int, compute_dtype):
    def f(params, tokens):
        params = steps.cast_floating(params, compute_dtype)   # the target as extraction ran it
        b, s = tokens.shape
        valid = jnp.ones((b, s), bool)
        x = transformer.embed(params, tokens, cfg=cfg)
        return transformer.run_blocks(cfg, params["layers"], x, transformer.positions_from_mask(valid), transformer.causal_mask(valid), 0, layer + 1)
    return jax.jit(f)


@functools.lru_cache(maxsize=8)
def _upper_fn(cfg, layer: int, compute_dtype):
    def f(params, xk, pos, repl):
        """xk [b, s, d] block-K output, pos [b], repl [b, m, d]: the next-token log-probs at pos with
        block K's output there unchanged and with each replacement; KL(original || replaced) [b, m]."""
        params = steps.cast_floating(params, compute_dtype)
        b, s, d = xk.shape
        m = repl.shape[1]
        rows = jnp.arange(b)
        xs = [xk] + [xk.at[rows, pos].set(repl[:, j].astype(xk.dtype)) for j in range(m)]
        x = jnp.concatenate(xs, axis=0)                                             # [(m+1) b, s, d]
        valid = jnp.ones(x.shape[:2], bool)
        y = transformer.run_blocks(cfg, params["layers"], x, transformer.positions_from_mask(valid), transformer.causal_mask(valid), layer + 1,
                         cfg.n_layers)
        at = jnp.take_along_axis(y, jnp.tile(pos, m + 1)[:, None, None], axis=1)    # [(m+1) b, 1, d]
        lp = jax.nn.log_softmax(transformer.unembed(cfg, params, at)[:, 0].astype(jnp.float32), -1)
        lp = lp.reshape(m + 1, b, -1)
        kl = jnp.sum(jnp.exp(lp[0])[None] * (lp[0][None] - lp[1:]), axis=-1)      # [m, b]
        return {"kl": kl.T, "top1": jnp.argmax(lp[0], axis=-1)}                    # [b, m], [b]
    return jax.jit(f)


def block_output(run: Run, tokens: np.ndarray, positions: np.ndarray) -> tuple[jax.Array, np.ndarray]:
    """Block K's output of the target over a batch of contexts (tokens [b, s] >= 0): (the device
    array [b, s, d], the vectors at `positions` as float64 numpy)."""
    xk = _lower_fn(run.model_cfg, run.cfg.model.layer, run.ctx.compute_dtype)(run.target, tokens)
    h = np.asarray(distributed.host_array(jnp.take_along_axis(xk, jnp.asarray(positions)[:, None, None], axis=1)[:, 0]),
                   np.float64)
    return xk, h


def next_token_kl(run: Run, xk: jax.Array, positions: np.ndarray, repl: np.ndarray,
                  with_top1: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """KL(next-token distribution at each row's position | original || with block K's output there
    replaced by repl[:, j]) [b, m], nats. Replacement = adding (repl - original) after block K at
    that one position; every other position and block is untouched. with_top1: also the original
    distribution's most likely next token [b] (the same pass; claim accuracy reads it)."""
    out = _upper_fn(run.model_cfg, run.cfg.model.layer, run.ctx.compute_dtype)(
        run.target, xk, jnp.asarray(positions, jnp.int32), jnp.asarray(repl, jnp.float32))
    kl = np.asarray(distributed.host_array(out["kl"]), np.float64)
    return (kl, np.asarray(distributed.host_array(out["top1"]), np.int64)) if with_top1 else kl


def context_batches(tokens: np.ndarray, positions: np.ndarray, batch: int, multiple: int, pad_id: int):
    """(index array, tokens [b, L], positions [b]) per batch of rows: each context cut after the
    longest position of its batch, rounded up to `multiple` tokens (few compiled shapes); tokens
    after a row's position (the store writes -1 there) become pad_id, which the causal mask keeps
    from influencing the position. The last batch repeats its last row."""
    n = len(positions)
    for i in range(0, n, batch):
        idx = np.minimum(np.arange(i, i + batch), n - 1)
        L = min(tokens.shape[1], -(-(int(positions[idx].max()) + 1) // multiple) * multiple)
        t = np.asarray(tokens[idx, :L], np.int32)
        yield idx, np.where(t < 0, pad_id, t), np.asarray(positions[idx], np.int32)
