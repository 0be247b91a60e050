"""The evaluate report (nla_jax/evaluate.py -> OUTDIR/report.html) rendered by headless Chromium.

Two checkpoints of the shared tiny pair (sft_av and rl) are evaluated on a few held-out rows; the
page is opened in Chromium (Playwright driving the system's chromium, see tests/_browser.py) and
checked as a reader sees it: the side-by-side table has one column per checkpoint and every cell
shows what evaluate.json holds for it; every plot is laid out with a non-empty size and draws its
series (lines, points or bars) inside its own box; no script error, no request leaves the file.
A full-page screenshot is saved in the test's tmp directory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import _browser
from _tiny_run import NLA_FLAGS, NLA_STAGES, tiny_store, trained_workdir
from test_train import TINY, _env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOTS = ("plot-fve-vs-step", "plot-reward-vs-step", "plot-sft-fve-vs-step", "plot-length-hist", "plot-fve-by-position")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    wd = trained_workdir(tmp_path_factory, *NLA_FLAGS, stages=NLA_STAGES)
    store = tiny_store(tmp_path_factory)
    out = str(tmp_path_factory.mktemp("report") / "out")
    r = subprocess.run([sys.executable, "-m", "nla_jax.evaluate", "--config", TINY, f"--config.data.store={store}",
                        "--checkpoint", os.path.join(wd, "sft_av"), "--checkpoint", os.path.join(wd, "rl"),
                        "--out", out, "--config.eval.temperature=0.7", "--config.eval.rows=8", "--config.eval.batch=8", "--config.eval.n_examples=2"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "evaluate.json")) as f:
        doc = json.load(f)
    return os.path.join(out, "report.html"), doc


@pytest.mark.timeout(900)
def test_report_table_and_plots_render_in_chromium(report, tmp_path):
    from nla_jax.evaluate import ROWS, fmt, lookup
    path, doc = report
    labels = [c["label"] for c in doc["checkpoints"]]
    cks, curves = doc["checkpoints"], doc["training_curves"].values()
    has_data = {"plot-fve-vs-step": any(c["rl"] for c in curves), "plot-reward-vs-step": any(c["rl"] for c in curves),
                "plot-sft-fve-vs-step": any(c["sft_ar_val"] for c in curves),
                "plot-length-hist": any(sum(c["length"]["hist"]) for c in cks),
                "plot-fve-by-position": any(c["by_position"] for c in cks)}
    assert has_data["plot-fve-by-position"] and has_data["plot-sft-fve-vs-step"] and has_data["plot-fve-vs-step"]
    assert len(labels) == 2
    shot = tmp_path / "report.png"
    with _browser.page(viewport=(1300, 900)) as (pg, requests, errors):
        pg.goto("file://" + path)
        # -- the table: one column per checkpoint, each cell what evaluate.json says
        assert pg.is_visible("#comparison")
        heads = pg.eval_on_selector_all("#comparison th.ckpt", "els => els.map(e => e.textContent)")
        assert heads == labels
        cells = pg.eval_on_selector_all(
            "#comparison tbody tr",
            "rows => rows.map(r => [r.dataset.metric, Array.from(r.querySelectorAll('td')).map(td => td.textContent)])")
        assert [k for k, _ in cells] == [k for k, _ in ROWS]
        for key, texts in cells:
            assert texts == [fmt(lookup(c, key)) for c in doc["checkpoints"]], key
        assert any(t != "n/a" for _, texts in cells for t in texts)
        # -- the plots: laid out, and their marks drawn inside their own boxes
        for pid in PLOTS:
            box = pg.eval_on_selector(f"#{pid}", "e => { const r = e.getBoundingClientRect(); "
                                                 "return [r.width, r.height]; }")
            assert box[0] > 100 and box[1] > 100, (pid, box)
            marks = pg.eval_on_selector(
                f"#{pid}",
                "svg => { const vb = svg.viewBox.baseVal; return Array.from(svg.querySelectorAll("
                "'g.series polyline, g.series circle, g.series rect')).map(m => { const b = m.getBBox(); "
                "return [b.x, b.y, b.width, b.height, vb.width, vb.height]; }); }")
            assert bool(marks) == has_data[pid], (pid, len(marks))
            for x, y, w, h, vw, vh in marks:
                assert -1 <= x and x + w <= vw + 1 and -1 <= y and y + h <= vh + 1, (pid, x, y, w, h)
        n_samples = pg.eval_on_selector_all("#samples .sample", "els => els.length")
        assert n_samples == sum(len(c["samples"]) for c in doc["checkpoints"])
        pg.screenshot(path=str(shot), full_page=True)
        assert errors == []
        assert _browser.external(requests) == []
    assert shot.stat().st_size > 1000
    print(f"screenshot: {shot}")
