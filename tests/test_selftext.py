"""The warm-start text from the target itself (nla_jax/nla/selftext.py): the template built from
known predictions, and the predictions equal to the full forward pass's softmax at the position
(tokens after it, padded, change nothing; several positions of one sequence in one pass)."""
import numpy as np

from nla_jax.nla import claims, selftext

TINY = "configs/tiny.py"


class _Tok:
    """Decodes ids through a fixed table (BPE pieces with their leading spaces)."""
    PIECES = {0: "We", 1: " have", 2: " the", 3: " ability", 4: " to", 5: " of", 6: "\n", 7: " ", 8: ","}

    def decode(self, ids):
        return "".join(self.PIECES[int(i)] for i in ids)


def test_text_from_known_predictions():
    ctx = np.array([0, 1, 2, 3, -1, -1])
    text = selftext.self_text(_Tok(), ctx, 3, np.array([4, 5, 6]), np.array([0.93, 0.031, 0.004]), before=2)
    assert text == "Token \u00abability\u00bb after \u00abhave the\u00bb. Next: \u00abto\u00bb 93%, " \
                   "\u00abof\u00bb 3%, \u00ab\\n\u00bb <1%."
    # the current token first; everything after "Next" is a prediction (what claims.names_prediction reads)
    assert text.index("ability") < text.index("have") < text.index("Next")
    assert claims.names_prediction(text, " to") and not claims.names_prediction(text, " the")
    # no tokens before: no "after"; a space token stays visible
    assert selftext.self_text(_Tok(), ctx, 0, np.array([7]), np.array([0.5]), before=3) == \
        "Token \u00abWe\u00bb. Next: \u00ab\u2423\u00bb 50%."
    assert selftext.self_text(_Tok(), ctx, 3, np.array([8]), np.array([1.0]), before=0) == \
        "Token \u00abability\u00bb. Next: \u00ab,\u00bb 100%."


def test_top_next_equals_the_forward_softmax():
    from nla_jax import configlib, weights
    from nla_jax.models import transformer as T
    cfg = configlib.get(TINY)
    mcfg, params, _ = weights.load_from_config(cfg.model)
    rng = np.random.default_rng(0)
    toks = rng.integers(3, mcfg.vocab_size, (3, 16)).astype(np.int32)
    pos = np.array([15, 4, 9], np.int32)
    padded = toks.copy()
    for j, p in enumerate(pos):
        padded[j, p + 1:] = mcfg.pad_id                  # what the store's -1 becomes
    top = selftext.top_next(params, mcfg, padded, pos[:, None], 4, None)
    ids, probs = np.asarray(top["ids"])[:, 0], np.asarray(top["probs"])[:, 0]      # [3, 4]
    for j, p in enumerate(pos):
        lg = np.asarray(T.forward(params, toks[j:j + 1, :p + 1], mcfg)["logits"][0, -1], np.float64)
        pr = np.exp(lg - lg.max())
        pr /= pr.sum()
        want = np.argsort(-pr)[:4]
        np.testing.assert_array_equal(ids[j], want)
        np.testing.assert_allclose(probs[j], pr[want], rtol=1e-4, atol=1e-6)
    # several positions of one sequence in one pass = one pass per position
    multi = selftext.top_next(params, mcfg, toks[:1], np.array([[4, 9, 15]], np.int32), 4, None)
    for j, p in enumerate([4, 9, 15]):
        row = toks[:1].copy()
        row[0, p + 1:] = mcfg.pad_id
        one = selftext.top_next(params, mcfg, row, np.array([[p]], np.int32), 4, None)
        np.testing.assert_array_equal(np.asarray(multi["ids"])[0, j], np.asarray(one["ids"])[0, 0])
        np.testing.assert_allclose(np.asarray(multi["probs"])[0, j], np.asarray(one["probs"])[0, 0], rtol=1e-5)


