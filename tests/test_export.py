"""python -m nla_jax.export: a trained pair as Hugging Face directories, and back.

Covers: the export of a tiny trained pair (learned input projection, centring, after RL) loads
back into nla_jax bit for bit (AV through the ordinary safetensors loader, AR blocks, head, extras,
prompt/wrapper specs, statistics, tokenizer); a non-empty OUTDIR is refused unless --force and a
failing export leaves nothing behind; Qwen2 (biases, untied head) and sharded weights round-trip;
and, when the PyTorch peers venv exists (NLA_PEERS_PYTHON; CI has it), transformers reads the
export: AV logits, the AV with an activation injected by the recipe in nla_av.json, the AR's
prediction from hidden_states[K+1] of the K+1-block model with the head applied in numpy, and the
tokenizer (plain text with BOS, chat template) all match nla_jax.

Tolerance against transformers (float32): max |diff| <= 1e-4 x max(1, max |value|); float32
reductions in a different order differ by ~1e-6 relative here (measured), the bound leaves room for
another BLAS and still catches any layout mistake (which moves values by O(1)).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _tiny_run import NLA_FLAGS, NLA_STAGES, trained_workdir
from nla_jax import export, weights
from nla_jax.data.corpus import Document
from nla_jax.errors import UserError
from nla_jax.models import transformer as T
from nla_jax.nla import ar as ar_lib, av as av_lib
from test_train import _env, _one_error_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(REPO, "tests", "_hf_export_peer.py")


def peers_python() -> str | None:
    py = os.environ.get("NLA_PEERS_PYTHON")
    if py:
        return py
    default = os.path.expanduser("~/.cache/nla-peers-venv/bin/python")
    return default if os.path.isfile(default) else None


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nla_jax.export", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_bitwise(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert sorted(la) == sorted(lb)
    for k in la:
        assert la[k].dtype == lb[k].dtype and la[k].shape == lb[k].shape, k
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def _close(ours, theirs, what):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    bound = 1e-4 * max(1.0, float(np.abs(ours).max()))
    err = float(np.abs(ours - theirs).max())
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g}"
    return err


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory, *NLA_FLAGS, stages=NLA_STAGES)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "hf")
    r = _cli("--checkpoint", workdir, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.fixture(scope="module")
def pair(workdir):
    from nla_jax.nla import workdir as workdir_lib
    return workdir_lib.load_pair(workdir)


# ----------------------------------------------------------------------------- round trip

def test_export_writes_both_directories(exported):
    out, r = exported
    assert "exported" in r.stdout and "rl@1" in r.stdout, r.stdout
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "nla_av.json",
              "nla_av_extra.safetensors", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, "av", f)), f
    for f in ("config.json", "model.safetensors", "tokenizer.json", "nla_ar.json", "ar_head.safetensors"):
        assert os.path.isfile(os.path.join(out, "ar", f)), f
    assert os.path.isfile(os.path.join(out, "nla_export.json")) and os.path.isfile(os.path.join(out, "README.md"))
    c = json.load(open(os.path.join(out, "ar", "config.json")))
    assert c["num_hidden_layers"] == 1 and c["architectures"] == ["LlamaModel"] and c["tie_last_hidden_states"] is False
    av = json.load(open(os.path.join(out, "av", "config.json")))
    assert av["num_hidden_layers"] == 2 and av["architectures"] == ["LlamaForCausalLM"] and av["tie_word_embeddings"]
    # nothing left beside the export, and ordinary file modes (not mkdtemp's 0700)
    assert sorted(os.listdir(os.path.dirname(out))) == ["hf"]
    assert os.stat(out).st_mode & 0o055 == 0o055 - (0o055 & _umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_roundtrip_is_bitwise(exported, pair):
    out, _ = exported
    av, ar, specs = export.load(out)
    assert "proj" in pair.av["extra"]                      # the learned projection is part of the export
    assert_bitwise(av, pair.av)
    assert_bitwise(ar, pair.ar)
    run = pair.run
    assert specs["av"] == run.ctx.av and specs["ar"] == run.ctx.ar and specs["center"] == run.ctx.center is True
    assert specs["stats"] == run.stats
    np.testing.assert_array_equal(specs["mean"], np.asarray(run.mean))
    # the AV's transformer through nla_jax's ordinary Hugging Face loader, config included
    mcfg, model, tok = weights.load(os.path.join(out, "av"))
    assert_bitwise(model, pair.av["model"])
    skip = {"name"}
    assert {k: v for k, v in vars(mcfg).items() if k not in skip} == \
        {k: v for k, v in vars(run.model_cfg).items() if k not in skip}
    text = 'plain <text> & "quotes"\nwith é and 8'
    assert tok.bos(tok.encode(text)) == run.tokenizer.bos(run.tokenizer.encode(text))
    assert tok.encode_chat("hello") == run.tokenizer.encode_chat("hello")
    assert tok.special_ids == run.tokenizer.special_ids and tok.eos_ids == run.tokenizer.eos_ids and tok.pad_id == run.tokenizer.pad_id


def test_exported_pair_computes_what_the_checkpoint_does(exported, pair):
    """The loaded export, driven by its own specs, gives the checkpoint's AR predictions and AV log-probs."""
    out, _ = exported
    av, ar, specs = export.load(out)
    run = pair.run
    rng = np.random.default_rng(0)
    expl = rng.integers(16, 272, size=(3, specs["ar"].max_len)).astype(np.int32)
    lens = np.array([1, 5, specs["ar"].max_len], np.int32)
    ours = ar_lib.predict(ar, specs["mcfg"], specs["ar"], expl, lens)
    ref = ar_lib.predict(pair.ar, run.model_cfg, run.ctx.ar, expl, lens)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    acts = rng.normal(size=(2, run.model_cfg.d_model)).astype(np.float32) * 10
    tgt = rng.integers(16, 272, size=(2, 6)).astype(np.int32)
    lp = av_lib.logprobs(av["model"], av["extra"], specs["mcfg"], specs["av"], acts, tgt, specs["mean"])
    lp_ref = av_lib.logprobs(pair.av["model"], pair.av["extra"], run.model_cfg, run.ctx.av, acts, tgt, run.mean)
    np.testing.assert_array_equal(np.asarray(lp), np.asarray(lp_ref))


