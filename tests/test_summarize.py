"""python -m nla_jax.summarize: teacher summaries beside the store (resume, torn line, import)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nla_jax.data import store as store_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, real):
    root = str(tmp_path_factory.mktemp("summ") / "store")
    tok = real.tok
    texts = ["The old lighthouse keeper climbed the stairs every night to light the lamp for the ships",
             "Preheat the oven, mix the flour with two eggs, and pour the batter into the pan before baking",
             "The committee voted to postpone the decision until the budget report arrives next month"]
    meta = {"fingerprint": "f", "split_names": ["av_sft", "ar_sft", "rl", "eval"]}
    with store_lib.PartWriter.create_or_resume(root, 0, d=4, dtype="float32", capacity=6, ctx_len=32, meta=meta) as w:
        for i, t in enumerate(texts):
            ids = tok.encode(t)[:32]
            pos = np.array([len(ids) - 3, len(ids) - 1])
            toks = np.full((2, 32), -1)
            for j, p in enumerate(pos):
                toks[j, :p + 1] = ids[:p + 1]
            w.append(np.ones((2, 4), np.float32), np.array([i, i]), pos, np.array([i % 3, i % 3]), toks, cursor={})
    store_lib.finalize_manifest(root, meta)
    return root


def _run(store, *extra, env=None, teacher="target", splits="('av_sft','ar_sft')"):
    """summarize on the smollm2 config; by default with the sampled teacher (the model writing prose)
    over the SFT splits, which the config's own default (teacher="predict") replaced; teacher=None /
    splits=None keep the config's own."""
    env = dict(os.environ, PYTHONPATH=REPO, NLA_COMPILE_CACHE=os.path.join(REPO, "build", "jax_cache"), **(env or {}))
    chosen = ([f"--config.summarize.teacher={teacher}"] if teacher is not None else []) + \
        ([f"--config.summarize.splits={splits}"] if splits is not None else [])
    return subprocess.run([sys.executable, "-m", "nla_jax.summarize", "--config",
                           os.path.join(REPO, "configs", "smollm2_135m.py"), f"--config.data.store={store}",
                           "--config.summarize.batch=2", "--config.summarize.max_new_tokens=8", *chosen, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _records(store):
    with open(os.path.join(store, "summaries.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_generate_resume_and_torn_line(small_store):
    s = store_lib.open_store(small_store)
    want = sorted(np.concatenate([s.rows_of_split("av_sft"), s.rows_of_split("ar_sft")]).tolist())
    r = _run(small_store, "--limit", "2")
    assert r.returncode == 0, r.stderr
    first = _records(small_store)
    assert [x["row"] for x in first] == want[:2]
    # the quote leads (the AV's cap truncates from the end: the final tokens must survive it)
    assert all(x["text"].startswith("The text ends with: \u00ab") for x in first)
    # the quoted final tokens are the context's last tokens
    got = s.read(None, np.array([first[0]["row"]]))
    assert first[0]["position"] == int(got["position"][0])
    with open(os.path.join(small_store, "summaries.jsonl"), "a") as f:
        f.write('{"row": 99, "te')  # a crash mid-line
    r = _run(small_store)
    assert r.returncode == 0, r.stderr
    recs = _records(small_store)
    assert sorted(x["row"] for x in recs) == want and recs[:2] == first
    assert _run(small_store).returncode == 0 and _records(small_store) == recs  # nothing left to do


def test_import_validates(small_store, tmp_path):
    s = store_lib.open_store(small_store)
    rl = int(s.rows_of_split("rl")[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"row": rl, "text": "x"}) + "\n")
    r = _run(small_store, "--import", str(bad))
    assert r.returncode == 2 and f"row {rl} is not in the store's summarised splits" in r.stderr
    bad.write_text(json.dumps({"row": 0}) + "\n")
    r = _run(small_store, "--import", str(bad))
    assert r.returncode == 2 and "bad.jsonl:1" in r.stderr and "Traceback" not in r.stderr


def test_sharded_teacher_writes_what_one_device_does(small_store, tmp_path):
    """The teacher runs on the config's mesh: 2 devices on the data axis (each feeding its half of
    every batch) write the texts one device writes, in the same order."""
    import shutil
    copies = {}
    for name, devices in (("one", 1), ("two", 2)):
        d = str(tmp_path / name)
        shutil.copytree(small_store, d)
        if os.path.exists(os.path.join(d, "summaries.jsonl")):
            os.remove(os.path.join(d, "summaries.jsonl"))
        env_flags = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
        r = _run(d, f"--config.mesh.shape=({devices},1,1)", env=env_flags)
        assert r.returncode == 0, r.stderr[-3000:]
        copies[name] = _records(d)
    assert len(copies["one"]) == 4 and copies["two"] == copies["one"]


def test_predict_teacher_writes_the_targets_own_predictions(small_store, real, tmp_path):
    """teacher="predict": the text names the current token and the target's top next tokens, whose
    ids equal the full forward pass's argsort at the position (computed here directly)."""
    import shutil

    from nla_jax.models import transformer
    store = str(tmp_path / "store")
    shutil.copytree(small_store, store, ignore=shutil.ignore_patterns("summaries.jsonl"))
    r = _run(store, "--config.summarize.predict_k=3", "--config.summarize.predict_style=token",
             "--config.summarize.before_tokens=3", teacher="predict")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(store)
    s = store_lib.open_store(store)
    assert sorted(x["row"] for x in recs) == sorted(np.concatenate([s.rows_of_split("av_sft"),
                                                                    s.rows_of_split("ar_sft")]).tolist())
    for x in recs:
        got = s.read(None, np.array([x["row"]]))
        p = int(got["position"][0])
        ctx = got["tokens"][0][:p + 1]
        lg = np.asarray(transformer.forward(real.params, ctx[None].astype(np.int32), real.cfg)["logits"][0, -1])
        want = np.argsort(-lg)[:3]
        assert x["top_ids"] == want.tolist() and x["top_probs"] == sorted(x["top_probs"], reverse=True)
        cur = real.tok.decode([int(ctx[-1])]).strip()
        assert x["text"].startswith(f"Token \u00ab{cur}\u00bb") and "Next: \u00ab" in x["text"]
        assert x["text"].index("Next:") > x["text"].index(cur)


def test_the_configs_default_warm_start_names_the_token_then_predicts(small_store, real, tmp_path):
    """smollm2's default: teacher="predict", style "token", no tokens before the current one, eval rows
    summarised too: "Token «x». Next: «…» p%, …" with the target's 3 predictions; the one quoted span
    before "Next" is the current token, in the context."""
    import shutil

    from nla_jax.nla import claims, selftext
    store = str(tmp_path / "store")
    shutil.copytree(small_store, store, ignore=shutil.ignore_patterns("summaries.jsonl"))
    r = _run(store, teacher=None, splits=None)     # the config's own warm start (max_new_tokens: sampling only)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _records(store)
    s = store_lib.open_store(store)
    assert sorted(x["row"] for x in recs) == sorted(np.concatenate(
        [s.rows_of_split(k) for k in ("av_sft", "ar_sft", "eval")]).tolist())
    for x in recs:
        got = s.read(None, np.array([x["row"]]))
        p = int(got["position"][0])
        ctx = got["tokens"][0][:p + 1]
        cur = real.tok.decode([int(ctx[-1])])
        head = f"Token \u00ab{selftext.show(cur)}\u00bb"
        assert x["text"].startswith(head + ". Next: \u00ab"), (x["text"], head)
        assert claims.preceding_claim(x["text"], claims.preceding_texts(real.tok, ctx, p)) is None
        assert len(x["top_ids"]) == 3
        if cur.strip():     # a whitespace token is written escaped ("\\n"), so it is not a quote of the context
            assert claims.names_current_token(x["text"], cur) == "exact"
            spans, exact, near = claims.quote_claims(x["text"], real.tok.decode(ctx.tolist()))
            assert spans == exact == 1


def test_an_unknown_predict_style_is_one_line_and_writes_nothing(small_store, tmp_path):
    import shutil
    store = str(tmp_path / "store")
    shutil.copytree(small_store, store, ignore=shutil.ignore_patterns("summaries.jsonl"))
    r = _run(store, "--config.summarize.predict_style=prose", teacher="predict")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "config key summarize.predict_style='prose': expected one of 'token', 'quote', 'next_first'" in r.stderr
    assert "Traceback" not in r.stderr and not os.path.exists(os.path.join(store, "summaries.jsonl"))
