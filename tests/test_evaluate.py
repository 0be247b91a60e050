"""python -m nla_jax.evaluate and the measurements behind it (nla_jax/nla/measure.py).

Constructed cases with known answers: a perfect reconstruction has fve_nrm 1; the unnormalised
training mean has fve_nrm 0 and the renormalised mean the stored floor, exactly, on the statistics
sample; explanations that carry no information about the activation (a ridge head on features
independent of the targets) score the floor, while informative ones score above it and their
shuffled control below; the quote detector on planted quotes; loss recovered = 1 for the original
vector, 0 for the mean, and the known mixture in between, with the replacement checked against
the transformer's own add-after-block hook. Then the CLI end to end on a tiny trained work
directory with two checkpoints (one table, one JSON, a self-contained report.html), atomic
output, and bad inputs refused with one line.
"""
import glob
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from test_train import RL_LIVE, REPO, TINY, _env, _one_error_line, _train, store  # noqa: F401 (store: fixture)

from nla_jax.nla import measure
from nla_jax.nla import stats as stats_lib


def _acts(n=600, d=24, seed=0, shared=3.0):
    """Raw activations whose normalised versions share a large mean (like SmolLM2's block 20)."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(d)
    mu[:2] = shared
    return rng.normal(size=(n, d)) + mu


# ----------------------------------------------------------------------------- fve: constructed cases

@pytest.mark.parametrize("center", [False, True])
def test_perfect_reconstruction_scores_one(center):
    acts = _acts()
    st = stats_lib.compute(acts)
    t = measure.targets(acts, st, center)
    # the prediction is the raw vector (scaled: only its direction counts), centred like the target
    pred = 3.7 * (acts - (st.mean_array() if center else 0))
    mse = measure.mse_rows(pred, t)
    np.testing.assert_allclose(measure.fve(mse, st.var(center)), 1.0, atol=1e-12)
    np.testing.assert_allclose(measure.cosine(mse), 1.0, atol=1e-12)


@pytest.mark.parametrize("center", [False, True])
def test_unnormalised_mean_is_zero_and_renormalised_mean_is_the_floor(center):
    acts = _acts(seed=1)
    st = stats_lib.compute(acts)     # the statistics sample = the evaluated rows: exact identities
    t = measure.targets(acts, st, center)
    var = st.var(center)
    assert measure.fve(measure.mean_mse(t, st, center), var).mean() == pytest.approx(0.0, abs=1e-12)
    assert measure.fve(measure.floor_mse(t, st, center), var).mean() == pytest.approx(st.floor(center), abs=1e-12)
    if not center:  # a large shared mean: the floor is well below 0 (WORKSPACE.md, "The method in brief"), not 0
        assert st.floor(False) < -0.05


def _ridge_case(informative: bool, seed: int):
    """Features x of each row (what an AR reads from an explanation), a ridge head fit on training
    rows, predictions on held-out rows. informative=False: x independent of the targets."""
    from nla_jax.nla import ar as ar_lib
    rng = np.random.default_rng(seed)
    n_train, n_eval, p = 4000, 2000, 8
    acts = _acts(n_train + n_eval, seed=seed)
    st = stats_lib.compute(acts[:n_train])
    t = measure.targets(acts, st, False)
    if informative:
        x = t[:, 2:2 + p] + 0.5 * rng.normal(size=(len(t), p))
    else:
        x = rng.normal(size=(len(t), p))
    w, b = ar_lib.ridge(x[:n_train], t[:n_train], 1e-3)
    pred = x[n_train:] @ w + b
    docs = np.arange(n_eval) // 4          # 4 rows per document
    perm = measure.derangement_by_doc(docs, seed)
    te = t[n_train:]
    var = st.var(False)
    f_real = measure.fve(measure.mse_rows(pred, te), var).mean()
    f_shuf = measure.fve(measure.mse_rows(pred[perm], te), var).mean()   # explanation of another row, same AR
    f_floor = measure.fve(measure.floor_mse(te, st, False), var).mean()
    return f_real, f_shuf, f_floor


@pytest.mark.parametrize("seed", [0, 1])
def test_shuffled_without_information_scores_the_floor(seed):
    f_real, f_shuf, f_floor = _ridge_case(informative=False, seed=seed)
    # With features independent of the targets the ridge head predicts the training mean of the
    # targets plus estimation noise w.x; renormalised, that is the floor's direction plus noise.
    # The noise costs ~ p/(n_train - p - 1) = 8/3991 = 0.002 of Var(y) per dimension (OLS excess
    # risk), i.e. ~0.002-0.005 of fve after renormalisation; both the floor and the predictions are
    # scored on the same held-out rows, so sampling noise of the rows cancels. 0.02 is 4-10x that.
    assert abs(f_shuf - f_floor) < 0.02, (f_shuf, f_floor)
    assert abs(f_real - f_floor) < 0.02, (f_real, f_floor)   # real is just as uninformative here
    assert f_shuf <= f_floor + 1e-3    # the floor is the best constant direction: noise only costs


def test_informative_explanations_beat_the_floor_and_their_shuffled_control():
    f_real, f_shuf, f_floor = _ridge_case(informative=True, seed=2)
    assert f_real > f_floor + 0.05, (f_real, f_floor)
    # a confident AR fed another row's explanation points the wrong way: below the floor
    assert f_shuf < f_floor, (f_shuf, f_floor)


def test_derangement_never_keeps_a_document():
    docs = np.repeat(np.arange(7), [1, 2, 3, 5, 8, 2, 4])
    p = measure.derangement_by_doc(docs, 0)
    assert sorted(p) == list(range(len(docs)))
    assert not (docs[p] == docs).any()


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    docs = np.repeat(np.arange(20), 5)
    v = rng.normal(size=100)
    c = measure.ci(v, docs)
    assert c["lo"] <= c["mean"] <= c["hi"] and c["mean"] == pytest.approx(v.mean()) and c["n"] == 100
    assert measure.ci(v[:5], docs[:5])["lo"] is None                         # one document: no interval
    num, den = rng.uniform(0, 1, 100), rng.uniform(1, 2, 100)
    r = measure.ratio_ci(num, den, docs, 500, 0, transform=lambda x: 1 - x)
    assert r["mean"] == pytest.approx(1 - num.sum() / den.sum()) and r["lo"] <= r["mean"] <= r["hi"]
    assert measure.ratio_ci(num, np.zeros(100), docs, 10, 0)["mean"] is None   # no denominator: n/a



def test_quoted_spans_are_normalised():
    assert measure.quoted_spans('A "Two\n  Words" and \u00ab X \u00bb') == ["two words", "x"]


# ----------------------------------------------------------------------------- downstream effect

@pytest.fixture(scope="module")
def tiny_target():
    from nla_jax import configlib
    from nla_jax import weights
    cfg = configlib.get(TINY)
    mcfg, params, _ = weights.load_from_config(cfg.model)
    return types.SimpleNamespace(model_cfg=mcfg, target=params, cfg=cfg, ctx=types.SimpleNamespace(compute_dtype=None))


def test_loss_recovered_known_answers(tiny_target):
    import jax.numpy as jnp
    from nla_jax.models import transformer as T
    S = tiny_target
    rng = np.random.default_rng(0)
    b, s = 6, 32
    tokens = rng.integers(3, 300, size=(b, s)).astype(np.int32)
    pos = np.array([5, 9, 14, 20, 26, 31], np.int32)
    xk, h = measure.block_output(S, tokens, pos)
    mean = h.mean(0) + rng.normal(size=h.shape[1])           # a "dataset mean" that is not any row
    roundtrip = measure.denormalise(stats_lib.normalise_np(h), h, None)
    centred = measure.denormalise(stats_lib.normalise_np(h, mean), h, mean)
    repl = np.stack([np.broadcast_to(mean, h.shape), h, roundtrip, centred], axis=1)
    kl = measure.next_token_kl(S, xk, pos, repl)             # [b, 4]
    kl_mean = kl[:, 0]
    assert (kl_mean > 1e-4).all()
    lr = lambda k: 1 - k.sum() / kl_mean.sum()
    # reconstruction = the original vector: nothing changes (exactly, and through a de-normalisation
    # round trip, centred or not: float32 rounding of the replaced vector only)
    assert np.abs(kl[:, 1]).max() < 1e-6 and lr(kl[:, 1]) == pytest.approx(1.0, abs=1e-6)
    assert lr(kl[:, 2]) == pytest.approx(1.0, abs=1e-4) and lr(kl[:, 3]) == pytest.approx(1.0, abs=1e-4)
    # reconstruction = the mean: 0
    assert lr(kl_mean) == 0.0
    # half the rows reconstructed perfectly, half mean-ablated: 1 - (their share of the mean-ablation KL)
    mix = np.where(np.arange(b)[:, None] < 3, h, np.broadcast_to(mean, h.shape))
    k_mix = measure.next_token_kl(S, xk, pos, mix[:, None])[:, 0]
    np.testing.assert_allclose(k_mix[3:], kl_mean[3:], rtol=1e-5)
    assert lr(k_mix) == pytest.approx(1 - kl_mean[3:].sum() / kl_mean.sum(), abs=1e-6)
    # the replacement equals the model's own hook: add (repl - original) after block K at the position
    # (add_at scales its vector by |h|/sqrt(d), so pass the difference times sqrt(d)/|h|)
    full = T.forward(S.target, jnp.asarray(tokens), S.model_cfg)["logits"]
    d = h.shape[1]
    delta = (np.broadcast_to(mean, h.shape) - h) * np.sqrt(d) / np.linalg.norm(h, axis=1, keepdims=True)
    ov = T.Override(jnp.asarray(pos)[:, None], jnp.asarray(delta, jnp.float32)[:, None])
    hooked = T.forward(S.target, jnp.asarray(tokens), S.model_cfg, override=ov, add_after=S.cfg.model.layer)["logits"]
    lp0 = np.asarray(jax_log_softmax(full[np.arange(b), pos]), np.float64)
    lp1 = np.asarray(jax_log_softmax(hooked[np.arange(b), pos]), np.float64)
    want = (np.exp(lp0) * (lp0 - lp1)).sum(-1)
    np.testing.assert_allclose(kl_mean, want, rtol=1e-3, atol=1e-6)


def jax_log_softmax(x):
    import jax
    return jax.nn.log_softmax(x.astype("float32"), axis=-1)


def test_context_batches_cut_and_pad():
    toks = np.full((5, 200), -1, np.int32)
    pos = np.array([20, 70, 30, 10, 129])
    for i, p in enumerate(pos):
        toks[i, :p + 1] = 7
    got = list(measure.context_batches(toks, pos, 2, 64, 0))
    assert [len(i) for i, _, _ in got] == [2, 2, 2] and list(got[-1][0]) == [4, 4]
    assert [t.shape[1] for _, t, _ in got] == [128, 64, 192]
    assert all((t >= 0).all() for _, t, _ in got)


# ----------------------------------------------------------------------------- CLI end to end

def _evaluate(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "nla_jax.evaluate", "--config", TINY, *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """A tiny work directory with sft_av, sft_ar and rl finished (closer "8" so some explanations close),
    and a teacher-summary file for half the eval rows (the store's own cover only the SFT splits)."""
    from nla_jax.data import store as store_lib
    tmp = tmp_path_factory.mktemp("evaluate")
    wd = str(tmp / "w")
    r = _train(store, wd, "--stages", "sft_av,sft_ar,rl", *RL_LIVE)
    assert r.returncode == 0, r.stderr[-3000:]
    st = store_lib.open_store(store)
    rows = st.rows_of_split("eval")[::2]
    summ = str(tmp / "teacher.jsonl")
    with open(summ, "w") as f:
        for r_ in rows:
            f.write(json.dumps({"row": int(r_), "text": "The text ends with: \u00abthe river\u00bb"}) + "\n")
    return types.SimpleNamespace(wd=wd, store=store, summ=summ, summarised=set(int(x) for x in rows), tmp=tmp)


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.classes, self.urls, self.tags = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        self.classes += (a.get("class") or "").split()
        for k in ("src", "href", "xlink:href", "action", "data"):
            if a.get(k):
                self.urls.append(a[k])


def test_sft_pair_at_an_av_step(trained):
    """WORKDIR/sft_av@STEP: the SFT pair with the AV of that step and sft_ar's final AR (the tiny
    config checkpoints sft_av at steps 2 and 4 and keeps both)."""
    import jax

    from nla_jax import evaluate
    from nla_jax.errors import UserError
    from nla_jax.nla import workdir as workdir_lib
    part = workdir_lib.load_pair(os.path.join(trained.wd, "sft_av@2"), with_target=False)
    final = workdir_lib.load_pair(os.path.join(trained.wd, "sft_av"), with_target=False)
    assert (part.kind, part.step, final.step) == ("sft", 2, 4)
    same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y))
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not same(part.av, final.av)             # the AV of step 2, not the final one
    assert same(part.ar, final.ar)                 # the same (final) SFT AR
    plans = [evaluate.plan(os.path.join(trained.wd, "sft_av@2")), evaluate.plan(os.path.join(trained.wd, "sft_av"))]
    assert evaluate.unique_labels(plans) == ["w/sft@2", "w/sft@4"]
    with pytest.raises(UserError, match="rl and sft_av stages only"):
        workdir_lib.resolve(os.path.join(trained.wd, "sft_ar@2"))
    with pytest.raises(UserError, match="no checkpoint step 3"):
        workdir_lib.load_pair(os.path.join(trained.wd, "sft_av@3"), with_target=False)