# ----------------------------------------------------------------------------- refusals and atomicity

def test_refuses_non_empty_out_unless_force(exported, workdir):
    out, _ = exported
    before = {f: os.path.getmtime(os.path.join(out, "av", f)) for f in os.listdir(os.path.join(out, "av"))}
    line = _one_error_line(_cli("--checkpoint", workdir, "--out", out))
    assert out in line and "--force" in line
    assert before == {f: os.path.getmtime(os.path.join(out, "av", f)) for f in os.listdir(os.path.join(out, "av"))}
    marker = os.path.join(out, "stale.txt")
    open(marker, "w").write("x")
    r = _cli("--checkpoint", f"{workdir}/sft_av", "--out", out, "--force")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(marker)                              # replaced whole, not merged
    assert json.load(open(os.path.join(out, "nla_export.json")))["kind"] == "sft"
    assert sorted(os.listdir(os.path.dirname(out))) == ["hf"]       # no temporary or old directory left
    # put the RL export back for the tests that follow
    r = _cli("--checkpoint", workdir, "--out", out, "--force")
    assert r.returncode == 0, r.stderr[-3000:]


def test_bad_checkpoint_and_out_are_one_line_errors(tmp_path, workdir):
    line = _one_error_line(_cli("--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")))
    assert str(tmp_path / "nope") in line
    f = tmp_path / "file"
    f.write_text("x")
    line = _one_error_line(_cli("--checkpoint", workdir, "--out", str(f)))
    assert str(f) in line and "not a directory" in line
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def boom(pair, d):
        os.makedirs(os.path.join(d, "av"))
        open(os.path.join(d, "av", "model.safetensors"), "w").write("half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_export", boom)
    with pytest.raises(OSError):
        export.export_pair(object(), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []
    # and an existing export replaced with --force survives a failure untouched
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(OSError):
        export.export_pair(object(), str(tmp_path / "out"), force=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "keep.txt").read_text() == "old"


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_qwen2_model_dir_roundtrip(tiny_qwen2, tmp_path, monkeypatch, shard_bytes):
    """Untied head and q/k/v biases (Qwen2), single file and sharded with an index."""
    cfg, params, tok = tiny_qwen2
    if shard_bytes:
        monkeypatch.setattr(export, "SHARD_BYTES", shard_bytes)
    d = str(tmp_path / "m")
    export.write_model_dir(d, cfg, params, tok)
    assert os.path.isfile(os.path.join(d, "model.safetensors.index.json")) == bool(shard_bytes)
    mcfg, back, tok2 = weights.load(d)
    assert_bitwise(back, params)
    assert mcfg.family == "qwen2" and mcfg.qkv_bias and not mcfg.tie_embeddings
    assert tok2.encode("abc <d>") == tok.encode("abc <d>")


def test_bfloat16_model_dir_roundtrip(tiny_llama, tmp_path):
    """Accelerator runs train in bfloat16: written as BF16 tensors and read back unchanged."""
    cfg, params, tok = tiny_llama
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    d = str(tmp_path / "m")
    export.write_model_dir(d, cfg, p16, tok)
    assert json.load(open(os.path.join(d, "config.json")))["torch_dtype"] == "bfloat16"
    _, back, _ = weights.load(d, jnp.bfloat16)
    assert_bitwise(back, p16)


def test_llama_with_qkv_bias_is_refused(tiny_llama):
    with pytest.raises(UserError, match="q/k/v biases"):
        export.hf_config(tiny_llama.cfg.replace(qkv_bias=True))


# ----------------------------------------------------------------------------- into transformers

def run_peer(request: dict, tmp_path) -> tuple[dict, dict]:
    py = peers_python()
    req = tmp_path / "request.json"
    req.write_text(json.dumps(request))
    out = tmp_path / "peer.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run([py, PEER, str(req), str(out)], capture_output=True, text=True, timeout=540, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    with np.load(out) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((tmp_path / "peer.npz.json").read_text())


def compare_with_transformers(outdir: str, tmp_path, texts, expl_texts, n_inject: int = 2, seed: int = 0) -> dict:
    """Load `outdir` with transformers (peers venv) and nla_jax; compare AV logits, injected AV logits,
    AR predictions and tokenizers. Returns the largest differences (also used on the real model)."""
    av, ar, specs = export.load(outdir)
    mcfg, tok, avs, ars = specs["mcfg"], specs["tok"], specs["av"], specs["ar"]
    token_ids = [Document(doc_id="x", text=t).render(tok) for t in texts]
    rng = np.random.default_rng(seed)
    scale = float(specs["stats"].mean_norm)
    acts = (rng.normal(size=(n_inject, mcfg.d_model)) * scale / np.sqrt(mcfg.d_model)).astype(np.float32)
    expl_ids, lens = ar_lib.host_explanations(tok, expl_texts, ars)
    got, meta = run_peer({"av_dir": os.path.join(outdir, "av"), "ar_dir": os.path.join(outdir, "ar"),
                          "token_ids": token_ids, "inject_acts": acts.tolist(),
                          "expl_ids": [row[:n].tolist() for row, n in zip(expl_ids, lens)],
                          "texts": list(texts), "chat": ["What is an activation?"]}, tmp_path)
    errs = {}
    fwd = jax.jit(T.forward, static_argnames=("cfg", "add_after"))
    for i, ids in enumerate(token_ids):
        ours = fwd(av["model"], jnp.asarray([ids]), cfg=mcfg)["logits"][0]
        errs[f"logits_{i}"] = _close(ours, got[f"logits_{i}"], f"AV logits, text {i}")
    P = len(avs.prompt)
    prompt = jnp.asarray([avs.prompt] * n_inject, jnp.int32)
    ov = av_lib.override(avs, jnp.asarray(acts), av["extra"], jnp.asarray(specs["mean"]))
    inj = fwd(av["model"], prompt, cfg=mcfg, override=ov, add_after=av_lib.add_after(avs))["logits"]
    for i in range(n_inject):
        errs[f"inject_{i}"] = _close(inj[i], got[f"inject_logits_{i}"], f"AV logits with activation {i} injected")
        assert got[f"inject_logits_{i}"].shape[0] == P
    pred = np.asarray(ar_lib.predict(ar, mcfg, ars, expl_ids, lens))
    errs["ar_pred"] = _close(pred, got["ar_pred"], "AR prediction (tie_last_hidden_states=false)")
    errs["ar_pred_identity"] = _close(pred, got["ar_pred_identity"], "AR prediction (model.norm = Identity)")
    raw = dataclasses.replace(ars, head_norm="none")            # block K's output itself
    feats = np.asarray(ar_lib.features(ar, mcfg, raw, *ar_lib.assemble(raw, expl_ids, lens)))
    normed = np.abs(got["ar_last_normed"] - feats).max() / np.abs(feats).max()
    assert normed > 1e-2, normed    # with the final norm applied transformers would hand the AR something else
    assert meta["text_ids"] == token_ids, "transformers' tokenizer (BOS included) differs from extraction's"
    # apply_chat_template never adds the BOS itself (only a template that writes {{ bos_token }} does);
    # nla_jax's encode_chat adds it by the model's policy when the rendering lacks it.
    chat = tok.encode(tok.render_chat([{"role": "user", "content": "What is an activation?"}]))
    assert meta["chat_ids"] == [chat] and tok.encode_chat("What is an activation?") == tok.bos(chat)
    return errs


@pytest.mark.timeout(900)
def test_transformers_reads_the_export(exported, tmp_path):
    if peers_python() is None:
        pytest.skip("no PyTorch peers venv (set NLA_PEERS_PYTHON, or run ../shared/peers/setup.sh)")
    out, _ = exported
    texts = ["the cat ran under the green window", 'quotes "and" <tags> & 8 é']
    compare_with_transformers(out, tmp_path, texts, ["a small city", "", "ancient music " * 10])


@pytest.mark.timeout(600)
def test_transformers_reads_qwen2_dir(tiny_qwen2, tmp_path):
    if peers_python() is None:
        pytest.skip("no PyTorch peers venv (set NLA_PEERS_PYTHON, or run ../shared/peers/setup.sh)")
    cfg, params, tok = tiny_qwen2
    d = str(tmp_path / "m")
    export.write_model_dir(d, cfg, params, tok)
    ids = [tok.bos(tok.encode("the old river said <hi>"))]
    got, meta = run_peer({"av_dir": d, "token_ids": ids, "texts": ["the old river said <hi>"]}, tmp_path)
    ours = T.forward(params, jnp.asarray(ids), cfg)["logits"][0]
    _close(ours, got["logits_0"], "Qwen2 logits")
    assert meta["text_ids"] == ids


def test_model_dir_fetches_one_shard_at_a_time(tiny_qwen2, tmp_path, monkeypatch):
    """A 70B verbalizer is ~280 GB in float32: export fetches each block's tensors to host memory
    only when the shard holding them is written, never the whole model at once."""
    cfg, params, tok = tiny_qwen2
    monkeypatch.setattr(export, "SHARD_BYTES", 20_000)
    events = []
    sources = export.hf_tensor_sources(cfg, params)
    logged = {k: export.Lazy(t.nbytes, lambda k=k, t=t: (events.append(("load", k)), t.load())[1])
              for k, t in sources.items()}
    real_save = export.save_file
    monkeypatch.setattr(export, "save_file", lambda tensors, path, metadata=None: (
        events.append(("save", tuple(tensors))), real_save(tensors, path, metadata=metadata)))
    d = tmp_path / "m"
    d.mkdir()
    export.write_safetensors(str(d), logged)
    saves = [names for kind, names in events if kind == "save"]
    assert len(saves) > 2
    loaded = []
    for kind, what in events:          # every save is preceded by the loads of exactly its tensors
        if kind == "load":
            loaded.append(what)
        else:
            assert tuple(loaded) == what, (loaded, what)
            loaded = []
    assert {k: t.nbytes for k, t in sources.items()} == {k: v.nbytes for k, v in export.hf_tensors(cfg, params).items()}
