"""Activation verbalizer: a copy of the target that reads one activation as a token embedding.

The prompt is fixed and identical for every row (so batches need no padding): a chat turn
holding a marker token inside <concept>...</concept>, then the assistant's answer prefix
"<explanation>". Two marker conventions (config section `av`):

  marker="auto" / a token / an id, marker_text=""   (the default for training from scratch) a special
           token the tokenizer never produces from ordinary text, inserted by id; the prompt is
           checked to hold it exactly once;
  marker_text="㈎" (+ marker = its id, marker_neighbors = (left id, right id))   the official
           release's rule: the character is written into the prompt as text, must tokenise to one
           id, and the rendered prompt must hold exactly one position with that id whose neighbours
           are the stated ids (the `>` and `</` of <concept>…</concept>).

Injection modes:

  replace  the marker's embedding row is replaced by the activation rescaled to `inject_norm`
           (a round number a bit above the dataset's mean norm unless set);
  add      the activation's direction is added, norm-matched, to the residual stream after
           block `add_after` at the marker (Activation Oracles style).

An optional learned input projection [d, d] (identity at init) maps the vector first.
Explanations end with the closing tag's token ids, exactly as the SFT targets are built, so
extraction inside the compiled RL step is a token-sequence match.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nla_jax.errors import UserError
from nla_jax.models import transformer
from nla_jax.models.config import ModelConfig
from nla_jax.models.logprobs import token_logprobs

_PLACEHOLDER = "\u0000MARKER\u0000"


@dataclasses.dataclass(frozen=True)
class AVSpec:
    prompt: tuple[int, ...]     # fixed prompt ids, marker included, ending with the answer prefix
    marker_pos: int
    marker_id: int
    closer: tuple[int, ...]     # ids of the closing tag as SFT targets end
    eos: int
    mode: str                   # replace | add
    add_after: int              # block index for mode=add
    inject_norm: float          # replace mode: the injected vector's L2 norm
    center: bool                # inject v - mean instead of v
    max_len: int                # explanation cap in generated tokens (closer and EOS included)


def choose_marker(tok, rendered_ids: Sequence[int], want) -> int:
    """The marker token id: `want` (id or token string) or, for "auto", an unused special token."""
    if isinstance(want, int) or (isinstance(want, str) and want.isdigit()):
        mid = int(want)
    elif want != "auto":
        mid = tok.token_to_id(want)
        if mid is None:
            raise UserError(f"config key av.marker={want!r} is not a token of the target's vocabulary")
    else:
        reserved = {tok.bos_id, tok.pad_id, *tok.eos_ids, *rendered_ids}
        free = sorted(i for i in tok.special_ids if i not in reserved)
        if not free:
            raise UserError("av.marker=auto: the tokenizer has no unused special token; set av.marker to a token id")
        mid = free[-1]
    if not 0 <= mid < tok.vocab_size:
        raise UserError(f"config key av.marker={want!r}: id {mid} is outside the vocabulary")
    return mid


def auto_norm(mean_norm: float) -> float:
    """A round number a bit above the mean activation norm (the public release: 150 for Qwen2.5-7B block 20)."""
    x = 1.1 * mean_norm
    step = 10 ** math.floor(math.log10(x)) / 10
    return float(math.ceil(x / step) * step)


def text_marker_prompt(tok, av) -> tuple[list[int], int, int]:
    """The official release's marker rule: (prompt ids of the rendered chat turn, marker position,
    marker id), refusing a character that is not one token or a prompt where it is not found exactly
    once with the stated neighbours (tokenizer or template drift: the AV would read the character's
    own embedding instead of the activation)."""
    char = av.marker_text
    if av.user.count("{marker}") != 1:
        raise UserError(f"config key av.user must contain '{{marker}}' exactly once, got {av.user!r}")
    ids = tok.encode(char)
    want = av.marker
    if want != "auto" and (isinstance(want, int) or str(want).isdigit()) and ids != [int(want)]:
        raise UserError(f"config key av.marker_text={char!r} tokenises to {ids}, expected the single id [{int(want)}] "
                        f"(av.marker): wrong tokenizer or vocabulary changed")
    if len(ids) != 1:
        raise UserError(f"config key av.marker_text={char!r} tokenises to {len(ids)} ids {ids}, expected one")
    mid = ids[0]
    prompt = tok.encode_chat([{"role": "user", "content": av.user.replace("{marker}", char)}])
    where = [i for i, t in enumerate(prompt) if t == mid]
    nb = tuple(int(x) for x in (av.get("marker_neighbors") or ()))
    if nb:
        where = [i for i in where if 0 < i < len(prompt) - 1 and (prompt[i - 1], prompt[i + 1]) == nb]
    if len(where) != 1:
        got = [(prompt[i - 1] if i else None, prompt[i + 1] if i + 1 < len(prompt) else None)
               for i, t in enumerate(prompt) if t == mid]
        raise UserError(f"config key av.marker_text={char!r} (id {mid}): the AV prompt holds {len(where)} position(s) "
                        f"with neighbours {nb or 'any'}, expected exactly one (neighbours found: {got})")
    return prompt, where[0], mid


def build_spec(tok, mcfg: ModelConfig, av, mean_norm: float) -> AVSpec:
    """The AV prompt and injection settings from config section `av`."""
    if av.get("marker_text"):
        ids, pos, mid = text_marker_prompt(tok, av)
        ids_before, ids_after = ids[:pos], ids[pos + 1:] + tok.encode(av.answer_prefix)
    else:
        rendered = tok.render_chat([{"role": "user", "content": av.user.replace("{marker}", _PLACEHOLDER)}])
        if rendered.count(_PLACEHOLDER) != 1:
            raise UserError(f"config key av.user must contain '{{marker}}' exactly once, got {av.user!r}")
        before, after = rendered.split(_PLACEHOLDER)
        ids_before = tok.bos(tok.encode(before))
        ids_after = tok.encode(after + av.answer_prefix)
        mid = choose_marker(tok, ids_before + ids_after, av.marker)
    prompt = tuple(ids_before + [mid] + ids_after)
    if prompt.count(mid) != 1:
        raise UserError(f"marker token {mid} occurs {prompt.count(mid)} times in the AV prompt; choose another av.marker")
    closer = tuple(tok.encode(av.closer))
    if not closer:
        raise UserError("config key av.closer must be a non-empty closing tag")
    if av.inject not in ("replace", "add"):
        raise UserError(f"config key av.inject={av.inject!r}: expected 'replace' or 'add'")
    if av.inject == "add" and not 0 <= av.add_after < mcfg.n_layers:
        raise UserError(f"config key av.add_after={av.add_after} out of range [0, {mcfg.n_layers})")
    if len(prompt) + av.max_len > mcfg.max_seq_len:
        raise UserError(f"config key av.max_len={av.max_len}: prompt ({len(prompt)}) + cap exceeds the model's "
                        f"context ({mcfg.max_seq_len})")
    if av.max_len < len(closer) + 2:
        raise UserError(f"config key av.max_len={av.max_len} leaves no room for an explanation")
    norm = float(av.inject_norm) if av.inject_norm > 0 else auto_norm(mean_norm)
    return AVSpec(prompt=prompt, marker_pos=len(ids_before), marker_id=mid, closer=closer,
                  eos=tok.eos_ids[0], mode=av.inject, add_after=int(av.add_after), inject_norm=norm,
                  center=bool(av.center), max_len=int(av.max_len))


# ----------------------------------------------------------------------------- injection

def init_extra(d: int, use_proj: bool) -> dict:
    """Trainable AV parameters besides the model: the optional input projection [d, d] = I."""
    return {"proj": jnp.eye(d, dtype=jnp.float32)} if use_proj else {}


def override(spec: AVSpec, acts: jax.Array, extra: dict, mean: jax.Array | None) -> transformer.Override:
    """acts [b, d] raw -> the override that puts them at the marker. Float32 until the cast."""
    v = acts.astype(jnp.float32)
    if spec.center and mean is not None:
        v = v - mean
    if "proj" in extra:
        v = v @ extra["proj"]
    u = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    d = v.shape[-1]
    # replace: the vector itself at inject_norm; add: a unit direction * sqrt(d) (add_at rescales it
    # to the residual's norm).
    v = u * (spec.inject_norm if spec.mode == "replace" else d ** 0.5)
    b = v.shape[0]
    return transformer.Override(jnp.full((b, 1), spec.marker_pos, jnp.int32), v[:, None, :])


def add_after(spec: AVSpec) -> int | None:
    return spec.add_after if spec.mode == "add" else None


# ----------------------------------------------------------------------------- teacher forcing

def sft_row(tok, text: str, spec: AVSpec) -> list[int]:
    """One SFT target row: the text (whitespace collapsed) cut to the cap's room, the closer, EOS."""
    return tok.encode(" ".join(text.split()))[:spec.max_len - len(spec.closer) - 1] + list(spec.closer) + [spec.eos]


