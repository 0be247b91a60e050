"""Claim accuracy: what an explanation says that can be checked against the context.

An fve number says how much of the activation the AR recovers from the text; it does not say
whether the text is *true*. These checks read an explanation against the row's own context:

  current token   does the explanation name the token at the position (the one the activation
                  sits on, which carries most of its signal)? `current_token_match` -> "exact",
                  "near" or None (rules in its docstring), read in the text before its stated
                  predictions (`names_current_token`);
  predictions     does it name what the target itself predicts next? `names_prediction`: the
                  target's top-1 next token among the explanation's stated predictions;
  preceding text  is the text it says comes right before the current token ("after «have the»", the
                  predict warm start's wording) what the context has there? `preceding_claim` ->
                  True / False / None (states none). A quoted span can be in the context and still
                  be false here: "after «the»" when "the" occurs earlier but not before this token;
  quoted spans    is every quoted span (measure.quoted_spans: "...", “...”, «...», `...`) in the
                  context window? `quote_claims` -> (spans, exact, near); the rest are absent
                  (invented). A near miss is a quote the model got almost right, which a plain
                  substring test would count as invented.
The stated predictions are the text after the first whole word "next" outside a quote
(measure.split_predictions): «to» in "Next: «to» 93%" names a token that is not in the context
yet, so it is neither a quote nor a claim about the current token; `names_prediction` reads it.

Everything is plain string work on decoded text, one row at a time, so evaluate can score the
real explanations and the shuffled control (explanations of other documents) with one function.
`row_contexts` + `check_row` + `summary` are that function for a set of rows: what evaluate, the
trainer's eval stage and benchmarks/claims_from_rows.py each report, from one place.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from nla_jax.nla import measure, selftext

_WORD = re.compile(r"\w+", re.UNICODE)


def _words(s: str) -> list[str]:
    """Case-folded runs of letters/digits/underscore: punctuation and spacing do not count."""
    return _WORD.findall(s.casefold())


def edit_distance(a, b, limit: int = 2) -> int:
    """Levenshtein distance between two sequences (strings or word lists), capped at `limit`
    (anything larger returns `limit`): the near-miss rules only ask whether it is <= 1."""
    if abs(len(a) - len(b)) >= limit:
        return limit
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        if min(cur) >= limit:
            return limit
        prev = cur
    return min(prev[-1], limit)


def current_token_match(explanation: str, token_text: str) -> str | None:
    """Whether the explanation names the current token: "exact", "near" or None.

    The token's text is stripped of surrounding whitespace (byte-level BPE tokens carry their
    leading space). A token with letters or digits:
      exact  its stripped text occurs in the explanation case-sensitively as a whole word
             (not preceded or followed by a letter, digit or underscore);
      near   otherwise, case-folded: one of the explanation's words equals it, starts with it
             (the token begins a longer word: "control" -> "controlled", at least 3 characters),
             or is one edit away from it (at least 4 characters: a typo or an inflection).
    A token without letters or digits (",", ".", "\\n") would be "named" by almost any text, so
    it counts only inside a quote: exact when a quoted span ends with it, never near.
    An empty token (whitespace only) is never named.
    """
    t = token_text.strip()
    if not t:
        return None
    if not any(ch.isalnum() for ch in t):
        return "exact" if any(s.endswith(t) for s in measure.quoted_spans(explanation)) else None
    if re.search(r"(?<!\w)" + re.escape(t) + r"(?!\w)", explanation):
        return "exact"
    tf = t.casefold()
    for w in _words(explanation):
        if w == tf or (len(tf) >= 3 and w.startswith(tf)) or (len(tf) >= 4 and edit_distance(w, tf) <= 1):
            return "near"
    return None


def names_current_token(explanation: str, token_text: str) -> str | None:
    """current_token_match on what the explanation says about the context (the text before its
    stated predictions): a prediction that happens to equal the current token does not name it."""
    return current_token_match(measure.split_predictions(explanation)[0], token_text)


def names_prediction(explanation: str, token_text: str) -> bool:
    """Whether the explanation states the target's top-1 next token as a prediction.

    The stated predictions are the text after the first whole word "next" outside a quoted span
    (any case: "Next: «to» 93%", "the next word is likely to"; measure.split_predictions); an
    explanation without it states none. The token counts as named there by
    `current_token_match`'s rules (exact or near; punctuation only at the end of a quoted span).
    """
    preds = measure.split_predictions(explanation)[1]
    return bool(preds) and current_token_match(preds, token_text) is not None


_AFTER = re.compile(r"(?<!\w)after\s*«([^»]*)»", re.IGNORECASE)
PRECEDING_MOST = 4      # preceding_texts: up to this many tokens before the current one


def preceding_texts(tok, tokens_row, position: int, most: int = PRECEDING_MOST) -> list[str]:
    """The k tokens before the position, decoded, for k = 1..most (fewer at a document's start),
    whitespace-collapsed as the warm start writes them."""
    return [" ".join(tok.decode([int(t) for t in tokens_row[position - k:position]]).split())
            for k in range(1, min(most, position) + 1)]


def preceding_claim(explanation: str, preceding: list[str]) -> bool | None:
    """Whether the explanation's "after «…»" (before its stated predictions) is the text right before
    the current token: True when the quoted text, case-folded with whitespace collapsed, equals the
    last k tokens' text for some k (preceding[k - 1], `preceding_texts`); False when it states one
    that is not; None when it states none (no such phrase). An empty quote is False."""
    m = _AFTER.search(measure.split_predictions(explanation)[0])
    if m is None:
        return None
    q = " ".join(m.group(1).casefold().split())
    return bool(q) and any(q == p.casefold() for p in preceding)


def _near_in_context(span_words: list[str], ctx_words: list[str]) -> bool:
    """A span is a near miss when some contiguous run of context words is one word-level edit
    (substitute, insert or delete one word) from it, or, for a one-word span of at least 4
    characters, one context word is one character edit from it."""
    n = len(span_words)
    if n == 0:
        return False
    if n == 1:
        w = span_words[0]
        return len(w) >= 4 and any(edit_distance(w, c) <= 1 for c in ctx_words)
    for L in (n - 1, n, n + 1):
        if L < 1:
            continue
        for i in range(0, max(len(ctx_words) - L + 1, 0)):
            if edit_distance(span_words, ctx_words[i:i + L]) <= 1:
                return True
    return False


def quote_claims(explanation: str, context: str) -> tuple[int, int, int]:
    """(spans, exact, near) for the explanation's quoted spans (before its stated predictions)
    against the context window.

    exact: the span, case-folded with whitespace collapsed, is a substring of the context
           normalised the same way (case and spacing differences do not count);
    near:  not exact, but its words (case-folded runs of letters/digits, punctuation dropped)
           are one word-level edit from a run of the context's words (one word substituted,
           added or missing), or a one-word span is one character edit from a context word;
    absent = spans - exact - near: quoted text the context does not contain (invented), including
    a span whose first words are there and the rest not, and one quoting the token after the
    position. Spans without letters or digits that are not exact count as absent. Spans among the
    stated predictions (measure.split_predictions) are not quotes: that token is not in the context yet.
    """
    spans = measure.quoted_spans(measure.split_predictions(explanation)[0])
    ctx = " ".join(context.casefold().split())
    ctx_words = _words(context)
    exact = near = 0
    for s in spans:
        if s in ctx:
            exact += 1
        elif _near_in_context(_words(s), ctx_words):
            near += 1
    return len(spans), exact, near


# -- a set of rows: the per-row checks and their intervals over documents -------------------------

@dataclasses.dataclass(frozen=True)
class RowContext:
    """What one row's explanation is checked against."""
    current: str                 # the current token's text
    preceding: list[str]         # the 1..PRECEDING_MOST tokens before it (`preceding_texts`)
    window: str                  # the context window quoted spans must come from
    top1: str | None = None      # the target's top-1 next token's text, where known


