"""python -m nla_jax.explain on a tiny trained pair, and its HTML viewer in headless Chromium.

Covers: the table, JSON and viewer for chosen positions of a text full of characters HTML must
escape (<, &, quotes, a newline, "</script>", multi-byte UTF-8); the viewer is self-contained and
its token strip reproduces the text; tokens and activations are exactly what extraction stores for
the same document; greedy explanations do not depend on how rows are batched; default positions
(every token but position 0 and specials) with --text-file on the SFT pair; bad input is one
`error:` line naming the value; and in Chromium (Playwright driving the system's chromium) a click
on a token shows that token's explanations as the JSON has them, with no request leaving the file.
"""
from __future__ import annotations

import html.parser
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import _browser
from _tiny_run import NLA_FLAGS, NLA_STAGES, tiny_store, trained_workdir
from test_train import _env, _one_error_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRICKY = 'Tom & "Jerry" <b>bold</b>\n</script><!-- caf\u00e9 \'8\' -->'


def _cli(*args, timeout=300, stdin=None):
    return subprocess.run([sys.executable, "-m", "nla_jax.explain", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout, input=stdin)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory, *NLA_FLAGS, stages=NLA_STAGES)


@pytest.fixture(scope="module")
def pair(workdir):
    from nla_jax.nla import workdir as workdir_lib
    return workdir_lib.load_pair(workdir)


@pytest.fixture(scope="module")
def cli_run(workdir, tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    out_html, out_json = str(d / "viewer.html"), str(d / "result.json")
    r = _cli("--checkpoint", workdir, "--text", TRICKY, "--positions", "3,5,-1", "--samples", "2",
             "--temperature", "1.0", "--html", out_html, "--json", out_json)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out_json) as f:
        result = json.load(f)
    return dict(r=r, html=out_html, result=result, page=open(out_html, encoding="utf-8").read())


# ----------------------------------------------------------------------------- CLI outputs

def test_table_and_json(cli_run):
    res, out = cli_run["result"], cli_run["r"].stdout
    toks = res["tokens"]
    n = len(toks)
    assert toks[0]["id"] == 1 and toks[0]["pos"] == 0                 # the tiny tokenizer's BOS, as extraction adds it
    assert "".join(t["text"] for t in toks[1:]) == TRICKY               # display texts rebuild the text exactly
    assert set(res["explained"]) == {"3", "5", str(n - 1)}
    assert res["kind"] == "rl" and res["samples"] == 2 and res["temperature"] == 1.0 and res["center"] is True
    for p, e in res["explained"].items():
        assert f"[{p}] " in out
        assert len(e["samples"]) == 2 and -1 <= e["floor_cos"] <= 1
        for s in e["samples"]:
            assert -1 - 1e-6 <= s["cos"] <= 1 + 1e-6
            assert s["cos"] == pytest.approx(1 - s["mse_nrm"] / 2) and s["fve"] == pytest.approx(1 - s["mse_nrm"] / res["var_nrm"])
            assert f"cos {s['cos']:+.3f}  fve {s['fve']:+.3f}  {s['text']}" in out


class _Spans(html.parser.HTMLParser):
    """Text of every <span class="tok ..."> in document order (HTML entities decoded)."""

    def __init__(self):
        super().__init__()
        self.spans, self._in, self.scripts = [], None, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self._in = [int(a["data-pos"]), ""]
        if tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        if self._in is not None:
            self._in[1] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._in is not None:
            self.spans.append(tuple(self._in))
            self._in = None


def test_viewer_is_self_contained_and_escaped(cli_run):
    page, res = cli_run["page"], cli_run["result"]
    for bad in ("http://", "https://", " src=", "<link", "@import", "url("):
        assert bad not in page, bad
    assert page.count("</script>") == 2 and page.count("<script") == 2  # the text's "</script>" is escaped
    p = _Spans()
    p.feed(page)
    assert p.spans == [(t["pos"], t["text"]) for t in res["tokens"]]
    assert p.scripts == 2
    start = page.index('<script type="application/json" id="nla-data">') + len('<script type="application/json" id="nla-data">')
    embedded = json.loads(page[start:page.index("</script>", start)])
    assert embedded == res


# ----------------------------------------------------------------------------- against extraction

