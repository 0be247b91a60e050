"""The official release's format: import a tiny official pair written here, explain with it, export it
back (--format official), bitwise; each refusal is one line before any weight is read."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file
from tokenizers import AddedToken

from nla_jax import configlib, export, import_official, official
from nla_jax import weights
from nla_jax.errors import UserError
from nla_jax.nla import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAR = "\u320e"   # the release's Qwen marker character
AV_T = "<concept>{injection_char}</concept> What does this concept mean?"
AR_T = "Summary of the following text: <text>{explanation}</text> <summary>"
K = 0


def write_official_pair(root, family="qwen3", dtype="float32"):
    """A tiny official-format pair following OFFICIAL_FORMAT.md's reader rules: HF causal LMs, the
    marker character one added token, sidecars with its id and neighbours, value_head [out, in].
    dtype="bfloat16": stored as the released pairs are (torch_dtype bfloat16)."""
    cfg = configlib.get(os.path.join(REPO, "configs", "tiny.py") + ":" + family)
    mcfg, params, tok = weights.load_from_config(cfg.model)
    params = jax.tree.map(lambda a: a.astype(weights.DTYPES[dtype]), params)
    tok.tok.add_tokens([AddedToken(CHAR, normalized=False, special=False)])
    mid = tok.encode(CHAR)
    assert len(mid) == 1
    ids = tok.encode_chat([{"role": "user", "content": AV_T.format(injection_char=CHAR)}])
    p = ids.index(mid[0])
    av_dir, ar_dir = os.path.join(root, "av"), os.path.join(root, "ar")
    export.write_model_dir(av_dir, mcfg, params, tok)
    ar_params = {"embed": params["embed"], "layers": jax.tree.map(lambda a: a[:K + 1], params["layers"])}
    export.write_model_dir(ar_dir, mcfg.replace(tie_embeddings=True), ar_params, tok, layers=K + 1)
    if mcfg.layer_types:  # a truncated config that kept the full model's layer list (read: its first K+1)
        with open(os.path.join(ar_dir, "config.json")) as f:
            c = json.load(f)
        c["layer_types"] = ["sliding_attention" if t == "sliding" else "full_attention" for t in mcfg.layer_types]
        with open(os.path.join(ar_dir, "config.json"), "w") as f:
            json.dump(c, f)
    w = np.random.default_rng(0).standard_normal((mcfg.d_model, mcfg.d_model)).astype(np.dtype(weights.DTYPES[dtype]))
    save_file({"weight": w}, os.path.join(ar_dir, "value_head.safetensors"))
    tokens = {"injection_char": CHAR, "injection_token_id": mid[0], "injection_left_neighbor_id": ids[p - 1],
              "injection_right_neighbor_id": ids[p + 1]}
    common = {"kind": "nla_model", "schema_version": 2, "stage": "rl", "base_checkpoint": "tiny", "d_model": mcfg.d_model,
              "tokens": tokens, "prompt_templates": {"actor": AV_T, "critic": AR_T},
              "critic": {"extraction_layer_index": K}, "trained_on": "test", "parent_checkpoints": [], "training": {"lr": 1}}
    for d, role, ext in ((av_dir, "av", {"injection_scale": 150.0}), (ar_dir, "ar", {"injection_scale": None})):
        with open(os.path.join(d, "nla_meta.yaml"), "w") as f:
            yaml.safe_dump(dict(common, role=role, extraction=ext), f, allow_unicode=True)
    return av_dir, ar_dir


def base_cfg():
    return configlib.get(os.path.join(REPO, "configs", "official.py"),
                         ["av.max_len=16", "eval.batch=2"])


@pytest.fixture(scope="module", params=["qwen3", "gemma3", "qwen3-bfloat16"])
def imported(tmp_path_factory, request):
    """An imported tiny pair of each family; "qwen3-bfloat16" is stored in bf16 like the released pairs."""
    root = tmp_path_factory.mktemp("official")
    family, _, dtype = request.param.partition("-")
    av_dir, ar_dir = write_official_pair(str(root), family, dtype or "float32")
    out = import_official.import_pair(av_dir, ar_dir, str(root / "work"), base_cfg())
    return av_dir, ar_dir, out


def test_import_loads_as_a_pair(imported):
    av_dir, ar_dir, out = imported
    pair = workdir_lib.load_pair(out, with_target=False, dtype="weight")
    assert pair.kind == "sft" and pair.cfg.model.layer == K
    # the saved config (configs/official.py:WORKDIR, what `train --stages rl` runs with) is the one the
    # stage checkpoints were fingerprinted under
    workdir_lib.check_existing(configlib.get(os.path.join(REPO, "configs", "official.py") + ":" + out), ("sft_av", "sft_ar"))
    spec = pair.run.ctx.av
    assert spec.inject_norm == 150.0 and spec.prompt[spec.marker_pos] == pair.run.tokenizer.encode(CHAR)[0]
    head = load_file(os.path.join(ar_dir, "value_head.safetensors"))["weight"]
    np.testing.assert_array_equal(np.asarray(pair.ar["head"]["w"]), head.T)
    assert set(pair.ar["head"]) == {"w"}
    ar_spec = pair.run.ctx.ar
    tok = pair.run.tokenizer
    assert tok.decode(list(ar_spec.prefix) + list(ar_spec.suffix), skip_special=False).startswith("<s>Summary of")


def test_explain_on_imported_pair(imported, tmp_path):
    from nla_jax import explain
    _, _, out = imported
    js = tmp_path / "e.json"
    assert explain.main(["--checkpoint", out, "--text", "hello there world", "--positions", "3", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    (sample,) = res["explained"]["3"]["samples"]      # one greedy explanation of token 3, read back by the AR
    assert isinstance(sample["text"], str) and -1.0 <= sample["cos"] <= 1.0 and sample["mse_nrm"] >= 0


def test_export_official_round_trip_is_bitwise(imported, tmp_path):
    av_dir, ar_dir, out = imported
    pair = workdir_lib.load_pair(out, with_target=False, dtype="weight")
    dest = export.export_pair(pair, str(tmp_path / "exp"), fmt="official")
    for sub, src in (("av", av_dir), ("ar", ar_dir)):
        a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(dest, sub, "model.safetensors"))
        skip = {"model.norm.weight"} if sub == "ar" else set()   # the AR's final norm is not part of the AR
        assert set(a) - skip == set(b) - skip
        for k in set(a) - skip:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (sub, k)
        m0 = yaml.safe_load(open(os.path.join(src, "nla_meta.yaml")))
        m1 = yaml.safe_load(open(os.path.join(dest, sub, "nla_meta.yaml")))
        for k in m0:
            if k != "prompt_templates":
                assert m1[k] == m0[k], (sub, k)
        assert m1["prompt_templates"]["av"] == m0["prompt_templates"]["actor"]
        assert m1["prompt_templates"]["ar"] == m0["prompt_templates"]["critic"]
    h0 = load_file(os.path.join(ar_dir, "value_head.safetensors"))["weight"]
    h1 = load_file(os.path.join(dest, "ar", "value_head.safetensors"))["weight"]
    assert h0.tobytes() == h1.tobytes()
    # and the export imports again (the official reader's rules hold for what we write)
    official.check_pair(os.path.join(dest, "av"), os.path.join(dest, "ar"))


def _refusal(tmp_path, edit, match):
    av_dir, ar_dir = write_official_pair(str(tmp_path))
    edit(av_dir, ar_dir)
    with pytest.raises(UserError, match=match) as e:
        import_official.import_pair(av_dir, ar_dir, str(tmp_path / "work"), base_cfg())
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "work")


def _meta_edit(which, f):
    def edit(av_dir, ar_dir):
        p = os.path.join(av_dir if which == "av" else ar_dir, "nla_meta.yaml")
        m = yaml.safe_load(open(p))
        f(m)
        yaml.safe_dump(m, open(p, "w"), allow_unicode=True)
    return edit


def test_refusals(tmp_path):
    _refusal(tmp_path / "a", lambda av, ar: os.remove(os.path.join(av, "nla_meta.yaml")), "nla_meta.yaml: missing")
    _refusal(tmp_path / "b", _meta_edit("av", lambda m: m["tokens"].update(injection_left_neighbor_id=5)),
             "expected exactly one")
    _refusal(tmp_path / "c", _meta_edit("av", lambda m: m["tokens"].update(injection_char="\u321c")),
             "tokenises to")
    _refusal(tmp_path / "d", _meta_edit("ar", lambda m: m["critic"].update(extraction_layer_index=1)),
             "needs an AR of 2 blocks")
    _refusal(tmp_path / "e", _meta_edit("ar", lambda m: m.update(role="av")), "expected 'ar'")
    _refusal(tmp_path / "f", lambda av, ar: os.remove(os.path.join(ar, "value_head.safetensors")),
             "value_head.safetensors: missing")


@pytest.mark.slow   # ~1.5-3 min (extract + import + one RL step); the import / explain / export tests above stay in CI
@pytest.mark.timeout(900)
def test_rl_continues_from_an_imported_pair(tmp_path):
    """Extract activations of the released target (the AV directory), import with that store (real
    statistics), then the trainer's RL stage starts from the imported pair with the saved config."""
    import subprocess
    import sys

    from test_train import _corpus, _env
    av_dir, ar_dir = write_official_pair(str(tmp_path / "rel"))
    _corpus(tmp_path / "c.jsonl", n=24)
    store, work = str(tmp_path / "store"), str(tmp_path / "work")
    off = os.path.join(REPO, "configs", "official.py")

    def run(*cmd):
        r = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
        return r

    run("nla_jax.extract", "--config", off, f"--config.model.source={av_dir}", f"--config.data.store={store}",
        f"--config.data.sources=[{{'kind':'jsonl','path':'{tmp_path / 'c.jsonl'}','name':'t'}}]",
        "--config.data.max_len=64", "--config.data.min_position=16", "--config.data.k=4")
    run("nla_jax.import_official", "--av", av_dir, "--ar", ar_dir, "--out", work, "--store", store,
        "--config.av.max_len=16")
    run("nla_jax.train", "--config", f"{off}:{work}", "--stages", "rl", "--config.rl.steps=1", "--config.rl.batch=2",
        "--config.rl.group_size=2", "--config.train.ckpt_every=1")
    pair = workdir_lib.load_pair(work, with_target=False, dtype="weight")
    assert pair.kind == "rl" and pair.step == 1 and pair.meta["stats"]["rows"] > 0
    assert str(pair.meta["ref_av"]).rstrip("/").endswith("sft_av")   # KL to the imported AV
    ev = str(tmp_path / "ev")
    run("nla_jax.evaluate", "--config", f"{off}:{work}", "--checkpoint", f"{work}/sft_av", "--checkpoint", f"{work}/rl",
        "--out", ev, "--config.eval.rows=8", "--config.eval.batch=4", "--config.eval.n_boot=50",
        "--config.eval.downstream=False", "--config.eval.split=rl")
    res = json.load(open(os.path.join(ev, "evaluate.json")))
    assert len(res["checkpoints"]) == 2, list(res)