def test_quote_style_reads_in_order_and_ends_with_the_current_token():
    ctx = np.array([0, 1, 2, 3, -1, -1])
    text = selftext.self_text(_Tok(), ctx, 3, np.array([4, 5]), np.array([0.93, 0.031]), before=2, style="quote")
    assert text == "The text ends with: \u00abhave the ability\u00bb. Next: \u00abto\u00bb 93%, \u00abof\u00bb 3%."
    # the quote names the current token (its end) and is in the context; the predictions are not quotes
    assert claims.names_current_token(text, " ability") == "exact"
    assert claims.quote_claims(text, "We have the ability") == (1, 1, 0)
    assert claims.names_prediction(text, " to") and not claims.names_prediction(text, " ability")
    # next_first: the predictions, then the same quote, so the text ends with the current token
    nf = selftext.self_text(_Tok(), ctx, 3, np.array([4, 5]), np.array([0.93, 0.031]), before=2, style="next_first")
    assert nf == "Next: \u00abto\u00bb 93%, \u00abof\u00bb 3%. The text ends with: \u00abhave the ability\u00bb."
    assert claims.names_current_token(nf, " ability") == "exact"
    assert claims.quote_claims(nf, "We have the ability") == (1, 1, 0)
    assert claims.names_prediction(nf, " of") and not claims.names_prediction(nf, " ability")
    # at the document's start the quote holds what there is
    assert selftext.self_text(_Tok(), ctx, 0, np.array([4]), np.array([1.0]), before=7, style="quote") == \
        "The text ends with: \u00abWe\u00bb. Next: \u00abto\u00bb 100%."


def test_the_warm_start_states_the_preceding_text_correctly_by_construction():
    """claims.preceding_claim reads the template's "after «…»" against the context: the warm start
    itself is right at every position and any number of tokens before; an "after" that names text
    from elsewhere in the context (a quote that is present, but not here) is wrong; no "after" is
    no claim."""
    ctx = np.array([0, 1, 2, 3, 1, 2, 3])          # We have the ability have the ability
    for pos in range(1, 7):
        pre = claims.preceding_texts(_Tok(), ctx, pos)
        assert len(pre) == min(pos, claims.PRECEDING_MOST)
        for before in (1, 2, 3):
            text = selftext.self_text(_Tok(), ctx, pos, np.array([4]), np.array([0.9]), before=before)
            assert claims.preceding_claim(text, pre) is True, (pos, before, text)
    pre = claims.preceding_texts(_Tok(), ctx, 3)      # before " ability": "the", "have the", "We have the"
    assert pre == ["the", "have the", "We have the"]
    assert claims.preceding_claim("Token «ability» after «ability». Next: «to» 90%.", pre) is False   # in context, not here
    assert claims.preceding_claim("Token «ability» after «HAVE  the». Next: «to».", pre) is True      # case, spacing
    assert claims.preceding_claim("Token «ability» after «». Next: «to».", pre) is False
    assert claims.preceding_claim("Token «ability». Next: «to» 90%.", pre) is None
    # an "after «…»" among the stated predictions is not a claim about the context
    assert claims.preceding_claim("Token «ability». Next: «to» after «the».", pre) is None


class _SpecialTok(_Tok):
    """_Tok plus two special tokens that decode to nothing unless asked (as the real tokenizer does)."""
    SPECIAL = {20: "<|im_end|>", 21: "<end_of_turn>"}
    special_ids = frozenset(SPECIAL)

    def decode(self, ids, skip_special=True):
        return "".join(("" if skip_special else self.SPECIAL[int(i)]) if int(i) in self.SPECIAL
                       else self.PIECES[int(i)] for i in ids)


def test_special_predictions_are_named_and_whitespace_runs_are_cut():
    """A predicted special token is written by its name in brackets («[im_end]»: the turn ends here),
    never as «» (says nothing) nor as the token itself (it would read back as EOS inside the text);
    the claim checks name it the same way. A long whitespace token is written out up to
    SHOWN_WHITESPACE characters of whole escapes, then «…»."""
    tok = _SpecialTok()
    assert selftext.token_text(tok, 20) == "[im_end]" and selftext.token_text(tok, 21) == "[end_of_turn]"
    assert selftext.token_text(tok, 3) == " ability"                      # ordinary tokens: their text
    ctx = np.array([0, 1, 2, 3])
    text = selftext.self_text(tok, ctx, 3, np.array([20, 4]), np.array([0.68, 0.3]), before=0)
    assert text == "Token \u00abability\u00bb. Next: \u00ab[im_end]\u00bb 68%, \u00abto\u00bb 30%."
    assert claims.names_prediction(text, selftext.token_text(tok, 20))
    run = "\r\r\n" + " " * 8 + "\r\r\n" + " " * 11
    shown = selftext.show(run)
    assert shown == "\\r\\r\\n\u2423\u2423\u2423\u2423\u2423\u2423\u2026" and len(shown) <= selftext.SHOWN_WHITESPACE + 1
    assert selftext.show("\n\n") == "\\n\\n" and selftext.show(" \r") == "\u2423\\r"   # short ones whole
    assert not selftext.show("\n" * 7).endswith("\\\u2026")                # never a lone backslash
