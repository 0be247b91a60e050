"""The KV-cache sampler against an uncached loop, padding, seeds, truncation, EOS and overrides."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nla_jax import sampling
from nla_jax.models import transformer as T

fwd = jax.jit(T.forward, static_argnames=("cfg", "capture_layer", "logits", "remat"))


def _tokens(cfg, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, size=n).tolist()


def _sample(params, cfg, prompts, sc, seed=0, override=None, multiple=8):
    toks, valid = sampling.pad_prompts(prompts, cfg.pad_id, multiple=multiple)
    out = sampling.sample(params, jnp.asarray(toks), jnp.asarray(valid), jax.random.key(seed), cfg=cfg, sc=sc,
                          override=override)
    return jax.device_get(out)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def uncached_greedy(params, cfg, prompt: list[int], n: int):
    """Greedy decoding without a cache: re-run the full forward on the growing sequence.

    To compile once, the sequence lives in a fixed buffer of length len(prompt) + n whose
    not-yet-generated tail holds pad tokens; under the causal mask they cannot influence the
    logits at the last real position (checked in test_greedy_matches_uncached_tiny).
    Returns (tokens [n], logprobs [n], logits [n, V]).
    """
    P = len(prompt)
    buf = np.full((1, P + n), cfg.pad_id, np.int32)
    buf[0, :P] = prompt
    toks, lps, logits = [], [], []
    for i in range(n):
        lg = np.asarray(fwd(params, jnp.asarray(buf), cfg=cfg)["logits"][0, P + i - 1])
        t = int(np.argmax(lg))
        toks.append(t)
        lps.append(_log_softmax(lg)[t])
        logits.append(lg)
        buf[0, P + i] = t
    return np.array(toks), np.array(lps), np.stack(logits)


# ----------------------------------------------------------------------------- greedy vs uncached

def test_greedy_matches_uncached_tiny(tiny):
    cfg, params, _ = tiny
    prompt, N = _tokens(cfg, 7, seed=1), 16
    # the fixed-buffer trick of uncached_greedy: pad tail does not change the last real logits
    alone = np.asarray(fwd(params, jnp.asarray([prompt], jnp.int32), cfg=cfg)["logits"][0, -1])
    padded = np.asarray(fwd(params, jnp.asarray([prompt + [cfg.pad_id] * N], jnp.int32), cfg=cfg)["logits"][0, 6])
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-5)

    ref_tok, ref_lp, _ = uncached_greedy(params, cfg, prompt, N)
    out = _sample(params, cfg, [prompt], sampling.SampleConfig(max_new_tokens=N, greedy=True, stop_at_eos=False),
                  multiple=1)
    np.testing.assert_array_equal(out.tokens[0], ref_tok)
    np.testing.assert_allclose(out.logprobs[0], ref_lp, atol=1e-4)
    assert out.lengths[0] == N and not out.finished[0]
    assert len(set(ref_tok.tolist())) > 1  # not a degenerate constant sequence


def test_greedy_matches_uncached_real(real):
    cfg, params, tok = real
    prompt, N = tok.encode_chat("Write a haiku about the ocean."), 16
    ref_tok, ref_lp, _ = uncached_greedy(params, cfg, prompt, N)
    out = _sample(params, cfg, [prompt], sampling.SampleConfig(max_new_tokens=N, greedy=True, stop_at_eos=False))
    np.testing.assert_array_equal(out.tokens[0], ref_tok)
    np.testing.assert_allclose(out.logprobs[0], ref_lp, atol=1e-4)
    assert len(set(ref_tok.tolist())) > 5


def test_sampled_logprobs_match_teacher_forcing(tiny_qwen2):
    """Log-probs are of the chosen token under the temperature-scaled full distribution."""
    cfg, params, _ = tiny_qwen2
    prompt, N, temp = _tokens(cfg, 6, seed=2), 12, 0.7
    for sc in (sampling.SampleConfig(max_new_tokens=N, temperature=temp, stop_at_eos=False),
               sampling.SampleConfig(max_new_tokens=N, temperature=temp, top_k=5, stop_at_eos=False)):
        out = _sample(params, cfg, [prompt], sc, seed=3, multiple=1)
        seq = prompt + out.tokens[0].tolist()
        logits = np.asarray(fwd(params, jnp.asarray([seq], jnp.int32), cfg=cfg)["logits"][0])
        logits = logits[len(prompt) - 1:-1]  # the distributions the N tokens were drawn from
        lp = _log_softmax(logits / temp)
        np.testing.assert_allclose(out.logprobs[0], lp[np.arange(N), out.tokens[0]], atol=1e-4)
        if sc.top_k:
            top = np.argsort(-logits, axis=-1)[:, :sc.top_k]
            assert all(t in top[i] for i, t in enumerate(out.tokens[0]))


# ----------------------------------------------------------------------------- batching and decoding options

def test_batch_of_different_lengths_matches_each_alone(tiny_qwen2):
    cfg, params, _ = tiny_qwen2
    prompts = [_tokens(cfg, n, seed=40 + n) for n in (3, 9, 14)]
    sc = sampling.SampleConfig(max_new_tokens=10, greedy=True, stop_at_eos=False)
    batch = _sample(params, cfg, prompts, sc)
    for i, p in enumerate(prompts):
        alone = _sample(params, cfg, [p], sc, multiple=1)  # no padding at all
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
        np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)
    assert not np.array_equal(batch.tokens[0], batch.tokens[1])


def test_seeds(tiny_llama):
    cfg, params, _ = tiny_llama
    p = _tokens(cfg, 5, seed=5)
    sc = sampling.SampleConfig(max_new_tokens=16, temperature=1.0, stop_at_eos=False)
    a = _sample(params, cfg, [p, p], sc, seed=0)
    b = _sample(params, cfg, [p, p], sc, seed=0)
    c = _sample(params, cfg, [p, p], sc, seed=1)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens[0], c.tokens[0])
    assert not np.array_equal(a.tokens[0], a.tokens[1])  # rows of one batch draw independently


def test_top_k_1_and_tiny_top_p_are_greedy(tiny_llama):
    cfg, params, _ = tiny_llama
    prompts = [_tokens(cfg, 6, seed=6), _tokens(cfg, 4, seed=7)]
    greedy = _sample(params, cfg, prompts, sampling.SampleConfig(max_new_tokens=12, greedy=True, stop_at_eos=False))
    k1 = _sample(params, cfg, prompts, sampling.SampleConfig(max_new_tokens=12, top_k=1, stop_at_eos=False), seed=9)
    p0 = _sample(params, cfg, prompts, sampling.SampleConfig(max_new_tokens=12, top_p=1e-6, stop_at_eos=False),
                 seed=9)
    np.testing.assert_array_equal(k1.tokens, greedy.tokens)
    np.testing.assert_array_equal(p0.tokens, greedy.tokens)
    # temperature 1: the full-distribution log-probs are the greedy ones
    np.testing.assert_allclose(k1.logprobs, greedy.logprobs, atol=1e-5)
    # and plain temperature-1 sampling is not greedy here (the check above is not vacuous)
    t1 = _sample(params, cfg, prompts, sampling.SampleConfig(max_new_tokens=12, stop_at_eos=False), seed=9)
    assert not np.array_equal(t1.tokens, greedy.tokens)


def test_eos_stops_a_row(tiny_llama):
    cfg0, params, _ = tiny_llama
    N = 12
    sc = sampling.SampleConfig(max_new_tokens=N, greedy=True)
    prompts = [_tokens(cfg0, 6, seed=50), _tokens(cfg0, 9, seed=51)]
    free = _sample(params, cfg0.replace(eos_ids=()), prompts, sc)
    seq0, seq1 = free.tokens[0].tolist(), free.tokens[1].tolist()
    # a step j >= 2 whose token is new in row 0 and never produced by row 1
    j = next(j for j in range(2, N - 2) if seq0[j] not in seq0[:j] and seq0[j] not in seq1)
    eos = seq0[j]
    cfg = cfg0.replace(eos_ids=(eos,))

    out = _sample(params, cfg, prompts, sc)
    assert out.tokens[0, :j + 1].tolist() == seq0[:j + 1]
    assert (out.tokens[0, j + 1:] == cfg.pad_id).all()
    assert (out.logprobs[0, j + 1:] == 0).all()
    assert (out.logprobs[0, :j + 1] < 0).all()
    assert out.lengths[0] == j + 1 and out.finished[0]
    # the other row is unaffected and runs to the end
    assert out.tokens[1].tolist() == seq1
    assert out.lengths[1] == N and not out.finished[1]
    np.testing.assert_allclose(out.logprobs[1], free.logprobs[1], atol=1e-6)

    # every row finished: the loop stops early, the tail is padding
    both = _sample(params, cfg, [prompts[0], prompts[0]], sc)
    assert both.lengths.tolist() == [j + 1, j + 1] and both.finished.all()
    assert (both.tokens[:, j + 1:] == cfg.pad_id).all()

    # stop_at_eos=False decodes through the EOS
    through = _sample(params, cfg, prompts, sampling.SampleConfig(max_new_tokens=N, greedy=True, stop_at_eos=False))
    assert through.tokens.tolist() == [seq0, seq1]
    assert through.lengths.tolist() == [N, N] and not through.finished.any()


def test_eos_as_first_token(tiny_llama):
    cfg0, params, _ = tiny_llama
    sc = sampling.SampleConfig(max_new_tokens=6, greedy=True)
    prompt = _tokens(cfg0, 6, seed=60)
    first = int(_sample(params, cfg0.replace(eos_ids=()), [prompt], sc).tokens[0, 0])
    out = _sample(params, cfg0.replace(eos_ids=(first,)), [prompt], sc)
    assert out.tokens[0].tolist() == [first] + [cfg0.pad_id] * 5
    assert out.lengths[0] == 1 and out.finished[0]


def test_override_in_sample(tiny_llama):
    cfg, params, _ = tiny_llama
    prompt = _tokens(cfg, 8, seed=70)
    sc = sampling.SampleConfig(max_new_tokens=8, greedy=True, stop_at_eos=False)
    vec = 3.0 * np.random.default_rng(2).normal(size=(1, 1, cfg.d_model)).astype(np.float32)
    ov = T.Override(jnp.asarray([[3]], jnp.int32), jnp.asarray(vec))
    plain = _sample(params, cfg, [prompt], sc)
    got = _sample(params, cfg, [prompt], sc, override=ov)
    assert not np.array_equal(got.tokens, plain.tokens)
    # the prefill saw the override: first token and its log-prob follow forward(override=...)
    logits = np.asarray(fwd(params, jnp.asarray([prompt], jnp.int32), cfg=cfg, override=ov)["logits"][0, -1])
    assert got.tokens[0, 0] == int(np.argmax(logits))
    np.testing.assert_allclose(got.logprobs[0, 0], _log_softmax(logits)[got.tokens[0, 0]], atol=1e-4)
    # an override whose slots are all -1 changes nothing
    none = T.Override(jnp.asarray([[-1]], jnp.int32), jnp.asarray(vec))
    np.testing.assert_array_equal(_sample(params, cfg, [prompt], sc, override=none).tokens, plain.tokens)


# ----------------------------------------------------------------------------- the real model talks sense

def test_real_greedy_chat_is_coherent(real):
    """Greedy replies of SmolLM2-135M-Instruct answer simple questions correctly.

    Besides the sampler, this checks the GGUF loading end to end (notably the Q/K row
    un-permutation: with rotate-half RoPE applied to llama.cpp's interleaved layout, the model
    produces fluent-looking nonsense, which the numpy reference would not notice since it reads
    the same params).
    """
    cfg, params, tok = real
    prompts = ["What is the capital of France?", "What is the capital of Japan?", "What is 2+2?"]
    replies = sampling.generate_text(params, cfg, tok, prompts, sampling.SampleConfig(max_new_tokens=24, greedy=True))
    assert "Paris" in replies[0], replies
    assert "Tokyo" in replies[1], replies
    assert "4" in replies[2], replies
    assert not any("<|im" in r for r in replies)  # special tokens are stripped from the text


@pytest.mark.parametrize("V,block", [(37, 8), (3000, 1024), (16, 16)])
def test_categorical_matches_softmax_frequencies(V, block):
    """The two-level inverse-CDF sampler draws from softmax(logits): empirical frequencies of 40k
    draws agree with the probabilities (chi-square), and masked (-inf) ids are never drawn."""
    rng = np.random.default_rng(V)
    logits = rng.normal(0, 2.0, V).astype(np.float32)
    logits[rng.choice(V, V // 4, replace=False)] = -np.inf      # masked ids (top-k / top-p style)
    n = 40_000
    x = jnp.broadcast_to(jnp.asarray(logits), (n, V))
    draws = np.asarray(jax.jit(sampling.categorical, static_argnames="block")(jax.random.key(0), x, block=block))
    assert draws.min() >= 0 and draws.max() < V
    assert np.isfinite(logits[draws]).all()
    p = np.exp(logits - logits[np.isfinite(logits)].max())
    p /= p.sum()
    counts = np.bincount(draws, minlength=V)
    keep = p * n >= 5                                           # chi-square needs expected counts >= 5
    expected = p[keep] * n
    rest_obs, rest_exp = counts[~keep].sum(), n - expected.sum()
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum()
    if rest_exp >= 5:
        chi2 += (rest_obs - rest_exp) ** 2 / rest_exp
    dof = int(keep.sum()) + (rest_exp >= 5) - 1
    # 99.9th percentile of chi-square(dof) via Wilson-Hilferty (no scipy): a 1-in-1000 false alarm
    z = 3.09
    bound = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < bound, (chi2, bound, dof)


def test_categorical_is_seeded():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 100)), jnp.float32)
    a = sampling.categorical(jax.random.key(1), x)
    assert (np.asarray(a) == np.asarray(sampling.categorical(jax.random.key(1), x))).all()
    assert (np.asarray(a) != np.asarray(sampling.categorical(jax.random.key(2), x))).any()


def test_group_prefill_equals_repeated_prompts(tiny_llama):
    """group=G prefills each prompt once and repeats its cache: the same samples (same random draws)
    and log-probs as G copies of each prompt, with padding and an injection."""
    cfg, params, _ = tiny_llama
    G = 3
    rows = [list(_tokens(cfg, n, seed=20 + n)) for n in (6, 3)]
    toks, valid = sampling.pad_prompts(rows, cfg.pad_id)
    toks, valid = jnp.asarray(toks), jnp.asarray(valid)
    vec = jax.random.normal(jax.random.key(5), (2, 1, cfg.d_model)) * 2.0
    ov = T.Override(jnp.asarray([[4], [5]], jnp.int32), vec)
    ov_g = T.Override(jnp.repeat(ov.positions, G, 0), jnp.repeat(ov.vectors, G, 0))
    sc = sampling.SampleConfig(max_new_tokens=8, temperature=1.0, stop_at_eos=False)
    split = sampling.split_layers(params)
    for add_after in (None, 0):
        got = jax.device_get(sampling._sample(split, toks, valid, jax.random.key(7), cfg=cfg, sc=sc, override=ov,
                                              add_after=add_after, group=G))
        want = jax.device_get(sampling._sample(split, jnp.repeat(toks, G, 0), jnp.repeat(valid, G, 0),
                                               jax.random.key(7), cfg=cfg, sc=sc, override=ov_g, add_after=add_after))
        assert got.tokens.shape == (2 * G, 8)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)  # float32 rounding of batch-B vs B*G prefill
        assert len({tuple(r) for r in got.tokens}) > 2  # the G samples of a prompt differ


def test_scanned_decode_equals_unrolled(tiny_llama):
    """The accelerators' decode (a scan over the stacked layers, sampling._layers_with_cache_scanned)
    samples what the unrolled decode does: same tokens and log-probs, with groups, padding, an
    injection replacing an embedding and one added after block 0 (the hook inside the scan)."""
    cfg, params, _ = tiny_llama
    G = 2
    rows = [list(_tokens(cfg, n, seed=30 + n)) for n in (7, 4)]
    toks, valid = sampling.pad_prompts(rows, cfg.pad_id)
    toks, valid = jnp.asarray(toks), jnp.asarray(valid)
    ov = T.Override(jnp.asarray([[4], [5]], jnp.int32), jax.random.normal(jax.random.key(6), (2, 1, cfg.d_model)))
    sc = sampling.SampleConfig(max_new_tokens=9, temperature=1.0, stop_at_eos=False)
    split = sampling.split_layers(params)
    run = jax.jit(sampling._sample, static_argnames=("cfg", "sc", "add_after", "group"))
    for add_after in (None, 0):
        a = jax.device_get(run(split, toks, valid, jax.random.key(3), cfg=cfg, sc=sc, override=ov,
                               add_after=add_after, group=G))
        b = jax.device_get(run(params, toks, valid, jax.random.key(3), cfg=cfg, sc=sc, override=ov,
                               add_after=add_after, group=G))
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.lengths, b.lengths)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)   # float32 rounding of scan vs unrolled