def row_contexts(tok, tokens, positions, quote_window: int, top1: Sequence[str] | None = None) -> list[RowContext]:
    """One RowContext per row from its token ids [n, T] and positions [n] (quote_window tokens of
    context up to and including the position; measure.context_text)."""
    return [RowContext(current=selftext.token_text(tok, tokens[i][positions[i]]),
                       preceding=preceding_texts(tok, tokens[i], int(positions[i])),
                       window=measure.context_text(tok, tokens[i], int(positions[i]), int(quote_window)),
                       top1=None if top1 is None else top1[i])
            for i in range(len(positions))]


def check_row(explanation: str, rc: RowContext) -> dict:
    """Every claim check of one explanation: current_token "exact" / "near" / None, preceding
    True / False / None, quote_spans, quotes_absent and quotes_near (span counts), first_prediction
    (its first stated prediction, normalised; None without one), predictions (how many it states)
    and repeats_prediction (whether one of them is stated twice: «your» 56%, «the» 16%, «your» 14%
    names two tokens, not three; the target's own top-k repeat a written form only where two token
    ids decode alike, " an" and "an") and, where the row knows the target's top-1, names_top1 and
    target_top1 (normalised the same way). The record rows.jsonl keeps per checkpoint."""
    spans, exact, near = quote_claims(explanation, rc.window)
    out = {"current_token": names_current_token(explanation, rc.current),
           "preceding": preceding_claim(explanation, rc.preceding),
           "quote_spans": spans, "quotes_absent": spans - exact - near, "quotes_near": near}
    preds = measure.quoted_spans(measure.split_predictions(explanation)[1])
    out["first_prediction"] = preds[0] if preds else None        # normalised as quoted spans are
    out["predictions"], out["repeats_prediction"] = len(preds), len(set(preds)) < len(preds)
    if rc.top1 is not None:
        out["names_top1"] = names_prediction(explanation, rc.top1)
        out["target_top1"] = " ".join(rc.top1.casefold().split())
    return out