@pytest.fixture(scope="module")
def run_two(trained):
    out = str(trained.tmp / "out")
    r = _evaluate(f"--config.data.store={trained.store}", "--checkpoint", os.path.join(trained.wd, "sft_av"),
                  "--checkpoint", os.path.join(trained.wd, "rl"), "--out", out, "--config.eval.temperature=0.7",
                  "--judge", os.path.join(trained.wd, "sft_av"),
                  f"--config.eval.summaries={trained.summ}", "--config.eval.n_examples=3",
                  # 20 rows in batches of 8: the last batch is padded (and trimmed back)
                  "--config.eval.rows=20", "--config.eval.batch=8")
    return types.SimpleNamespace(r=r, out=out)


@pytest.mark.timeout(900)
def test_cli_two_checkpoints_one_table_and_json(run_two, trained):
    r = run_two.r
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(run_two.out, "evaluate.json")) as f:
        doc = json.load(f)
    cks = doc["checkpoints"]
    assert [c["kind"] for c in cks] == ["sft", "rl"] and [c["step"] for c in cks] == [4, 3]
    labels = [c["label"] for c in cks]
    assert len(set(labels)) == 2
    # one side-by-side table on stdout with both columns and every row
    from nla_jax.evaluate import ROWS
    header = [ln for ln in r.stdout.splitlines() if labels[0] in ln and labels[1] in ln]
    assert len(header) == 1, r.stdout
    for _, lab in ROWS:
        assert sum(ln.startswith(lab + "  ") for ln in r.stdout.splitlines()) == 1, lab
    n = doc["rows"]
    teacher_rows = len(set(doc["row_ids"]) & trained.summarised)
    assert n == len(doc["row_ids"]) == 20 and doc["teacher_rows"] == teacher_rows > 0
    assert doc["ci"]["means"].startswith("cluster-robust")
    for c in cks:
        cl = c["claims"]
        for k in ("current_token_exact", "current_token_named", "current_token_named_shuffled"):
            assert 0 <= cl[k]["mean"] <= 1 and cl[k]["n"] == 20, (k, cl[k])
        assert cl["current_token_exact"]["mean"] <= cl["current_token_named"]["mean"]
        for k in ("names_top1_prediction", "names_top1_prediction_shuffled"):   # downstream on: the target's top-1
            assert 0 <= cl[k]["mean"] <= 1 and cl[k]["n"] == 20, (k, cl[k])
        # the same checks of the teacher text on its rows («the river» quoted, no prediction stated)
        assert cl["with_quotes_teacher"]["mean"] == 1.0 and cl["with_quotes_teacher"]["n"] == teacher_rows
        assert cl["names_top1_prediction_teacher"]["mean"] == 0.0
        assert cl["repeats_prediction_teacher"]["mean"] is None and cl["quote_spans_teacher"] == teacher_rows
        f = c["fve"]
        assert f["real_minus_floor"]["mean"] == pytest.approx(f["real"]["mean"] - f["floor"]["mean"])
        assert f["real_minus_shuffled"]["mean"] == pytest.approx(f["real"]["mean"] - f["shuffled"]["mean"])
        for group in ("fve", "cosine"):
            for k, v in c[group].items():
                assert v["mean"] is not None and v["lo"] <= v["mean"] <= v["hi"], (c["label"], group, k, v)
        assert c["fve"]["teacher"]["n"] == teacher_rows
        for k in ("kl_mean", "kl_recon", "kl_floor", "kl_shuffled", "loss_recovered", "loss_recovered_floor",
                  "loss_recovered_shuffled"):
            v = c["downstream"][k]
            assert v["lo"] <= v["mean"] <= v["hi"], (k, v)
        assert c["downstream"]["kl_mean"]["mean"] > 0
        # block K recomputed from the stored context = the stored activation (float32 rounding)
        assert c["downstream"]["recompute_rel_err_max"] < 1e-4
        assert 0 <= c["extract_fail"]["mean"] < 1          # temperature 0.7 with closer "8": some close
        assert sum(c["length"]["hist"]) + c["length"]["failed"] == n
        assert c["kl_ref"]["per_token"]["mean"] >= 0 and c["kl_ref"]["ref"]
        assert len(c["samples"]) == 3 and all(s["context"] for s in c["samples"])
        assert sum(b["n"] for b in c["by_position"]) == n
    sft, rl = cks
    assert sft["kl_ref"]["ref"].startswith("target:")            # SFT: the target-initialised verbalizer
    assert os.path.basename(rl["kl_ref"]["ref"]) == "sft_av"      # RL: its KL reference
    assert sft["kl_ref"]["per_token"]["mean"] > 0                 # SFT moved the verbalizer
    # the baselines that do not involve the pair agree across the two columns (same statistics)
    for k in ("floor", "mean"):
        assert sft["fve"][k] == rl["fve"][k]
    # the unnormalised training mean mu is 0 on the statistics sample; on other rows
    # E|t - mu|^2 = Var_eval + |mean_eval - mu|^2 / d >= Var_eval, so fve <= 1 - Var_eval / Var_train exactly
    for c in cks:
        assert c["fve"]["mean"]["mean"] <= 1 - c["var_nrm_eval"] / c["var_nrm"] + 1e-9
    # the fixed judge (the SFT AR) read both columns' explanations; each column after the first has its
    # paired difference from the first, under its own AR and under the judge (same rows: mean of differences
    # = difference of means)
    assert doc["judge"] == os.path.join(trained.wd, "sft_av")
    for c in cks:
        for k in ("real", "shuffled", "real_minus_floor", "real_minus_shuffled"):
            v = c["judge"][k]
            assert v["n"] == n and v["lo"] <= v["mean"] <= v["hi"], (c["label"], k, v)
        assert c["judge"]["real_minus_floor"]["mean"] == pytest.approx(c["judge"]["real"]["mean"] - c["fve"]["floor"]["mean"])
    assert "vs_first" not in sft
    assert rl["vs_first"]["own"]["mean"] == pytest.approx(rl["fve"]["real"]["mean"] - sft["fve"]["real"]["mean"])
    assert rl["vs_first"]["judge"]["mean"] == pytest.approx(rl["judge"]["real"]["mean"] - sft["judge"]["real"]["mean"])
    assert not [k for c in cks for k in c if k.startswith("_")]       # working arrays are not written
    curves = doc["training_curves"][trained.wd]
    assert [x["step"] for x in curves["rl"]] == [1, 2, 3] and curves["sft_ar_val"]


