"""The NLA pieces on the tiny model: prompt and marker, injection modes, extraction, the AR wrapper,
normalised loss / fve / floor, ridge, and a generic GRPO step raising a toy reward."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO
from nla_jax import configlib, optim, sampling
from nla_jax.errors import UserError
from nla_jax.models import transformer as T
from nla_jax.nla import ar as ar_lib
from nla_jax.nla import av as av_lib
from nla_jax.nla import stats as stats_lib

TINY = os.path.join(REPO, "configs", "tiny.py")


@pytest.fixture(scope="module")
def cfgs():
    return configlib.get(TINY)


def _av_spec(model, c, **kw):
    av = ml_collections.ConfigDict(c.av.to_dict())
    av.update(kw)
    return av_lib.build_spec(model.tok, model.cfg, av, mean_norm=10.0)


def test_prompt_holds_the_marker_once_and_ends_with_the_answer_prefix(tiny_llama, cfgs):
    spec = _av_spec(tiny_llama, cfgs)
    tok = tiny_llama.tok
    assert spec.prompt.count(spec.marker_id) == 1 and spec.prompt[spec.marker_pos] == spec.marker_id
    assert spec.marker_id in tok.special_ids and spec.marker_id not in (tok.bos_id, tok.pad_id, *tok.eos_ids)
    assert tok.decode(spec.prompt, skip_special=False).endswith(cfgs.av.answer_prefix)
    assert spec.prompt[0] == tok.bos_id and spec.prompt[1] != tok.bos_id  # one BOS
    assert spec.inject_norm == av_lib.auto_norm(10.0) == 11.0
    # the marker never comes out of ordinary text
    assert spec.marker_id not in tok.encode("<c> hello </c> reserved_11 <|reserved")


@pytest.mark.parametrize("kw,needle", [
    (dict(max_len=10_000), "exceeds the model's context"),
    (dict(user="no marker here"), "exactly once"),
    (dict(inject="sum"), "av.inject"),
    (dict(marker="<not a token>"), "av.marker"),
])
def test_bad_av_settings_are_named(tiny_llama, cfgs, kw, needle):
    with pytest.raises(UserError, match=needle):
        _av_spec(tiny_llama, cfgs, **kw)


def test_replace_injection_changes_exactly_the_marker_row(tiny_llama, cfgs):
    cfg, params, _ = tiny_llama
    spec = _av_spec(tiny_llama, cfgs)
    acts = jax.random.normal(jax.random.key(0), (2, cfg.d_model)) * 30
    ov = av_lib.override(spec, acts, {}, None)
    toks = jnp.broadcast_to(jnp.asarray(spec.prompt), (2, len(spec.prompt)))
    x = T.embed(params, toks, ov)
    base = T.embed(params, toks)
    changed = np.nonzero(np.any(np.asarray(x != base), axis=(0, 2)))[0]
    assert changed.tolist() == [spec.marker_pos]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x[:, spec.marker_pos]), axis=-1), spec.inject_norm, rtol=1e-5)


def test_add_injection_leaves_earlier_positions_alone_and_matches_the_sampler(tiny_llama, cfgs):
    cfg, params, _ = tiny_llama
    spec = _av_spec(tiny_llama, cfgs, inject="add", add_after=0)
    acts = jax.random.normal(jax.random.key(1), (2, cfg.d_model))
    toks = jnp.asarray(np.broadcast_to(np.asarray(spec.prompt), (2, len(spec.prompt))))
    ov = av_lib.override(spec, acts, {}, None)
    got = np.asarray(T.forward(params, toks, cfg, override=ov, add_after=0)["logits"])
    plain = np.asarray(T.forward(params, toks, cfg)["logits"])
    m = spec.marker_pos
    np.testing.assert_allclose(got[:, :m], plain[:, :m], rtol=1e-5, atol=1e-5)
    assert np.abs(got[:, m:] - plain[:, m:]).max() > 1e-3
    # the sampler's prefill applies the same injection: greedy first token = argmax of the last logits
    sc = sampling.SampleConfig(max_new_tokens=2, greedy=True)
    out = sampling.sample(params, toks, jnp.ones(toks.shape, bool), jax.random.key(0), cfg=cfg, sc=sc,
                          override=ov, add_after=0)
    assert np.asarray(out.tokens[:, 0]).tolist() == got[:, -1].argmax(-1).tolist()


def test_teacher_forced_logprobs_depend_on_the_activation(tiny_llama, cfgs):
    cfg, params, tok = tiny_llama
    spec = _av_spec(tiny_llama, cfgs)
    targets, mask = av_lib.sft_targets(tok, ["a cat", "the dog ran"], spec)
    assert targets[0, mask[0]].tolist()[-len(spec.closer) - 1:] == list(spec.closer) + [spec.eos]
    a = jax.random.normal(jax.random.key(2), (2, cfg.d_model))
    lp1 = av_lib.logprobs(params, {}, cfg, spec, a, jnp.asarray(targets))
    lp2 = av_lib.logprobs(params, {}, cfg, spec, -a, jnp.asarray(targets))
    assert lp1.shape == targets.shape and np.all(np.asarray(lp1) <= 0)
    assert np.abs(np.asarray(lp1 - lp2))[mask].max() > 1e-4
    # = a direct forward over prompt + targets with the override
    P = len(spec.prompt)
    seq = jnp.concatenate([jnp.broadcast_to(jnp.asarray(spec.prompt), (2, P)), jnp.asarray(targets[:, :-1])], 1)
    logits = T.forward(params, seq, cfg, override=av_lib.override(spec, a, {}, None))["logits"][:, P - 1:]
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp1), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_extract_finds_the_first_closing_tag_within_the_length():
    spec = av_lib.AVSpec(prompt=(1,), marker_pos=0, marker_id=9, closer=(7, 8), eos=2, mode="replace",
                         add_after=0, inject_norm=1.0, center=False, max_len=8)
    toks = jnp.asarray([[5, 6, 7, 8, 2, 0, 0, 0],     # ok, 2 tokens
                        [7, 8, 2, 0, 0, 0, 0, 0],     # empty explanation -> fail
                        [5, 7, 5, 6, 6, 6, 7, 8],     # closer at 6, but length 7 cuts it -> fail
                        [5, 5, 5, 7, 8, 7, 8, 2]])    # first closer counts
    lengths = jnp.asarray([5, 3, 7, 8])
    n, ok = av_lib.explanation_span(toks, lengths, spec)
    assert np.asarray(ok).tolist() == [True, False, False, True]
    assert np.asarray(n).tolist()[0] == 2 and np.asarray(n).tolist()[3] == 3


def test_ar_wrapper_is_padding_independent(tiny_llama, cfgs):
    """The AR's features for a row equal block K's output on the unpadded wrapper, last token."""
    cfg, params, tok = tiny_llama
    spec = ar_lib.build_spec(tok, cfg, cfgs.ar, layer=0, max_len=12)
    expl, lens = ar_lib.host_explanations(tok, ["a", "the river ran over", "x" * 40], spec)
    toks, valid, read_at = ar_lib.assemble(spec, jnp.asarray(expl), jnp.asarray(lens))
    arp = ar_lib.init_params(params, 0, cfg.d_model)
    feats = np.asarray(ar_lib.features(arp, cfg, spec, toks, valid, read_at))
    for i in range(3):
        seq = list(spec.prefix) + expl[i, :lens[i]].tolist() + list(spec.suffix)
        assert np.asarray(toks[i, :len(seq)]).tolist() == seq and int(read_at[i]) == len(seq) - 1
        h = T.forward(params, jnp.asarray([seq]), cfg, capture_layer=0, logits=False)["hidden"][0, -1]
        h = np.asarray(h) / np.sqrt(np.mean(np.asarray(h) ** 2) + 1e-6)  # head_norm = rms
        np.testing.assert_allclose(feats[i], h, rtol=1e-4, atol=1e-4)
    assert lens[2] == 12  # cut at max_len


def test_normalised_mse_fve_and_floor():
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((500, 16)) + np.r_[8.0, -5.0, np.zeros(14)]  # a big shared direction
    st = stats_lib.compute(acts.astype(np.float32))
    tgt = stats_lib.normalise_np(acts)
    # mse_nrm = 2 (1 - cos)
    p = rng.standard_normal((500, 16))
    mse = np.asarray(stats_lib.mse_nrm(jnp.asarray(p, jnp.float32), jnp.asarray(tgt, jnp.float32)))
    cos = (p * acts).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(acts, axis=1)
    np.testing.assert_allclose(mse, 2 * (1 - cos), rtol=1e-4, atol=1e-5)
    # perfect -> 1; predicting the (unnormalised) mean of v_nrm -> 0; renormalised mean -> the floor (< 0)
    assert abs(1 - np.mean((tgt - tgt) ** 2) / st.var_nrm - 1) < 1e-12
    mu = tgt.mean(0)
    assert abs(1 - np.mean((tgt - mu) ** 2) / st.var_nrm) < 1e-9
    floor = 1 - np.mean((tgt - st.floor_prediction(False)) ** 2) / st.var_nrm
    assert abs(floor - st.floor_fve) < 1e-9 and st.floor_fve < 0
    # closed form: the floor is -|mu - c|^2 / (d Var), c = mu renormalised to sqrt(d)
    c = mu * 4.0 / np.linalg.norm(mu)
    assert abs(st.floor_fve + np.sum((mu - c) ** 2) / 16 / st.var_nrm) < 1e-6
    assert st.var_nrm_centered > st.var_nrm  # centring removes the shared direction
    # bootstrap over documents: constant per-document values -> the interval covers the mean
    m, lo, hi = stats_lib.bootstrap_ci(np.repeat([0.0, 1.0, 2.0, 3.0], 5), np.repeat(np.arange(4), 5), 500)
    assert lo <= m <= hi and m == 1.5


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 8))
    W = rng.standard_normal((8, 8))
    w, b = ar_lib.ridge(X, X @ W + 3.0, lam=1e-8)
    np.testing.assert_allclose(w, W, atol=1e-5)
    np.testing.assert_allclose(b, 3.0, atol=1e-5)


def test_block_mask_freezes_blocks_exactly():
    params = {"layers": {"w": jnp.ones((3, 2, 2))}, "embed": jnp.ones((4, 2))}
    g = optim.mask_grads(jax.tree.map(jnp.ones_like, params), optim.block_mask(3, (1, -1)))
    assert np.asarray(g["layers"]["w"][:, 0, 0]).tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(UserError, match="train_blocks"):
        optim.block_mask(3, (2, 1))


@pytest.mark.parametrize("share_prompt", [True, False])
def test_grpo_raises_a_toy_reward(tiny_llama, share_prompt):
    """A plain GRPO policy step on the tiny model: reward = share of even token ids (about 0.5 at start)."""
    from nla_jax.rl import grpo
    cfg, params, _ = tiny_llama
    rl = ml_collections.ConfigDict(dict(group_size=8, advantage="grpo", adv_eps=1e-4, adv_ddof=1, beta=0.0,
                                        kl="k3", eps_low=0.2, eps_high=0.2, agg="token_mean",
                                        share_prompt=share_prompt))
    sc = sampling.SampleConfig(max_new_tokens=8, temperature=1.0, stop_at_eos=False)
    ocfg = configlib.ConfigDict(dict(lr=3e-2, lr_head=0.0, lr_proj=0.0, warmup=0, schedule="constant", clip=1.0,
                                     weight_decay=0.0, b1=0.9, b2=0.999, train_embed=True, train_blocks=(0, -1)))
    tx = optim.make(ocfg, 100, params)
    labels = optim.labels(params, True)
    reward = lambda toks, lens: jnp.mean((toks % 2 == 0).astype(jnp.float32), axis=1)
    import functools
    step = jax.jit(functools.partial(grpo.policy_step, cfg=cfg, sc=sc, rl=rl, tx=tx, labels=labels, reward_fn=reward))
    state = {"params": params, "opt": tx.init(params), "step": jnp.int32(0)}
    prompt = jnp.asarray([[1, 20, 30], [1, 40, 50]], jnp.int32)
    valid = jnp.ones(prompt.shape, bool)
    rewards = []
    for i in range(12):
        state, m = step(state, params, prompt, valid, jax.random.key(i))
        rewards.append(float(m["reward_mean"]))
        assert bool(m["finite"])
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards


def _clustered(rng, G: int, mu: float):
    """One synthetic dataset: G documents of 4..12 rows, value = mu + document effect + row noise."""
    n = rng.integers(4, 13, G)
    docs = np.repeat(np.arange(G), n)
    v = mu + rng.normal(0, 1.0, G)[docs] + rng.normal(0, 1.0, len(docs))
    return v, docs


@pytest.mark.parametrize("G", [8, 40])
def test_cluster_t_interval_covers_95_percent_with_few_documents(G):
    """2000 simulated datasets with a known mean: the interval covers it 95% of the time, within
    the binomial band 0.95 +- 3.5 sd (sd = sqrt(.95 * .05 / 2000) = 0.0049, band [0.933, 0.967]).
    The percentile bootstrap over documents it replaced under-covers at 8 documents."""
    rng = np.random.default_rng(G)
    mu, reps = 0.3, 2000
    hit_t = hit_b = 0
    for r in range(reps):
        v, docs = _clustered(rng, G, mu)
        m, lo, hi = stats_lib.cluster_t_ci(v, docs)
        assert m == pytest.approx(v.mean()) and lo < m < hi
        hit_t += lo <= mu <= hi
        if G == 8:
            _, blo, bhi = stats_lib.bootstrap_ci(v, docs, 400, r)
            hit_b += blo <= mu <= bhi
    band = 3.5 * np.sqrt(0.95 * 0.05 / reps)
    assert abs(hit_t / reps - 0.95) <= band, hit_t / reps
    if G == 8:
        assert hit_b / reps < 0.95 - band, hit_b / reps       # measured 0.877 here (0.942 for the t-interval)


def test_cluster_t_interval_known_values():
    # equal counts: exactly the t-interval of the document means (here 0, 1, 2, 3: mean 1.5, sd 1.29)
    m, lo, hi = stats_lib.cluster_t_ci(np.repeat([0.0, 1.0, 2.0, 3.0], 5), np.repeat(np.arange(4), 5))
    half = 3.182446305284263 * np.std([0, 1, 2, 3], ddof=1) / 2
    assert m == 1.5 and lo == pytest.approx(1.5 - half) and hi == pytest.approx(1.5 + half)
    # one document: no interval
    m, lo, hi = stats_lib.cluster_t_ci(np.array([1.0, 2.0]), np.array([7, 7]))
    assert m == 1.5 and np.isnan(lo) and np.isnan(hi)
