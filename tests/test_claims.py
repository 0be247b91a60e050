"""Claim accuracy on constructed explanations (nla_jax/nla/claims.py): the current token named
exactly / nearly / not at all, and quoted spans exact / near misses / invented, each rule of the
docstrings with a case on either side of its boundary."""
import pytest

from nla_jax.nla import claims, measure

CONTEXT = "Octopuses are clever animals. They have the ability to control their  Colour quickly"


@pytest.mark.parametrize("expl,token,want", [
    ("The text ends with «control their».", " their", "exact"),          # leading space of the BPE token
    ("It is about THEIR skin.", " their", "near"),                        # case differs
    ("Words like theirs appear.", " their", "near"),                      # token begins a longer word
    ("The next word is colour.", "Colour", "near"),
    ("An octopus changes colour.", " their", None),
    ("The word 'the' is common.", " th", None),                           # 2 chars: no prefix rule
    ("theirselves", " their", "near"),
    ("Mentions their.", " their", "exact"),                               # punctuation bounds a word
    ("Mentions xtheir.", " their", "near"),                               # one edit (an added letter)
    ("Mentions xytheir.", " their", None),                                # inside another word, two edits
    ("Ends with «clever animals,»", ",", "exact"),                        # punctuation: only at a quote's end
    ("Lists a, b, and c", ",", None),                                     # punctuation outside quotes
    ("anything", "  ", None),                                             # whitespace token: never named
    ("The year 1984 appears", "198", "near"),                             # digits: prefix of a longer number
])
def test_current_token(expl, token, want):
    assert claims.current_token_match(expl, token) == want