def test_tokens_and_activations_are_the_stores(pair, tmp_path_factory):
    """For stored rows: explain's tokenisation of the document's text is the stored token prefix and
    its block-K activation at that position is the stored activation."""
    from nla_jax import explain
    from nla_jax.data import positions as positions_lib
    from nla_jax.data import store as store_lib
    root = tiny_store(tmp_path_factory)
    texts = {}
    with open(os.path.join(os.path.dirname(root), "c.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            texts[positions_lib.doc_key(0, f"t/{rec['id']}", "doc_id") >> 1] = rec["text"]  # source name "t"
    st = store_lib.open_store(root)
    rows = np.arange(0, st.num_rows, max(1, st.num_rows // 6))[:6]
    got = st.read(None, rows, fields=("acts", "doc_id", "position", "tokens"))
    for act, doc, p, stored in zip(got["acts"], got["doc_id"], got["position"], got["tokens"]):
        ids, shown = explain.tokenize(pair.run.tokenizer, texts[int(doc)])
        assert ids[:p + 1] == stored[:p + 1].tolist()
        mine = explain.activations(pair.run, ids[:max(p + 1, 96)], [int(p)])[0]
        np.testing.assert_allclose(mine, act, rtol=1e-5, atol=1e-5 * np.abs(act).max())


def test_greedy_does_not_depend_on_batching(pair):
    from nla_jax import explain
    text = "the old city under the bright river"
    a = explain.explain_text(pair, text, positions="2,4,-1", samples=1, temperature=0.0, batch=1, progress=False)
    b = explain.explain_text(pair, text, positions="2,4,-1", samples=1, temperature=0.0, batch=16, progress=False)
    assert a["temperature"] == 0
    for p in a["explained"]:
        sa, sb = a["explained"][p]["samples"][0], b["explained"][p]["samples"][0]
        assert sa["text"] == sb["text"] and sa["closed"] == sb["closed"]
        assert sa["cos"] == pytest.approx(sb["cos"], abs=1e-5)


def test_parse_positions():
    from nla_jax.errors import UserError
    from nla_jax.explain import parse_positions
    assert parse_positions("5,7,-1", 10, []) == [5, 7, 9]
    assert parse_positions("2:4, -3:", 10, []) == [2, 3, 7, 8, 9]
    assert parse_positions("1,1,-9", 10, []) == [1]
    assert parse_positions(None, 10, [3, 1]) == [1, 3]
    for bad, word in (("10", "10"), ("-11", "-11"), ("a", "'a'"), ("5:2", "'5:2'"), ("0:99", "'0:99'"), (",", "names no")):
        with pytest.raises(UserError, match=word):
            parse_positions(bad, 10, [])


def test_saved_mesh_fits_or_falls_back():
    from nla_jax.nla.workdir import mesh_fits
    assert mesh_fits((-1, 1, 1), 1) and mesh_fits((-1, 2, 1), 8) and mesh_fits((2, 2, 2), 8)
    assert not mesh_fits((2, 2, 2), 1) and not mesh_fits((-1, 8, 8), 16) and not mesh_fits((1, 8, 1), 4)


def test_default_positions_text_file_and_sft_pair(workdir, tmp_path):
    text = "a cat said\nunder the window"
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    out = tmp_path / "r.json"
    r = _cli("--checkpoint", os.path.join(workdir, "sft_av"), "--text-file", str(f), "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == ""
    res = json.loads(out.read_text())
    assert res["kind"] == "sft" and res["samples"] == 1 and res["temperature"] == 0
    assert [int(p) for p in res["explained"]] == list(range(1, len(res["tokens"])))  # all but the BOS at 0


@pytest.mark.parametrize("case", ["no_checkpoint", "empty_text", "position_out_of_range", "bad_position",
                                  "missing_text_file", "greedy_samples", "html_dir"])
def test_bad_input_is_one_line(case, workdir, tmp_path):
    args = {
        "no_checkpoint": (["--checkpoint", str(tmp_path / "nowhere"), "--text", "hi there"], "nowhere"),
        "empty_text": (["--checkpoint", workdir, "--text", "  \n"], "empty"),
        "position_out_of_range": (["--checkpoint", workdir, "--text", "hi there", "--positions", "2,999"], "999"),
        "bad_position": (["--checkpoint", workdir, "--text", "hi there", "--positions", "2,x"], "'x'"),
        "missing_text_file": (["--checkpoint", workdir, "--text-file", str(tmp_path / "gone.txt")], "gone.txt"),
        "greedy_samples": (["--checkpoint", workdir, "--text", "hi", "--samples", "3", "--temperature", "0"],
                           "--samples 3"),
        "html_dir": (["--checkpoint", workdir, "--text", "hi", "--html", str(tmp_path / "no" / "v.html")],
                     str(tmp_path / "no")),
    }[case]
    line = _one_error_line(_cli(*args[0]))
    assert args[1] in line, line


# ----------------------------------------------------------------------------- in a browser

@pytest.mark.timeout(300)
def test_viewer_click_in_chromium(cli_run, tmp_path):
    res = cli_run["result"]
    url = "file://" + cli_run["html"]
    shot = tmp_path / "viewer.png"
    with _browser.page() as (pg, requests, errors):
        pg.goto(url)
        pg.wait_for_selector("body[data-ready='1']")
        strip = pg.eval_on_selector_all(".tok", "els => els.map(e => [Number(e.dataset.pos), e.textContent])")
        assert strip == [[t["pos"], t["text"]] for t in res["tokens"]]      # escaped text survives the DOM
        for pos in ("5", "3"):
            pg.click(f'.tok[data-pos="{pos}"]')
            assert pg.get_attribute("#explanation", "data-pos") == pos
            texts = pg.eval_on_selector_all("#explanation .sample .text", "els => els.map(e => e.textContent)")
            assert texts == [s["text"] for s in res["explained"][pos]["samples"]]
            cos = pg.eval_on_selector_all("#explanation .sample", "els => els.map(e => Number(e.dataset.cos))")
            assert cos == pytest.approx([s["cos"] for s in res["explained"][pos]["samples"]])
            assert pg.get_attribute(f'.tok[data-pos="{pos}"]', "class").split()[-1] == "sel"
        assert pg.evaluate("location.hash") == "#pos=3"
        pg.click('.tok[data-pos="1"]')                                    # a token without explanations
        assert "not explained" in pg.inner_text("#explanation")
        pg.goto(url + f"#pos={len(res['tokens']) - 1}")                   # a link to a token
        pg.wait_for_selector("body[data-ready='1']")
        assert pg.get_attribute("#explanation", "data-pos") == str(len(res["tokens"]) - 1)
        pg.click('.tok[data-pos="5"]')
        pg.screenshot(path=str(shot), full_page=True)
        assert errors == []
        assert _browser.external(requests) == []
    assert shot.stat().st_size > 1000
    print(f"screenshot: {shot}")
