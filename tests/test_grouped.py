"""forward_grouped (each shared prompt run once for its G continuations) equals the plain forward
on the concatenated rows: logits, gradients, both injection modes, left padding, both families."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nla_jax import sampling
from nla_jax.models import transformer as T

# float32 with a different summation order (the prompt runs at batch B instead of B*G, and its
# gradient sums the G repeats before the weight matmuls). Measured: logits <= 9e-7, gradients
# <= 2e-6 relative to the largest entry on both tiny families; 1e-5 leaves a 5x margin.
TOL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _case(cfg, G=3, C=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (7, 4)]
    toks, valid = sampling.pad_prompts(rows, cfg.pad_id)
    comp = rng.integers(3, cfg.vocab_size, (len(rows) * G, C)).astype(np.int32)
    return jnp.asarray(toks), jnp.asarray(valid), jnp.asarray(comp), G


def _plain(params, cfg, prompt, valid, comp, G, **kw):
    P = prompt.shape[1]
    seq = jnp.concatenate([jnp.repeat(prompt, G, 0), comp], axis=1)
    v = jnp.concatenate([jnp.repeat(valid, G, 0), jnp.ones(comp.shape, bool)], axis=1)
    if "override" in kw and kw["override"] is not None:
        o = kw["override"]
        kw["override"] = T.Override(jnp.repeat(o.positions, G, 0), jnp.repeat(o.vectors, G, 0))
    return T.forward(params, seq, cfg, valid=v, logits_from=P - 1, **kw)["logits"]


def test_grouped_logits_equal_plain_forward(tiny):
    cfg, params, _ = tiny
    prompt, valid, comp, G = _case(cfg)
    got = T.forward_grouped(params, prompt, valid, comp, cfg, group=G)
    want = _plain(params, cfg, prompt, valid, comp, G)
    assert got.shape == want.shape == (comp.shape[0], 1 + comp.shape[1], cfg.vocab_size)
    assert rel_err(got, want) <= TOL


def test_grouped_injection_modes_equal_plain_forward(tiny_llama):
    cfg, params, _ = tiny_llama
    prompt, valid, comp, G = _case(cfg, seed=1)
    vec = jax.random.normal(jax.random.key(0), (prompt.shape[0], 1, cfg.d_model)) * 3.0
    o = T.Override(jnp.asarray([[5], [6]], jnp.int32), vec)
    for add_after in (None, 0):
        got = T.forward_grouped(params, prompt, valid, comp, cfg, group=G, override=o, add_after=add_after)
        want = _plain(params, cfg, prompt, valid, comp, G, override=o, add_after=add_after)
        assert rel_err(got, want) <= TOL, add_after
        base = T.forward_grouped(params, prompt, valid, comp, cfg, group=G)
        assert rel_err(got, base) > 1e-3  # the injection did something


def test_grouped_gradients_equal_plain_forward(tiny):
    cfg, params, _ = tiny
    prompt, valid, comp, G = _case(cfg, seed=2)
    w = jax.random.normal(jax.random.key(1), (comp.shape[0], 1 + comp.shape[1], cfg.vocab_size))

    def loss(p, grouped):
        lg = (T.forward_grouped(p, prompt, valid, comp, cfg, group=G, remat=True) if grouped
              else _plain(p, cfg, prompt, valid, comp, G))
        return jnp.sum(lg * w)

    g1, g0 = jax.grad(loss)(params, True), jax.grad(loss)(params, False)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g0)):
        assert rel_err(a, b) <= TOL, jax.tree_util.keystr(path)


def test_av_logprobs_grouped_equal_repeated(tiny_llama):
    """The verbalizer's teacher-forced log-probs with each injected prompt run once per group equal
    the per-row pass, in both injection modes (what rl_step's share_prompt relies on)."""
    import dataclasses

    from nla_jax.nla import av as av_lib
    cfg, params, _ = tiny_llama
    base = av_lib.AVSpec(prompt=(1, 40, 41, 300, 42, 43), marker_pos=3, marker_id=300, closer=(50,), eos=2,
                         mode="replace", add_after=0, inject_norm=4.0, center=False, max_len=6)
    G, B = 3, 2
    acts = jax.random.normal(jax.random.key(3), (B, cfg.d_model))
    targets = jax.random.randint(jax.random.key(4), (B * G, 6), 3, cfg.vocab_size)
    extra = av_lib.init_extra(cfg.d_model, True)
    for mode in ("replace", "add"):
        spec = dataclasses.replace(base, mode=mode)
        want = av_lib.logprobs(params, extra, cfg, spec, jnp.repeat(acts, G, 0), targets, share_prefix=False)
        got = av_lib.logprobs(params, extra, cfg, spec, acts, targets, group=G)
        assert got.shape == want.shape == (B * G, 6)
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4, mode  # log-probs ~ -6: TOL relative


def test_av_logprobs_shared_prefix_equal_per_row(tiny_llama):
    """SFT's teacher forcing runs the prompt's tokens before the marker once for the whole batch
    (they cannot see the injected vector): log-probs and gradients (model and input projection)
    equal the per-row pass, in both injection modes, with a prefix of one token or several."""
    from nla_jax.nla import av as av_lib
    cfg, params, _ = tiny_llama
    B, L = 4, 7
    acts = jax.random.normal(jax.random.key(5), (B, cfg.d_model))
    targets = jax.random.randint(jax.random.key(6), (B, L), 3, cfg.vocab_size)
    w = jax.random.normal(jax.random.key(7), (B, L))
    extra = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(8), a.shape),
                         av_lib.init_extra(cfg.d_model, True))
    for prompt, marker_pos in (((1, 40, 41, 300, 42, 43), 3), ((300, 42, 43, 44), 0), ((1, 300, 42), 1)):
        for mode in ("replace", "add"):
            spec = av_lib.AVSpec(prompt=prompt, marker_pos=marker_pos, marker_id=300, closer=(50,), eos=2, mode=mode,
                                 add_after=0, inject_norm=4.0, center=False, max_len=L)

            def loss(p, e, share):
                lp = av_lib.logprobs(p, e, cfg, spec, acts, targets, remat=True, share_prefix=share)
                return jnp.sum(lp * w), lp

            (_, got), g1 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, extra, True)
            (_, want), g0 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, extra, False)
            assert got.shape == want.shape == (B, L)
            assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4, (marker_pos, mode)  # log-probs ~ -6
            for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g0)):
                assert rel_err(a, b) <= TOL, (marker_pos, mode, jax.tree_util.keystr(path))