@pytest.mark.timeout(900)
def test_report_is_self_contained_with_stable_ids(run_two):
    assert run_two.r.returncode == 0, run_two.r.stderr[-3000:]
    with open(os.path.join(run_two.out, "report.html"), encoding="utf-8") as f:
        text = f.read()
    p = _Ids()
    p.feed(text)
    assert {"meta", "comparison", "training-curves", "plot-fve-vs-step", "plot-reward-vs-step", "plot-sft-fve-vs-step",
            "length-histogram",
            "plot-length-hist", "fve-by-position", "plot-fve-by-position", "samples"} <= p.ids
    assert p.classes.count("sample") == 6 and {"context", "explanation", "fve", "nla-table", "plot"} <= set(p.classes)
    assert not [u for u in p.urls if not u.startswith("#")], p.urls       # nothing fetched from anywhere
    assert not re.search(r"https?://|@import|url\(", text)
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    assert text.count("<svg") == 5 and "<polyline" in text


def test_outputs_are_replaced_only_when_complete(tmp_path):
    from nla_jax import evaluate
    out = str(tmp_path)
    names = ("evaluate.json", "report.html", "rows.jsonl")
    evaluate.write_outputs(out, {"a": 1}, "<html>old</html>", [{"row": 0}])
    before = {n: open(os.path.join(out, n), "rb").read() for n in names}
    with pytest.raises(UnicodeEncodeError):
        evaluate.write_outputs(out, {"a": 2}, "<html>\ud800</html>", [{"row": 1}])   # the report fails to write
    after = {n: open(os.path.join(out, n), "rb").read() for n in names}
    assert after == before and sorted(os.listdir(out)) == sorted(names)


