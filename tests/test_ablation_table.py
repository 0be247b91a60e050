"""benchmarks/ablation_table.py: one row per committed lever evaluation, paired differences signed
against the group's base, claims recomputed later filling what an older evaluation lacks."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import ablation_table  # noqa: E402


def _ci(m, lo, hi, n=10):
    return {"mean": m, "lo": lo, "hi": hi, "n": n}


def _eval(rf_sft, rf_rl, top1, **extra):
    return {"rows": 10, "documents": 4, "checkpoints": {
        "after_sft": {"real_minus_floor": _ci(rf_sft, rf_sft - .1, rf_sft + .1)},
        "after_rl": {"real_minus_floor": _ci(rf_rl, rf_rl - .1, rf_rl + .1),
                     "names_top1_prediction": _ci(top1, top1 - .2, top1 + .2), **extra}},
        "rl_minus_sft": {"own": _ci(.02, .01, .03), "judge": _ci(.004, -.005, .012)}}


def test_rows_read_from_results(tmp_path):
    w = lambda name, d: (tmp_path / name).write_text(json.dumps(d))
    w("default_run_eval.json", _eval(.58, .60, .57))
    w("claims_default_run.json", {"checkpoints": {"after_rl": {"repeats_prediction": _ci(.27, .22, .32),
                                                               "names_top1_prediction": _ci(.99, .9, 1.0)}}})
    w("quickstart_eval.json", _eval(.175, .183, .34))
    w("levers-before1.json", _eval(.113, .166, .34))
    # paired_rows.py's file: its base is the one-before run, its versus the group's base (none before)
    w("paired_before0_vs_before1.json", {"scores": {"fve_minus_floor": {"pooled_minus_base": _ci(.017, .003, .031)}}})
    rows = ablation_table.collect(str(tmp_path))
    assert [r["lever"] for r in rows] == ["the default recipe", "no token before (base)", "one token before"]
    d, base, one = rows
    assert d["rl_real_minus_floor"]["mean"] == .60 and d["rl_minus_sft_judge"]["mean"] == .004
    assert d["repeats_prediction"]["mean"] == .27 and d["names_top1"]["mean"] == .57   # its own number wins
    assert base["paired_rl_real_minus_floor_vs_base"] is None
    # one - none: the sign and the interval's ends flipped
    assert one["paired_rl_real_minus_floor_vs_base"] == pytest.approx({"mean": -.017, "lo": -.031, "hi": -.003, "n": 10})
    md = ablation_table.markdown(rows)
    assert md.count("\n") == 4 and "+0.600 [+0.500, +0.700]" in md and "-0.017 [-0.031, -0.003]" in md


def test_empty_results_folder_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "ablation_table.py"), "--results",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and str(tmp_path) in r.stderr


def test_rl_lever_sweeps_each_a_group(tmp_path):
    """Every rl_levers.py file is its own group; a variant that failed (an "error" entry) is left out."""
    def lever(name, rf, judge, overrides=()):
        e = _eval(.17, rf, .3)
        return {"variant": name, "overrides": list(overrides), "rows": 10, "documents": 4,
                "after_sft": e["checkpoints"]["after_sft"], "after_rl": e["checkpoints"]["after_rl"],
                "rl_minus_sft": {"judge": _ci(judge, judge - .01, judge + .01)}}
    (tmp_path / "levers-rl.json").write_text(json.dumps({"results": [lever("base", .18, .01)]}))
    (tmp_path / "levers-rl-selftext60.json").write_text(json.dumps({"results": [
        lever("base", .19, .002), {"variant": "broken", "error": "trainer refused"},
        lever("lr2x", .21, .03, ["--config.rl.optim_av.lr=1e-5"])]}))
    rows = ablation_table.collect(str(tmp_path))
    assert [(r["group"].split(" (")[0], r["lever"]) for r in rows] == [
        ("RL levers from one SFT pair", "base"), ("RL levers from the quickstart's SFT pair", "base"),
        ("RL levers from the quickstart's SFT pair", "lr2x")]
    assert rows[0]["what"] == "the quote recipe" and rows[1]["what"] == "the quickstart recipe, 60 RL steps"
    assert rows[2]["what"] == "--config.rl.optim_av.lr=1e-5" and rows[2]["rl_minus_sft_judge"]["mean"] == .03

