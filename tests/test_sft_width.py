"""SFT batches padded to their longest warm-start text (train.text_bucket), not to the explanation cap.

The padding after a row's last real token cannot change anything before it (causal attention; the
AV's loss is masked to real tokens; the AR reads at the end of its suffix, which follows the text
wherever it ends), so a narrower batch must take the same step: the same loss and the same updated
parameters up to float summation order. The width must also be decided alike by every process
(from the global batch's rows), or the global arrays would not assemble.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nla_jax import configlib
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import av as av_lib
from nla_jax.nla import batches as batches_lib
from nla_jax.nla import run as run_lib
from nla_jax.nla import state as state_lib
from test_mixed_precision import _stats
from test_train import _communicate_all, _free_port, _popen, _records, _train, store  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
TEXTS = ["ab", "«a» 4%", "x", "mid"]      # the tiny config's tokenizer is bytes: 1-8 tokens, cap 24


def _run(*extra) -> run_lib.Run:
    cfg = configlib.get(TINY, ["mesh.shape=(1,1,1)", "sft_av.optim.warmup=0", "sft_ar.optim.warmup=0", *extra])
    return run_lib.build(cfg, store=False, stats=_stats(64))


def _step(run, layout, batch, width):
    state = state_lib.fresh(run, layout)
    state, m = state_lib.sft_step(run, layout, width=width)(state, batch, run.mean)
    return float(m["loss"]), jax.tree.map(np.asarray, state[layout.name[-2:]])


def _close_trees(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_a_narrow_batch_takes_the_cap_width_step():
    run = _run()
    tok, acts = run.tokenizer, jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)) * 10, jnp.float32)
    # AV: targets at the cap vs as wide as the longest row (text, closer, EOS)
    spec = run.ctx.av
    full_t, full_m = av_lib.sft_targets(tok, TEXTS, spec)
    w = int(full_m.sum(1).max())
    assert w < spec.max_len, "the test's texts must leave padding to trim"
    narrow_t, narrow_m = av_lib.sft_targets(tok, TEXTS, spec, w)
    np.testing.assert_array_equal(narrow_t, full_t[:, :w])
    with pytest.raises(ValueError, match="wider than its batch"):
        av_lib.sft_targets(tok, TEXTS, spec, w - 1)
    layout = state_lib.sft_av(run)
    la, pa = _step(run, layout, {"acts": acts, "targets": full_t, "mask": full_m}, None)
    lb, pb = _step(run, layout, {"acts": acts, "targets": narrow_t, "mask": narrow_m}, w)
    assert lb == pytest.approx(la, rel=1e-6)
    _close_trees(pa, pb)
    # AR: the wrapper built for the longest text instead of the cap
    ar_spec = run.ctx.ar
    full_e, full_l = ar_lib.host_explanations(tok, TEXTS, ar_spec)
    w = int(full_l.max())
    narrow_e, narrow_l = ar_lib.host_explanations(tok, TEXTS, dataclasses.replace(ar_spec, max_len=w))
    np.testing.assert_array_equal(narrow_l, full_l)
    layout = state_lib.sft_ar(run)
    la, pa = _step(run, layout, {"acts": acts, "expl": full_e, "expl_len": full_l}, None)
    lb, pb = _step(run, layout, {"acts": acts, "expl": narrow_e, "expl_len": narrow_l}, w)
    assert lb == pytest.approx(la, rel=1e-6)
    _close_trees(pa, pb)


def test_text_widths_round_up_to_the_bucket_and_stop_at_the_cap():
    run = _run("train.text_bucket=4")
    run = dataclasses.replace(run, summaries={10 + i: t for i, t in enumerate(TEXTS)} | {20: "word " * 200})
    tok, rows = run.tokenizer, np.arange(10, 14)
    lens = [len(tok.encode(t)) for t in TEXTS]
    av_w = batches_lib.text_widths(run, "sft_av", np.array([*rows, 20]))
    extra = len(run.ctx.av.closer) + 1
    for r, n in zip(rows, lens):
        assert av_w(np.array([r])) == min(-(-(n + extra) // 4) * 4, run.ctx.av.max_len)
    assert av_w(rows) == max(av_w(np.array([r])) for r in rows)         # the batch's longest row decides
    assert av_w(np.array([10, 20])) == run.ctx.av.max_len               # a text past the cap: cut, at the cap
    ar_w = batches_lib.text_widths(run, "sft_ar", np.array([*rows, 20]))
    assert ar_w(np.array([11])) == -(-lens[1] // 4) * 4 and ar_w(np.array([20])) == run.ctx.ar.max_len
    # and the batch builders fit every row of the batch in that width
    b = batches_lib.av_batch(run, {"acts": np.zeros((4, 64), np.float32), "row": rows}, av_w(rows))
    assert b["targets"].shape == (4, av_w(rows)) and b["mask"][:, -1].any() == (av_w(rows) == max(
        n + extra for n in lens))
    assert batches_lib.text_widths(_run("train.text_bucket=0"), "sft_av", rows) is None


SFT = ("--stages", "sft_av,sft_ar", "--config.sft_av.steps=3", "--config.sft_ar.steps=3",
       "--config.train.ckpt_every=100", "--config.ar.head_init=identity", "--config.mesh.shape=(4,1,1)",
       "--config.av.max_len=64")   # the store's quote texts are ~35 bytes: room to trim under a cap of 64


@pytest.mark.timeout(900)
def test_trainer_bucketed_equals_cap_padded_and_processes_agree(store, tmp_path):
    """The trainer's SFT stages with text_bucket=4 (two processes x two devices, each reading half of
    every batch) log the losses of one process padding every batch to the cap."""
    cap, bucketed = str(tmp_path / "cap"), str(tmp_path / "bucketed")
    r = _train(store, cap, *SFT, "--config.train.text_bucket=0", devices=4, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    port = _free_port()
    procs = [_popen(store, bucketed, *SFT, "--config.train.text_bucket=4", "--coordinator", f"127.0.0.1:{port}",
                    "--num-processes", "2", "--process-id", str(i), devices=2) for i in range(2)]
    outs = _communicate_all(procs, timeout=600)
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    widths = []
    for stage, cap_len in (("sft_av", 64), ("sft_ar", 64)):
        a, b = _records(cap, stage), _records(bucketed, stage)
        train_steps = [s for s in a if "loss" in a[s]]
        assert train_steps == [1, 2, 3] and all("text_width" not in a[s] for s in train_steps)
        for s in train_steps:
            np.testing.assert_allclose(b[s]["loss"], a[s]["loss"], rtol=1e-5, err_msg=f"{stage} {s}")
            np.testing.assert_allclose(b[s]["grad_norm"], a[s]["grad_norm"], rtol=1e-4, err_msg=f"{stage} {s}")
            assert b[s]["text_width"] % 4 == 0 or b[s]["text_width"] == cap_len
            widths.append(b[s]["text_width"])
    assert min(widths) < 64, f"no batch narrower than the cap: {widths}"
