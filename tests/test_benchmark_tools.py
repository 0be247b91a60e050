"""The benchmark helpers every result goes through: benchmarks/record.py (provenance, atomic write)
and benchmarks/paired_rows.py (paired per-row comparisons across evaluations)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import paired_rows  # noqa: E402
import record  # noqa: E402

from nla_jax.nla import stats as stats_lib  # noqa: E402


def test_write_result_adds_provenance_and_replaces_atomically(tmp_path):
    out = tmp_path / "sub" / "r.json"
    record.write_result(str(out), {"x": 1}, quiet=True)
    doc = json.loads(out.read_text())
    prov = doc.pop("provenance")
    assert doc == {"x": 1}
    assert prov["commit"] is None or len(prov["commit"]) == 40
    assert prov["command"] and prov["cpus"] == os.cpu_count() and prov["utc"].endswith("Z")
    # a result that cannot be serialised leaves the earlier file as it was, and no temporary beside it
    with pytest.raises(TypeError):
        record.write_result(str(out), {"x": object()}, quiet=True)
    assert json.loads(out.read_text())["x"] == 1
    assert os.listdir(out.parent) == ["r.json"]
    with pytest.raises(ValueError):
        record.write_result(str(out), {"provenance": 1}, quiet=True)


def _evaldir(path, labels, values, docs, rows=None, name="rows.jsonl"):
    """A rows.jsonl as evaluate writes it (name="eval_rows.jsonl": a trainer work directory's eval stage):
    values[label] = (fve, fve_judge) per row."""
    os.makedirs(path, exist_ok=True)
    rows = list(range(len(docs))) if rows is None else rows
    with open(os.path.join(path, name), "w") as f:
        for i, (r, d) in enumerate(zip(rows, docs)):
            ck = {lab: {"fve": values[lab][0][i], "fve_judge": values[lab][1][i], "fve_floor": -0.2,
                        "current_token": "exact" if i % 2 else None, "names_top1": bool(i % 3)} for lab in labels}
            f.write(json.dumps({"row": r, "doc_id": d, "position": 7, "checkpoints": ck}) + "\n")
    return str(path)


def test_pooled_difference_is_the_per_row_mean_with_a_document_interval(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    docs = [f"d{i // 4}" for i in range(n)]                 # 15 documents of 4 rows
    base = (rng.normal(size=n), rng.normal(size=n))
    seeds = {f"w/rl-seed{k}": (base[0] + 0.1 * k + rng.normal(size=n) * 0.1, base[1] + rng.normal(size=n) * 0.1)
             for k in range(3)}
    a = _evaldir(tmp_path / "a", ["w/sft@4", *seeds], {"w/sft@4": base, **seeds}, docs)
    # a trainer's eval stage on the same rows, holding another recipe
    b = _evaldir(tmp_path / "b", ["after_rl"], {"after_rl": (base[0] + 0.5, base[1])}, docs, name="eval_rows.jsonl")
    res = paired_rows.compare(f"{a}:sft", [f"{a}:seed0", f"{a}:seed1", f"{a}:seed2", f"{b}:after_rl"])
    assert res["rows"] == n and res["documents"] == 15
    vs = np.stack([v[0] for v in seeds.values()] + [base[0] + 0.5])
    want = stats_lib.cluster_t_ci(vs.mean(0) - base[0], np.array(docs))
    got = res["scores"]["fve"]["pooled_minus_base"]
    assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(want, abs=1e-12)
    each = res["scores"]["fve"]["each_minus_base"]
    assert each["b:after_rl"]["mean"] == pytest.approx(0.5) and each["b:after_rl"]["hi"] - each["b:after_rl"]["lo"] < 1e-9
    assert res["scores"]["current_token_named"]["pooled_minus_base"]["mean"] == 0.0
    assert res["scores"]["fve_minus_floor"]["base"]["mean"] == pytest.approx(base[0].mean() + 0.2)


def test_judge_scores_are_compared_only_under_one_judge(tmp_path):
    """Two evaluations each scored by its own fixed judge: their judge fve are on different scales, so
    no judge difference is reported; one evaluation (one judge) gets it."""
    docs = ["a", "a", "b", "b", "c", "c"]
    v = {lab: (np.arange(6.0), np.arange(6.0)) for lab in ("x/sft@1", "x/rl@1")}
    a, b = _evaldir(tmp_path / "a", list(v), v, docs), _evaldir(tmp_path / "b", list(v), v, docs)
    for d, judge in ((a, "/runs/one/sft_av"), (b, "/runs/two/sft_av")):
        with open(os.path.join(d, "evaluate.json"), "w") as f:
            json.dump({"judge": judge}, f)
    one = paired_rows.compare(f"{a}:sft", [f"{a}:rl"])
    assert "fve_judge" in one["scores"] and "fve_judge_skipped" not in one
    two = paired_rows.compare(f"{a}:sft", [f"{b}:rl"])
    assert "fve_judge" not in two["scores"] and "different judges" in two["fve_judge_skipped"]
    assert "fve" in two["scores"]


def test_a_column_read_by_its_judge(tmp_path):
    """LABEL#judge: the same explanations scored by the evaluation's fixed judge, paired against its own AR."""
    docs = ["a", "a", "b", "b", "c", "c", "d", "d"]
    own, judge = np.arange(8.0) / 10, np.arange(8.0) / 10 + np.array([.1, .3, .2, .2, .0, .4, .1, .3])
    a = _evaldir(tmp_path / "a", ["x/sft@1"], {"x/sft@1": (own, judge)}, docs)
    res = paired_rows.compare(f"{a}:sft", [f"{a}:sft#judge"])
    assert res["versus"] == ["a:x/sft@1#judge"]
    got = res["scores"]["fve"]["pooled_minus_base"]
    want = stats_lib.cluster_t_ci(judge - own, np.array(docs))
    assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(want, abs=1e-12)
    assert res["scores"]["fve_minus_floor"]["pooled_minus_base"]["mean"] == pytest.approx(0.2)
    assert res["scores"]["names_top1"]["pooled_minus_base"]["mean"] == 0.0     # the same text
    assert "fve_judge" not in res["scores"]           # the judge column has no second judge
    b = _evaldir(tmp_path / "b", ["x/sft@1"], {"x/sft@1": (own, [None] * 8)}, docs)
    with pytest.raises(paired_rows.Bad, match="no fixed judge"):
        paired_rows.compare(f"{b}:sft", [f"{b}:sft#judge"])


def test_copies_of_one_sft_ar_are_one_judge(tmp_path):
    """Trainer eval stages whose judge is their own SFT AR: work directories holding byte-equal copies of one
    SFT AR (rl_levers.py's) are compared under that judge; a different SFT AR is another judge."""
    docs = ["a", "a", "b", "b", "c", "c"]
    v = {lab: (np.arange(6.0), np.arange(6.0) * 2) for lab in ("after_sft", "after_rl")}
    dirs = [_evaldir(tmp_path / n, list(v), v, docs, name="eval_rows.jsonl") for n in ("w1", "w2", "w3")]
    for d, weights in zip(dirs, (b"same", b"same", b"other")):
        with open(os.path.join(d, "eval.json"), "w") as f:
            json.dump({"judge": "sft_ar"}, f)
        os.makedirs(os.path.join(d, "sft_ar", "100", "state"))
        os.makedirs(os.path.join(d, "sft_ar", "150", "state"))
        (tmp_path / d / "sft_ar" / "100" / "state" / "w").write_bytes(os.urandom(8))     # older: not read
        (tmp_path / d / "sft_ar" / "150" / "state" / "w").write_bytes(weights)
    same = paired_rows.compare(f"{dirs[0]}:after_sft", [f"{dirs[0]}:after_rl", f"{dirs[1]}:after_rl"])
    assert "fve_judge" in same["scores"] and "fve_judge_skipped" not in same
    other = paired_rows.compare(f"{dirs[0]}:after_sft", [f"{dirs[2]}:after_rl"])
    assert "fve_judge" not in other["scores"] and "different judges" in other["fve_judge_skipped"]


def test_runs_each_against_their_own_base(tmp_path):
    """--base once per --versus: two runs of one recipe, each with its own SFT pair and judge; the per-row
    gains (each run minus its own base) are pooled, and judge gains are kept since each pair shares a judge."""
    rng = np.random.default_rng(1)
    docs = [f"d{i // 3}" for i in range(30)]
    runs = []
    for k, (gain, judge_gain) in enumerate(((0.2, 0.05), (0.1, -0.01))):
        sft = (rng.normal(size=30), rng.normal(size=30))
        rl = (sft[0] + gain + rng.normal(size=30) * 0.05, sft[1] + judge_gain + rng.normal(size=30) * 0.05)
        d = _evaldir(tmp_path / f"run{k}", ["after_sft", "after_rl"], {"after_sft": sft, "after_rl": rl}, docs,
                     name="eval_rows.jsonl")
        with open(os.path.join(d, "eval.json"), "w") as f:
            json.dump({"judge": "sft_ar"}, f)
        os.makedirs(os.path.join(d, "sft_ar", "150"))
        (tmp_path / d / "sft_ar" / "150" / "w").write_bytes(b"judge %d" % k)       # each run its own judge
        runs.append((d, sft, rl))
    (a, sa, ra), (b, sb, rb) = runs
    res = paired_rows.compare([f"{a}:after_sft", f"{b}:after_sft"], [f"{a}:after_rl", f"{b}:after_rl"])
    assert res["base"] == ["run0:after_sft", "run1:after_sft"] and "fve_judge_skipped" not in res
    for name, i in (("fve", 0), ("fve_judge", 1)):
        want = stats_lib.cluster_t_ci(((ra[i] - sa[i]) + (rb[i] - sb[i])) / 2, np.array(docs))
        got = res["scores"][name]["pooled_minus_base"]
        assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(want, abs=1e-12)
        assert res["scores"][name]["each_minus_base"]["run1:after_rl"]["mean"] == pytest.approx((rb[i] - sb[i]).mean())
    # crossing the runs pairs two judges: no judge gain
    crossed = paired_rows.compare([f"{a}:after_sft", f"{b}:after_sft"], [f"{b}:after_rl", f"{a}:after_rl"])
    assert "fve_judge" not in crossed["scores"] and "different judges" in crossed["fve_judge_skipped"]
    with pytest.raises(paired_rows.Bad, match="one per --versus"):
        paired_rows.compare([f"{a}:after_sft", f"{b}:after_sft"], [f"{a}:after_rl"])


@pytest.mark.parametrize("case", ["rows_differ", "ambiguous", "missing", "no_label"])
def test_bad_columns_are_refused_with_one_line(tmp_path, case):
    docs = ["a", "a", "b", "b"]
    v = {lab: (np.zeros(4), np.zeros(4)) for lab in ("x/rl@1", "x/rl@2", "x/sft@1")}
    a = _evaldir(tmp_path / "a", list(v), v, docs)
    b = _evaldir(tmp_path / "b", list(v), v, docs, rows=[0, 1, 2, 5] if case == "rows_differ" else None)
    base, versus = {"rows_differ": (f"{a}:sft", f"{b}:rl@1"), "ambiguous": (f"{a}:sft", f"{a}:rl"),
                    "missing": (f"{a}:sft", f"{tmp_path}/nothing:rl@1"), "no_label": (f"{a}:sft", f"{a}:ppo")}[case]
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "paired_rows.py"), "--base", base,
                        "--versus", versus, "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 2 and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert {"rows_differ": "rows differ", "ambiguous": "more than one", "missing": "not found",
            "no_label": "no label"}[case] in lines[0]