@pytest.mark.timeout(900)
def test_rows_jsonl_holds_the_numbers_behind_the_json(run_two):
    """rows.jsonl is what paired analyses across evaluations start from: each checkpoint's per-row
    scores must be exactly the rows behind evaluate.json's means and paired differences."""
    assert run_two.r.returncode == 0, run_two.r.stderr[-3000:]
    with open(os.path.join(run_two.out, "evaluate.json")) as f:
        doc = json.load(f)
    with open(os.path.join(run_two.out, doc["row_records"])) as f:
        recs = [json.loads(line) for line in f]
    assert [r["row"] for r in recs] == doc["row_ids"]
    assert len({r["doc_id"] for r in recs}) == doc["documents"]
    labels = [c["label"] for c in doc["checkpoints"]]
    col = lambda lab, k: np.array([r["checkpoints"][lab][k] for r in recs], np.float64)
    for c in doc["checkpoints"]:
        lab = c["label"]
        assert set(recs[0]["checkpoints"]) == set(labels)
        for k, key in (("fve", "real"), ("fve_floor", "floor"), ("fve_shuffled", "shuffled")):
            assert col(lab, k).mean() == pytest.approx(c["fve"][key]["mean"], abs=1e-9), (lab, k)
        assert col(lab, "fve_judge").mean() == pytest.approx(c["judge"]["real"]["mean"], abs=1e-9)
        named = [r["checkpoints"][lab]["current_token"] for r in recs]
        assert np.mean([m is not None for m in named]) == pytest.approx(c["claims"]["current_token_named"]["mean"])
        assert np.mean([m == "exact" for m in named]) == pytest.approx(c["claims"]["current_token_exact"]["mean"])
        assert col(lab, "names_top1").mean() == pytest.approx(c["claims"]["names_top1_prediction"]["mean"])
        assert int(col(lab, "quote_spans").sum()) == c["claims"]["quote_spans"]
        several = col(lab, "predictions") >= 2
        if several.any():
            assert col(lab, "repeats_prediction")[several].mean() == pytest.approx(c["claims"]["repeats_prediction"]["mean"])
        else:
            assert c["claims"]["repeats_prediction"]["mean"] is None
        assert np.mean(col(lab, "quote_spans") > 0) == pytest.approx(c["claims"]["with_quotes"]["mean"])
        assert col(lab, "quotes_absent").sum() / max(col(lab, "quote_spans").sum(), 1) == \
            pytest.approx(c["claims"]["quotes_absent"]["mean"] or 0.0)
        pre = [r["checkpoints"][lab]["preceding"] for r in recs]
        assert np.mean([p is not None for p in pre]) == pytest.approx(c["claims"]["states_preceding"]["mean"])
        if any(p is not None for p in pre):
            assert pre.count(True) / sum(p is not None for p in pre) == \
                pytest.approx(c["claims"]["preceding_correct"]["mean"])
        assert [r["checkpoints"][lab]["ok"] for r in recs].count(False) == c["length"]["failed"]
    # the paired column difference is the mean of the per-row differences, CI over documents
    from nla_jax.nla import stats as stats_lib
    diff = col(labels[1], "fve") - col(labels[0], "fve")
    docs = np.array([r["doc_id"] for r in recs])
    m, lo, hi = stats_lib.cluster_t_ci(diff, docs)
    vs = doc["checkpoints"][1]["vs_first"]["own"]
    assert (vs["mean"], vs["lo"], vs["hi"]) == pytest.approx((m, lo, hi), abs=1e-9)