def test_edit_distance_rules():
    assert claims.edit_distance("colour", "color") == 1
    assert claims.edit_distance("control", "contorl") == 2            # a transposition is two edits
    assert claims.edit_distance("cat", "dog", limit=2) == 2            # capped
    assert claims.edit_distance(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert claims.edit_distance("", "ab") == 2
    assert claims.current_token_match("The animal can contorl things.", " control") is None
    assert claims.current_token_match("The animal can controll things.", " control") == "near"


@pytest.mark.parametrize("expl,want", [
    ('It says "control their colour".', (1, 1, 0)),                      # exact (spacing and case differ)
    ('It says "control her colour".', (1, 0, 1)),                         # one word substituted
    ('It says "the ability to control their".', (1, 1, 0)),
    ('It says "ability control their".', (1, 0, 1)),                      # one word missing
    ('It says "have the great ability".', (1, 0, 1)),                     # one word added
    ('It says "the process of creating a new instance".', (1, 0, 0)),     # invented
    ('It says "control his own colour".', (1, 0, 0)),                     # two edits: absent
    ('Ends with «Octopusses».', (1, 0, 1)),                               # one-word span, one character off
    ('Ends with «clevr».', (1, 0, 1)),
    ('Ends with «dog».', (1, 0, 0)),
    ('Ends with «cat».', (1, 0, 0)),                                     # short one-word span: no near rule
    ('No quotes here.', (0, 0, 0)),
    ('«animals. They» and «quickly» and «slowly»', (3, 2, 0)),
])
def test_quote_claims(expl, want):
    assert claims.quote_claims(expl, CONTEXT) == want


# how spans are found (measure.quoted_spans): each quote style, whitespace and case, what is no span
QUOTE_CONTEXT = "The old  Lighthouse keeper said:\n\"Bring the lamp\" before the storm reached the bay"


@pytest.mark.parametrize("expl,want", [
    ('It quotes "OLD lighthouse keeper".', (1, 1, 0)),                  # present (case differs)
    ("Ends with \u00abreached   the\nbay\u00bb.", (1, 1, 0)),             # guillemets, whitespace differs
    ("Mentions `lamp` and \u201cstorm reached\u201d.", (2, 2, 0)),       # backticks, curly quotes
    ('Says "the red car".', (1, 0, 0)),                                 # absent
    ('Ends with "reached the bay tonight".', (1, 0, 1)),                # partly present: a near miss, not exact
    ('"bring the lamp" and "a green door" and "bay"', (3, 2, 0)),       # mixed
    ("No quotes at all, it's a story about a keeper's lamp.", (0, 0, 0)),  # apostrophes are not quotes
    ('An unclosed "quote cut by the cap', (0, 0, 0)),                    # no closing mark: no span
    ('Empty "" and blank "   " spans are ignored', (0, 0, 0)),
])
def test_quote_styles(expl, want):
    assert claims.quote_claims(expl, QUOTE_CONTEXT) == want


@pytest.mark.parametrize("expl,token,want", [
    ("Token \u00abability\u00bb. Next: \u00abto\u00bb 93%, \u00abof\u00bb 3%.", " to", True),
    ("Token \u00abability\u00bb. Next: \u00abto\u00bb 93%, \u00abof\u00bb 3%.", " of", True),       # among them
    ("Token \u00abability\u00bb. Next: \u00abto\u00bb 93%.", " ability", False),   # named, but not as a prediction
    ("The next word is probably TO.", " to", True),                                # near (case)
    ("It talks about going to school.", " to", False),                              # no stated prediction
    ("NEXT: \u00abhello,\u00bb", ",", True),                                        # punctuation ends a quote
    ("Next: a comma, or a period", ",", False),
    ("The nextword is to", " to", False),                                          # "next" must be a word
])
def test_names_prediction(expl, token, want):
    assert claims.names_prediction(expl, token) is want


@pytest.mark.parametrize("expl,want", [
    ("Token \u00abability\u00bb. Next: \u00abto\u00bb 93%.", ("Token \u00abability\u00bb. ", ": \u00abto\u00bb 93%.")),
    ("The text ends with: \u00abthe next\u00bb", ("The text ends with: \u00abthe next\u00bb", "")),  # "next" quoted
    ("Ends \u00abthe next\u00bb. NEXT: \u00abday\u00bb", ("Ends \u00abthe next\u00bb. ", ": \u00abday\u00bb")),
    ("nothing predicted", ("nothing predicted", "")),
    # the predictions are the sentence "next" starts; what follows it is about the context again
    ("Next: \u00abto\u00bb 93%, \u00ab.\u00bb 2%. The text ends with: \u00abthe ability\u00bb.",
     ("The text ends with: \u00abthe ability\u00bb.", ": \u00abto\u00bb 93%, \u00ab.\u00bb 2%.")),
    ("The next word is \u00abto\u00bb! It follows \u00abability\u00bb", ("The It follows \u00abability\u00bb",
                                                                        " word is \u00abto\u00bb!")),
])
def test_split_predictions(expl, want):
    assert measure.split_predictions(expl) == want


def test_predictions_are_not_quotes_nor_the_current_token():
    # «to» and «of» are predictions (not in the context yet): not counted as quotes, so not as invented
    expl = "Token \u00abability\u00bb after \u00abhave the\u00bb. Next: \u00abto\u00bb 93%, \u00abswim\u00bb 3%."
    assert claims.quote_claims(expl, CONTEXT) == (2, 2, 0)
    # a prediction equal to the current token does not name it; the same word before "Next" does
    assert claims.names_current_token("Token \u00abthe\u00bb. Next: \u00abcolour\u00bb 40%.", " colour") is None
    assert claims.names_current_token("Token \u00abcolour\u00bb. Next: \u00abthe\u00bb 40%.", " colour") == "exact"
    assert claims.current_token_match("Token \u00abthe\u00bb. Next: \u00abcolour\u00bb 40%.", " colour") == "exact"


def test_target_top1_from_the_store_else_from_the_warm_start_records(tmp_path):
    """The eval stage's top-1 claim: predictions stored by extraction win; a store without them
    (data.top_k=0, older stores) falls back to the "predict" warm start's records, and any row
    without either makes no claim at all (None), never a partial one."""
    import json
    import types

    import numpy as np

    from nla_jax.nla import evaluation
    tok = types.SimpleNamespace(decode=lambda ids: "".join(f"<{i}>" for i in ids))
    rows = np.array([3, 8, 11])
    store = lambda top_k: types.SimpleNamespace(top_k=top_k, root=str(tmp_path))
    stored = {"top_ids": np.array([[5, 1], [6, 2], [7, 3]])}
    assert evaluation.target_top1(store(2), tok, rows, stored) == ["<5>", "<6>", "<7>"]
    with open(tmp_path / "summaries.jsonl", "w") as f:
        for r, ids in ((3, [40, 1]), (8, [41]), (11, [42, 9]), (12, [99])):
            f.write(json.dumps({"row": r, "text": "t", "top_ids": ids}) + "\n")
    assert evaluation.target_top1(store(0), tok, rows, {}) == ["<40>", "<41>", "<42>"]
    assert evaluation.target_top1(store(0), tok, np.array([3, 5]), {}) is None      # row 5 has no record
    assert evaluation.target_top1(store(2), tok, rows, stored) == ["<5>", "<6>", "<7>"]   # the store wins over records


def test_rows_checked_and_summarised_as_every_reader_reports_them():
    """row_contexts + check_row + summary (what evaluate, the eval stage and claims_from_rows share)
    on constructed rows: each per-row field is the single-claim function's answer, and each share is
    the rows' mean (shares of rows) or the ratio of totals (preceding right of stated, spans absent)."""
    import types

    import numpy as np

    words = ["Octopuses", " have", " the", " ability", " to", " control", " their", " colour"]
    tok = types.SimpleNamespace(decode=lambda ids: "".join(words[i] for i in ids))
    tokens = np.array([list(range(8))] * 3)
    pos = np.array([6, 5, 7])                                # current: " their", " control", " colour"
    ctxs = claims.row_contexts(tok, tokens, pos, quote_window=4, top1=[" colour", " the", " quickly"])
    assert [c.current for c in ctxs] == [" their", " control", " colour"]
    assert ctxs[0].preceding == ["control", "to control", "ability to control", "the ability to control"]
    assert ctxs[0].window == " ability to control their"
    texts = ["Token «their», after «to control». It quotes «control their» and «octopus arms». Next: «colour» 40%",
             "Token «control», after «the». Next: «yes» 10%, «The» 5%, «yes» 2%.",
             "Nothing checkable here."]
    checks = [claims.check_row(t, c) for t, c in zip(texts, ctxs)]
    assert checks[0] == {"current_token": "exact", "preceding": True, "quote_spans": 4, "quotes_absent": 1,
                         "quotes_near": 0, "first_prediction": "colour", "predictions": 1,
                         "repeats_prediction": False, "names_top1": True, "target_top1": "colour"}
    # «their», «to control», «control their» are in the window; «octopus arms» is not (nor one edit away);
    # «colour» is a stated prediction, not a quote. Row 1 states «yes» twice (and «The» is the target's
    # «the», named: stated predictions are case-folded)
    assert checks[1] == {"current_token": "exact", "preceding": False, "quote_spans": 2, "quotes_absent": 0,
                         "quotes_near": 0, "first_prediction": "yes", "predictions": 3,
                         "repeats_prediction": True, "names_top1": True, "target_top1": "the"}
    assert checks[2] == {"current_token": None, "preceding": None, "quote_spans": 0, "quotes_absent": 0,
                         "quotes_near": 0, "first_prediction": None, "predictions": 0,
                         "repeats_prediction": False, "names_top1": False, "target_top1": "quickly"}
    docs = np.array(["a", "b", "c"])
    s = claims.summary(checks, docs, n_boot=200, seed=0, suffix="_x")
    assert s["current_token_named_x"]["mean"] == pytest.approx(2 / 3)
    assert s["states_preceding_x"]["mean"] == pytest.approx(2 / 3)
    assert s["preceding_correct_x"]["mean"] == pytest.approx(1 / 2)          # right / stated
    assert s["quotes_absent_x"]["mean"] == pytest.approx(1 / 6)              # absent spans / all spans
    assert s["quote_spans_x"] == 6 and s["names_top1_prediction_x"]["mean"] == pytest.approx(2 / 3)
    # repeats: of the explanations stating two or more predictions (only row 1), the share repeating one
    assert s["repeats_prediction_x"]["mean"] == 1.0 and s["repeats_prediction_x"]["n"] == 3
    one_each = [dict(c, repeats_prediction=False) for c in checks]
    assert claims.summary(one_each, docs, 200, 0)["repeats_prediction"]["mean"] == 0.0
    assert claims.summary(checks[::2], docs[::2], 200, 0)["repeats_prediction"]["mean"] is None   # none states 2
    # rows without the target's top-1 make no prediction claim
    without = [{k: v for k, v in c.items() if k != "names_top1"} for c in checks]
    assert "names_top1_prediction" not in claims.summary(without, docs, 200, 0)


def test_prediction_spread_finds_a_collapsed_verbalizer():
    """prediction_spread: the most common first stated prediction, its share among rows stating one
    (interval over documents), the distinct count, and the same of the target's own top-1."""
    import numpy as np

    rows = [{"first_prediction": p, "target_top1": t} for p, t in
            [("has", "the"), ("has", "a"), ("has", "to"), ("is", "the"), (None, "of"), ("has", "and")]]
    docs = np.array(["a", "a", "b", "b", "c", "c"])
    sp = claims.prediction_spread(rows, docs)
    e, t = sp["explanations"], sp["target"]
    assert (e["mode"], e["distinct"], e["rows"]) == ("has", 2, 5)
    assert e["mode_share"]["mean"] == pytest.approx(4 / 5) and e["mode_share"]["n"] == 5
    assert (t["mode"], t["distinct"], t["rows"]) == ("the", 5, 6)
    assert t["mode_share"]["mean"] == pytest.approx(2 / 6)
    none = claims.prediction_spread([{"first_prediction": None}], np.array(["a"]))
    assert none["explanations"]["mode"] is None and "target" not in none
