"""A warm-start text written from the target itself (`summarize.teacher="predict"`).

The quote warm start ends with the current token after seven weaker ones, and a teacher's prose
may invent things the activation never held. This text says only what the target computed at
the row: the current token first (what the activation encodes best) with the few tokens before
it, then the target's own top next-token predictions with their probabilities (what the model
is about to do: the NLA's purpose), last so that everything after "Next" is a prediction
(claims.names_prediction reads it so). Every claim in it is checkable against the context and
the target's logits, so it cannot hallucinate by construction:

    Token «ability» after «have the». Next: «to» 93%, «of» 3%, «,» 1%.                 (style "token")
    The text ends with: «We have the ability». Next: «to» 93%, «of» 3%, «,» 1%.        (style "quote")
    Next: «to» 93%, «of» 3%, «,» 1%. The text ends with: «We have the ability».        (style "next_first")

"next_first" ends the text with the current token because the reconstructor reads the explanation
at its last token: with the predictions last it recovers much less of the vector (WORKSPACE.md,
"Warm starts compared").

The probabilities come from the frozen target's forward pass over the row's context: extraction's
own pass when the store holds them (data.top_k >= summarize.predict_k: the blocks after K run in
the same pass that captures block K, `top_at`), else a separate pass over the stored tokens (the
same model and tokens; the pass is causal, so the tokens the store holds up to the position are
all it reads).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nla_jax.models import transformer
from nla_jax.nla import steps


STYLES = ("token", "quote", "next_first")   # summarize.predict_style: the text forms self_text writes


def top_at(params, cfg, x: jax.Array, pos: jax.Array, k: int) -> dict:
    """x [b, s, d] the residual stream after the last block, pos [b, P] -> the k most likely next
    tokens {"ids": [b, P, k] int32, "probs": [b, P, k] float32} at each of the P positions. Only
    the P positions are unembedded (a [b, s, V] logits tensor would dwarf the pass)."""
    at = jnp.take_along_axis(x, pos[:, :, None], axis=1)                                   # [b, P, d]
    lp = jax.nn.log_softmax(transformer.unembed(cfg, params, at).astype(jnp.float32), -1)   # [b, P, V]
    top_lp, top_ids = jax.lax.top_k(lp, k)                                                 # [b, P, k]
    return {"ids": top_ids.astype(jnp.int32), "probs": jnp.exp(top_lp)}


@functools.lru_cache(maxsize=8)
def _top_fn(cfg, k: int, compute_dtype):
    def f(params, tokens, pos):
        """tokens [b, s] (pad after the last position read), pos [b, P] -> top_at's ids and probs."""
        params = steps.cast_floating(params, compute_dtype)
        valid = jnp.ones(tokens.shape, bool)
        x = transformer.embed(params, tokens, cfg=cfg)
        x = transformer.run_blocks(cfg, params["layers"], x, transformer.positions_from_mask(valid),
                                   transformer.causal_mask(valid), 0, cfg.n_layers)         # [b, s, d]
        return top_at(params, cfg, x, pos, k)
    return jax.jit(f)


def top_next(params, cfg, tokens: jax.Array, positions: jax.Array, k: int, compute_dtype) -> dict:
    """{"ids": [b, P, k], "probs": [b, P, k]}: the target's k most likely next tokens at each of the
    positions [b, P] of each sequence (one pass per document serves all its rows). For a store
    extracted without predictions (data.top_k = 0 or < summarize.predict_k); extraction with
    data.top_k > 0 stores the same numbers from its own forward pass."""
    return _top_fn(cfg, int(k), compute_dtype)(params, tokens, positions)


SHOWN_WHITESPACE = 12    # a whitespace token is written out up to this many characters, then "…"


def show(piece: str) -> str:
    """A token's text as the template writes it: stripped of surrounding whitespace; a token that
    is only whitespace is written escaped ("\\n") or as ␣ for spaces, so it stays visible, and cut
    after SHOWN_WHITESPACE characters (SmolLM2 has single tokens of ~20 mixed newlines and spaces,
    which written out took 60 tokens of a 64-token cap)."""
    s = piece.strip()
    if s:
        return s
    out = ""
    for ch in piece:                      # whole escapes only: "\\r", never a lone backslash
        esc = "\u2423" if ch == " " else ch.encode("unicode_escape").decode("ascii")
        if len(out) + len(esc) > SHOWN_WHITESPACE:
            return out + "\u2026"
        out += esc
    return out


def token_text(tok, token_id: int) -> str:
    """One token's text; a special token (which decodes to nothing) by its name in brackets,
    «[im_end]». The target predicting the end of its turn is a prediction worth stating (2% of the
    default store's rows); written as «» it said nothing, and written as the special token itself
    it would put an end of turn inside the explanation (the tokenizer reads it back as EOS)."""
    i = int(token_id)
    text = tok.decode([i])
    if text or i not in getattr(tok, "special_ids", ()):
        return text
    raw = tok.decode([i], skip_special=False).strip()
    name = raw.removeprefix("<").removeprefix("|").removesuffix(">").removesuffix("|")
    return f"[{name or i}]"


def percent(p: float) -> str:
    return "<1%" if p < 0.005 else f"{round(100 * p)}%"


def self_text(tok, context: np.ndarray, position: int, ids: np.ndarray, probs: np.ndarray, before: int,
              style: str = "token") -> str:
    """The warm-start text of one row, then the target's predictions (ids [k] with probs [k], most
    likely first). style="token": the current token, then the `before` tokens preceding it;
    style="quote": the last `before` + 1 tokens in reading order, ending with the current token
    (the reconstructor reads context the way the target did: on the quick corpus the AR recovers
    far more from an in-order quote than from the token-first form); style="next_first": the
    predictions, then that quote (the text ends with the current token, where the AR reads)."""
    preds = ", ".join(f"\u00ab{show(token_text(tok, i))}\u00bb {percent(float(p))}" for i, p in zip(ids, probs))
    if style in ("quote", "next_first"):
        last = tok.decode(np.asarray(context[max(0, position - before):position + 1]).tolist())
        quote = f"The text ends with: \u00ab{' '.join(last.split()) or show(last)}\u00bb."
        return f"{quote} Next: {preds}." if style == "quote" else f"Next: {preds}. {quote}"
    text = f"Token \u00ab{show(token_text(tok, context[position]))}\u00bb"
    if before > 0 and position > 0:
        prev = tok.decode(np.asarray(context[max(0, position - before):position]).tolist()).strip()
        if prev:
            text += f" after \u00ab{' '.join(prev.split())}\u00bb"
    return f"{text}. Next: {preds}."