# ----------------------------------------------------------------------------- bad inputs

def _damaged_copy(wd, dst):
    """A copy of the work directory whose every rl step has its array files cut in half (a damaged
    newest step alone is skipped: the pair loads from the newest step that reads, as training does)."""
    shutil.copytree(wd, dst)
    files = [f for f in glob.glob(os.path.join(dst, "rl", "*", "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files
    for f in files:
        os.truncate(f, os.path.getsize(f) // 2)
    return os.path.join(dst, "rl")


def _other_layer_store(store, dst):
    shutil.copytree(store, dst)
    path = os.path.join(dst, "manifest.json")
    with open(path) as f:
        man = json.load(f)
    man["meta"]["layer"] = 1
    with open(path, "w") as f:
        json.dump(man, f)
    return dst


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case,needle", [
    ("missing", "no such directory"),
    ("not_workdir", "not a trainer work directory"),
    ("damaged", "no readable checkpoints"),
    ("other_layer", "holds layer 1"),
    ("bad_step", "step 99"),
    ("bad_setting", "eval.batch=0"),
    ("bad_judge", "no such directory"),
])
def test_bad_inputs_refused_with_one_line_and_old_result_kept(trained, run_two, tmp_path, case, needle):
    store, ck = trained.store, os.path.join(trained.wd, "rl")
    extra = []
    if case == "missing":
        ck = str(tmp_path / "nope")
    elif case == "not_workdir":
        os.makedirs(tmp_path / "empty" / "stuff")
        ck = str(tmp_path / "empty")
    elif case == "damaged":
        ck = _damaged_copy(trained.wd, str(tmp_path / "w"))
    elif case == "other_layer":
        store = _other_layer_store(trained.store, str(tmp_path / "store"))
    elif case == "bad_step":
        ck = ck + "@99"
    elif case == "bad_setting":
        extra = ["--config.eval.batch=0"]
    elif case == "bad_judge":
        extra = ["--judge", str(tmp_path / "no_judge")]
    # an earlier result in OUTDIR must survive a failed run untouched
    out = run_two.out
    assert run_two.r.returncode == 0
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in ("evaluate.json", "report.html", "rows.jsonl")}
    # the bad checkpoint first: its error comes before any progress output
    r = _evaluate(f"--config.data.store={store}", "--checkpoint", ck, "--checkpoint", os.path.join(trained.wd, "sft_av"),
                  "--out", out, *extra, timeout=300)
    if case == "damaged":
        # Besides the reader's warnings (one per damaged step it skipped) orbax's leftover reads of the
        # damaged files may print "RuntimeError: Event loop is closed" tracebacks from its own threads
        # (asyncio frames only, nondeterministic). What must hold: exit 2, exactly one `error:` line (ours),
        # and no traceback runs through nla_jax code.
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, r.stderr[-3000:]
        assert not [ln for ln in lines if ln.lstrip().startswith("File ") and "nla_jax" in ln], r.stderr[-3000:]
        errors = [ln for ln in lines if ln.startswith("error: ")]
        assert len(errors) == 1, lines
        r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout, errors[0] + "\n")
    line = _one_error_line(r)
    assert needle in line, line
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in before} == before
    assert sorted(os.listdir(out)) == ["evaluate.json", "report.html", "rows.jsonl"]