def test_cli_help_and_one_line_errors(tmp_path):
    import subprocess
    import sys

    from test_train import _env
    r = subprocess.run([sys.executable, "-m", "nla_jax.import_official", "--help"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--av" in r.stdout and "nla_meta.yaml" in r.stdout
    (tmp_path / "av").mkdir()
    r = subprocess.run([sys.executable, "-m", "nla_jax.import_official", "--av", str(tmp_path / "av"), "--ar",
                        str(tmp_path / "ar"), "--out", str(tmp_path / "w")], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("error: ") and "nla_meta.yaml: missing" in r.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.slow   # trains a tiny Gemma-3 pair (~2 min); the official round trip above stays in CI
@pytest.mark.timeout(900)
def test_pair_trained_here_exports_official_and_imports_back(tmp_path_factory, tmp_path):
    """A Gemma-3 pair trained by nla_jax (SFT + one RL step, the release's tags and head convention)
    exports in the official format and imports back to the same parameters and the same AV prompt and
    AR wrapper ids; a pair with nla_jax's default head (rms norm) is refused in one line."""
    import jax

    from _tiny_run import trained_workdir
    flags = ("--config.ar.head_norm=none", "--config.ar.head_bias=False", "--config.ar.head_init=identity",
             "--config.av.answer_prefix=<explanation>", "--config.av.closer=</explanation>",
             "--config.av.marker=<|reserved_3|>")
    wd = trained_workdir(tmp_path_factory, *flags, config=os.path.join(REPO, "configs", "tiny.py") + ":gemma3",
                         stages="sft_av,sft_ar,rl")
    pair = workdir_lib.load_pair(wd, with_target=False, dtype="weight")
    assert pair.kind == "rl" and pair.run.model_cfg.family == "gemma3"
    out = export.export_pair(pair, str(tmp_path / "off"), fmt="official")
    cfg = configlib.get(os.path.join(REPO, "configs", "official.py"), ["av.max_len=24", "av.answer_prefix=<explanation>"])
    back = import_official.import_pair(os.path.join(out, "av"), os.path.join(out, "ar"), str(tmp_path / "w"), cfg)
    again = workdir_lib.load_pair(back, with_target=False, dtype="weight")
    assert again.run.ctx.av.prompt == pair.run.ctx.av.prompt and again.run.ctx.av.marker_pos == pair.run.ctx.av.marker_pos
    assert again.run.ctx.ar.prefix == pair.run.ctx.ar.prefix and again.run.ctx.ar.suffix == pair.run.ctx.ar.suffix
    same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jax.tree.map(same, pair.av["model"], again.av["model"])
    jax.tree.map(same, {k: pair.ar[k] for k in ("embed", "layers")}, {k: again.ar[k] for k in ("embed", "layers")})
    same(pair.ar["head"]["w"], again.ar["head"]["w"])
    # nla_jax's default AR head (rms-normalised input) and tags have no official equivalent: one line each
    import dataclasses
    ctx = pair.run.ctx
    pair.run.ctx = dataclasses.replace(ctx, ar=dataclasses.replace(ctx.ar, head_norm="rms"))
    with pytest.raises(UserError, match="ar.head_norm='rms'"):
        export.export_pair(pair, str(tmp_path / "x"), fmt="official")
    pair.run.ctx = ctx
    with pair.cfg.unlocked():
        pair.cfg.av.closer = "</e>"
    with pytest.raises(UserError, match="between <explanation> and </explanation>"):
        export.export_pair(pair, str(tmp_path / "x"), fmt="official")
    assert not os.path.exists(tmp_path / "x")


def test_joint_wrapper_tokenisation():
    """ar.tokenize="joint" tokenises prefix + text + suffix as one string (a merge across a boundary
    survives, as the release tokenises its AR prompt); "pieces" joins the three id lists."""
    from nla_jax.nla import ar as ar_lib

    class Tok:  # characters, with ">T" merged into one id (as Qwen's BPE does with ">The")
        def encode(self, s):
            out, i = [], 0
            while i < len(s):
                if s[i:i + 2] == ">T":
                    out.append(999)
                    i += 2
                else:
                    out.append(ord(s[i]))
                    i += 1
            return out

        def bos(self, ids):
            return [1] + ids

    tok = Tok()
    spec = ar_lib.ARSpec(prefix=tuple(tok.bos(tok.encode("<t>"))), suffix=tuple(tok.encode("</t>")), max_len=8,
                         pad_id=0, layer=0, head_norm="none", joint=True, prefix_text="<t>", suffix_text="</t>")
    toks, valid, read_at = ar_lib.host_wrapped(tok, ["  The cat "], spec)
    want = [1] + tok.encode("<t") + [999] + tok.encode("he cat</t>")
    assert toks[0, :len(want)].tolist() == want and valid[0].sum() == len(want) and read_at[0] == len(want) - 1
    pieces, _ = ar_lib.host_explanations(tok, ["The cat"], spec)
    assert 999 not in list(spec.prefix) + pieces[0].tolist() + list(spec.suffix)


def test_joint_and_pieces_agree_without_merges(imported):
    """On the byte tokenizer (no merges) the joint path computes exactly what the pieces path does."""
    import dataclasses

    from nla_jax.nla import measure
    _, _, out = imported
    pair = workdir_lib.load_pair(out, with_target=False)
    run = pair.run
    assert run.ctx.ar.joint
    tok = run.tokenizer
    ids, lens = measure.texts_to_expl(tok, ["hello there", "a b c"], run.ctx.ar)
    joint = measure.reconstruct(run, pair.ar, ids, lens, 2)
    run.ctx = dataclasses.replace(run.ctx, ar=dataclasses.replace(run.ctx.ar, joint=False))
    pieces = measure.reconstruct(run, pair.ar, ids, lens, 2)
    np.testing.assert_allclose(joint, pieces, rtol=1e-5, atol=1e-5)


def test_target_config_must_describe_the_released_model(tmp_path):
    av_dir, ar_dir = write_official_pair(str(tmp_path))
    cfg = configlib.get(os.path.join(REPO, "configs", "gemma3_12b.py") + ":imported")
    with pytest.raises(UserError, match="model.arch.family='gemma3' disagrees"):
        import_official.import_pair(av_dir, ar_dir, str(tmp_path / "work"), cfg)
    assert not os.path.exists(tmp_path / "work")