def sft_targets(tok, texts: Sequence[str], spec: AVSpec, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> target ids [b, W] (text cut to the cap's room, closer, EOS; right-padded) and mask
    [b, W]; W = width (at most max_len and at least every row: batches.text_widths) or max_len."""
    W = spec.max_len if width is None else int(width)
    ids = np.full((len(texts), W), tok.pad_id, np.int32)
    mask = np.zeros((len(texts), W), bool)
    for i, t in enumerate(texts):
        row = sft_row(tok, t, spec)
        if len(row) > W:
            raise ValueError(f"an SFT target of {len(row)} tokens is wider than its batch ({W})")
        ids[i, :len(row)] = row
        mask[i, :len(row)] = True
    return ids, mask


def teacher_logits(params, extra, cfg: ModelConfig, spec: AVSpec, acts: jax.Array, targets: jax.Array,
                   mean: jax.Array | None = None, remat: bool = False, group: int = 1,
                   share_prefix: bool = True) -> jax.Array:
    """Float32 logits [b, L, V] at each target position after the injected prompt (teacher forced).

    acts: [b, d]; targets: [b, L]. One forward over prompt + targets[:, :-1].
    group=G > 1: acts is [b / G, d], one per group of G consecutive target rows, and each injected
    prompt runs once for its group (`transformer.forward_grouped`; same values, fewer FLOPs).
    group=1 with share_prefix: the prompt's tokens before the marker are the same in every row and
    cannot see the injected vector (causal), so they run once for the whole batch and each row
    runs only from the marker on (same values; SmolLM2's chat template puts 27 of the prompt's 50
    tokens there: forward + backward 1.28x faster at the quick shapes, benchmarks/sft_speed.py).
    """
    b, L = targets.shape
    P = len(spec.prompt)
    P0 = spec.marker_pos                                         # tokens before the marker
    ov = override(spec, acts, extra, mean)
    if group == 1 and share_prefix and P0 > 0:
        prefix = jnp.asarray(spec.prompt[:P0], jnp.int32)[None]                    # [1, P0]
        rest = jnp.concatenate([jnp.broadcast_to(jnp.asarray(spec.prompt[P0:], jnp.int32), (b, P - P0)),
                                targets[:, :-1].astype(jnp.int32)], axis=1)       # [b, P - P0 + L - 1]
        ov_rest = transformer.Override(ov.positions - P0, ov.vectors)
        # output position j is the full sequence's P0 - 1 + j: logits from P - 1 predict targets[:, 0]
        return transformer.forward_grouped(params, prefix, jnp.ones(prefix.shape, bool), rest, cfg, group=b,
                                           override=ov_rest, override_in="completion", add_after=add_after(spec),
                                           remat=remat, logits_from=P - P0)        # [b, L, V]
    if group > 1:
        prompt = jnp.broadcast_to(jnp.asarray(spec.prompt, jnp.int32), (b // group, P))
        return transformer.forward_grouped(params, prompt, jnp.ones(prompt.shape, bool),
                                           targets[:, :-1].astype(jnp.int32), cfg, group=group, override=ov,
                                           add_after=add_after(spec), remat=remat)
    prompt = jnp.broadcast_to(jnp.asarray(spec.prompt, jnp.int32), (b, P))
    tokens = jnp.concatenate([prompt, targets[:, :-1].astype(jnp.int32)], axis=1)  # [b, P + L - 1]
    return transformer.forward(params, tokens, cfg, override=ov, add_after=add_after(spec), remat=remat,
                               logits_from=P - 1)["logits"]                        # [b, L, V]


def logprobs(params, extra, cfg: ModelConfig, spec: AVSpec, acts: jax.Array, targets: jax.Array,
             mean: jax.Array | None = None, temperature: float = 1.0, remat: bool = False,
             entropy: bool = False, group: int = 1, share_prefix: bool = True):
    """Per-token log-probs [b, L] of `targets` after the injected prompt (float32), and with
    entropy=True the per-token entropies; `teacher_logits` says how the prompt is run."""
    logits = teacher_logits(params, extra, cfg, spec, acts, targets, mean, remat, group, share_prefix)
    if temperature != 1.0:
        logits = logits / temperature
    lp = token_logprobs(logits, targets.astype(jnp.int32))
    if not entropy:
        return lp
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
    ent = -jnp.sum(probs * jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1), axis=-1)
    return lp, ent


# ----------------------------------------------------------------------------- the explanation in sampled text

def explanation_span(tokens: jax.Array, lengths: jax.Array, spec: AVSpec) -> tuple[jax.Array, jax.Array]:
    """Where the explanation ends in sampled tokens [b, N].

    Returns (expl_len [b]: tokens before the first closing tag, ok [b]: a closing tag was produced
    within the row's length and the explanation is not empty). Jit-friendly.
    """
    b, N = tokens.shape
    c = jnp.asarray(spec.closer, jnp.int32)
    m = len(spec.closer)
    pad = jnp.concatenate([tokens, jnp.full((b, m), -1, tokens.dtype)], axis=1)
    match = jnp.ones((b, N), bool)
    for j in range(m):
        match = match & (pad[:, j:j + N] == c[j])
    idx = jnp.arange(N)[None, :]
    match = match & (idx + m <= lengths[:, None])
    found = match.any(axis=1)
    first = jnp.where(found, jnp.argmax(match, axis=1), lengths)
    ok = found & (first > 0)
    return first.astype(jnp.int32), ok


def decode(tok, tokens: np.ndarray, expl_len: np.ndarray) -> list[str]:
    return [tok.decode(row[:n].tolist(), skip_special=True).strip() for row, n in zip(tokens, expl_len)]