def summary(checks: Sequence[dict], docs: np.ndarray, n_boot: int, seed: int, suffix: str = "") -> dict:
    """check_row records of a set of rows -> each claim's share with its 95% interval over documents:
    shares of rows (current token named exact / exact or near, preceding text stated, top-1 named)
    by measure.ci, and of rows quoting anything (with_quotes); ratios of totals (preceding right of
    stated, quoted spans absent / near of all spans: span-level, pooled over rows; explanations
    repeating a stated prediction of those stating two or more) by measure.ratio_ci's document
    bootstrap. `suffix` is appended to every key ("_shuffled"
    for the control's explanations)."""
    col = lambda f: np.array([f(c) for c in checks], np.float64)
    stated = col(lambda c: c["preceding"] is not None)
    spans = col(lambda c: c["quote_spans"])
    out = {"current_token_exact": measure.ci(col(lambda c: c["current_token"] == "exact"), docs),
           "current_token_named": measure.ci(col(lambda c: c["current_token"] is not None), docs),
           "states_preceding": measure.ci(stated, docs),
           "preceding_correct": measure.ratio_ci(col(lambda c: c["preceding"] is True), stated, docs, n_boot, seed),
           "quotes_absent": measure.ratio_ci(col(lambda c: c["quotes_absent"]), spans, docs, n_boot, seed),
           "quotes_near": measure.ratio_ci(col(lambda c: c["quotes_near"]), spans, docs, n_boot, seed),
           "with_quotes": measure.ci((spans > 0).astype(np.float64), docs),
           "quote_spans": int(spans.sum())}
    if checks and all("repeats_prediction" in c for c in checks):    # records written before it lack it
        several = col(lambda c: c["predictions"] >= 2)
        out["repeats_prediction"] = measure.ratio_ci(col(lambda c: c["repeats_prediction"]), several, docs, n_boot, seed)
    if checks and all("names_top1" in c for c in checks):
        out["names_top1_prediction"] = measure.ci(col(lambda c: c["names_top1"]), docs)
    return {k + suffix: v for k, v in out.items()}


def prediction_spread(checks: Sequence[dict], docs: np.ndarray) -> dict:
    """How varied the stated predictions are, beside the target's own: for the explanations' first
    stated predictions (rows stating one) and, where known, the target's top-1 tokens, the most
    common one, the share of rows it takes (95% interval over documents) and how many distinct
    ones there are. A verbalizer that says «has» for every context has collapsed onto a prior
    even when «has» is sometimes right; the target's own spread is what a faithful one matches."""
    docs = np.asarray(docs)

    def spread(values: list, where: np.ndarray) -> dict:
        if not len(values):
            return {"mode": None, "mode_share": measure.ci([], []), "distinct": 0, "rows": 0}
        texts, counts = np.unique(np.array(values, dtype=object).astype(str), return_counts=True)
        mode = str(texts[np.argmax(counts)])
        return {"mode": mode, "mode_share": measure.ci(np.array([v == mode for v in values], np.float64), docs[where]),
                "distinct": int(len(texts)), "rows": int(len(values))}

    stated = np.array([c["first_prediction"] is not None for c in checks], bool)
    out = {"explanations": spread([c["first_prediction"] for c in checks if c["first_prediction"] is not None], stated)}
    if checks and all("target_top1" in c for c in checks):
        out["target"] = spread([c["target_top1"] for c in checks], np.ones(len(checks), bool))
    return out