def test_help():
    r = subprocess.run([sys.executable, "-m", "nla_jax.evaluate", "--help"], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--checkpoint" in r.stdout and "--out" in r.stdout


@pytest.mark.timeout(900)
def test_a_single_split_store_of_another_corpus_evaluates(trained, tmp_path):
    """A researcher extracts a new corpus with one split to evaluate a trained pair on it: split 0 is
    every row, so the split array holds only its fill value, and the store must still open."""
    corpus = tmp_path / "other.jsonl"
    from test_train import _corpus
    _corpus(corpus, n=12, seed=7)
    root = str(tmp_path / "store1")
    r = subprocess.run([sys.executable, "-m", "nla_jax.extract", "--config", TINY, f"--config.data.store={root}",
                        f"--config.data.sources=[{{'kind':'jsonl','path':'{corpus}','name':'o'}}]",
                        "--config.data.max_len=128", "--config.data.min_position=16", "--config.data.k=4",
                        "--config.data.splits=(('eval',1.0),)"], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(root, "part-00000", "split", "c", "0"))   # every shard has its file
    out = str(tmp_path / "out")
    r = _evaluate(f"--config.data.store={root}", "--checkpoint", os.path.join(trained.wd, "sft_av"), "--out", out,
                  "--config.eval.rows=16", "--config.eval.batch=8", "--config.eval.downstream=False")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "evaluate.json")) as f:
        doc = json.load(f)
    assert doc["rows"] == 16 and doc["checkpoints"][0]["fve"]["real"]["n"] == 16
