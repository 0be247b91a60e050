"""nla_jax.rl against NumPy float64 goldens written as explicit loops (not the vectorised
formulas of the implementation), so a shared algebra mistake cannot pass both sides.

Tolerances: rtol=1e-5 is float32 precision on O(1) values; atol=1e-6 covers outputs that are
near zero by construction (centred rewards, KL at logp ~= ref) where relative error is
meaningless.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nla_jax.rl import (aggregate, clipped_surrogate, group_advantages, kl_penalty, masked_mean,
                        nonzero_group_fraction, policy_loss)

RTOL, ATOL = 1e-5, 1e-6
AGG_MODES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "drgrpo"]


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- goldens (float64, loops)

def np_advantages(r: np.ndarray, estimator: str, eps: float = 1e-4, ddof: int = 1) -> np.ndarray:
    b, g = r.shape
    out = np.zeros((b, g))
    for i in range(b):
        row = [float(v) for v in r[i]]
        mean = sum(row) / g
        var = sum((v - mean) ** 2 for v in row) / (g - ddof)
        for j in range(g):
            if estimator == "grpo":
                out[i, j] = (row[j] - mean) / (math.sqrt(var) + eps)
            elif estimator == "drgrpo":
                out[i, j] = row[j] - mean
            else:  # rloo
                others = [row[k] for k in range(g) if k != j]
                out[i, j] = row[j] - sum(others) / len(others)
    return out


def np_kl(logp: np.ndarray, ref: np.ndarray, kind: str, clamp: float = 10.0) -> np.ndarray:
    out = np.zeros(logp.shape)
    for idx in np.ndindex(logp.shape):
        r = min(max(float(ref[idx]) - float(logp[idx]), -clamp), clamp)
        if kind == "k1":
            out[idx] = -r
        elif kind == "k2":
            out[idx] = 0.5 * r * r
        else:
            out[idx] = math.exp(r) - r - 1.0
    return out


def np_surrogate(logp, old, adv, eps_low, eps_high):
    n, t = logp.shape
    loss = np.zeros((n, t))
    clipped = np.zeros((n, t), bool)
    for i in range(n):
        for j in range(t):
            ratio = math.exp(float(logp[i, j]) - float(old[i, j]))
            a = float(adv[i])
            c = min(max(ratio, 1.0 - eps_low), 1.0 + eps_high)
            loss[i, j] = -min(ratio * a, c * a)
            clipped[i, j] = c * a < ratio * a
    return loss, clipped


def np_aggregate(x, mask, mode, max_len=None):
    n, t = x.shape
    if mode == "token_mean":
        total = count = 0.0
        for i in range(n):
            for j in range(t):
                if mask[i, j]:
                    total += float(x[i, j])
                    count += 1
        return total, count
    if mode == "seq_mean_token_mean":
        total = count = 0.0
        for i in range(n):
            vals = [float(x[i, j]) for j in range(t) if mask[i, j]]
            if vals:
                total += sum(vals) / len(vals)
                count += 1
        return total, count
    total = sum(float(x[i, j]) for i in range(n) for j in range(t) if mask[i, j])
    return total, float(n if mode == "seq_mean_token_sum" else n * max_len)


def np_policy_loss(logp, old, ref, adv, mask, *, eps_low, eps_high, beta, kind, agg,
                   max_len=None):
    per_token, _ = np_surrogate(logp, old, adv, eps_low, eps_high)
    if ref is not None and beta != 0:
        per_token = per_token + beta * np_kl(logp, ref, kind)
    total, count = np_aggregate(per_token, mask, agg, max_len)
    return total / max(count, 1.0)


def batch(seed=0, n=6, t=7):
    """Random policy batch; row 2 has no valid tokens, others have ragged lengths."""
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 1.0, (n, t))
    logp = old + rng.normal(0.0, 0.3, (n, t))        # ratios spread across both clip bounds
    ref = logp + rng.normal(0.0, 0.5, (n, t))
    adv = rng.normal(0.0, 1.0, n)
    adv[0], adv[1] = -abs(adv[0]), abs(adv[1])       # both signs present
    lens = [t, 3, 0, 5, 1, t][:n] + [t] * max(0, n - 6)
    mask = np.zeros((n, t), bool)
    for i, L in enumerate(lens):
        mask[i, :L] = True
    return logp, old, ref, adv, mask


# ---------------------------------------------------------------- advantages

@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_advantages_golden(estimator):
    rng = np.random.default_rng(1)
    r = rng.normal(0.0, 1.0, (5, 4))
    r[3] = 0.7                                       # an all-equal group -> advantages 0
    close(group_advantages(jnp.asarray(r, jnp.float32), estimator), np_advantages(r, estimator))


def test_grpo_ddof0_and_eps():
    r = np.array([[0.0, 1.0, 1.0], [2.0, -1.0, 0.5]])
    close(group_advantages(r, "grpo", eps=1e-2, ddof=0), np_advantages(r, "grpo", 1e-2, 0))


def test_rloo_is_scaled_centred():
    rng = np.random.default_rng(2)
    r = rng.normal(size=(4, 5))
    g = r.shape[1]
    expected = g / (g - 1) * (r - r.mean(axis=1, keepdims=True))
    close(group_advantages(r, "rloo"), expected)


def test_advantages_errors():
    with pytest.raises(ValueError, match="bogus"):
        group_advantages(np.zeros((2, 3)), "bogus")
    with pytest.raises(ValueError, match="g=1"):
        group_advantages(np.zeros((2, 1)), "grpo")


def test_nonzero_group_fraction():
    r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0 + 1e-8], [0.0, 0.0, 0.5]])
    close(nonzero_group_fraction(r), 0.5)
    assert nonzero_group_fraction(r).dtype == jnp.float32


# ---------------------------------------------------------------- KL

@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_golden(kind):
    logp, _, ref, _, _ = batch(3)
    ref[0, 0], ref[0, 1] = logp[0, 0] + 15.0, logp[0, 1] - 12.0    # beyond the clamp
    got = kl_penalty(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), kind)
    assert got.dtype == jnp.float32 and got.shape == logp.shape
    close(got, np_kl(logp, ref, kind))


def test_k3_nonnegative_and_zero_at_equality():
    rng = np.random.default_rng(4)
    logp = rng.normal(-3.0, 2.0, (8, 9))
    ref = rng.normal(-3.0, 2.0, (8, 9))
    assert np.all(np.asarray(kl_penalty(logp, ref, "k3")) >= 0.0)
    np.testing.assert_array_equal(np.asarray(kl_penalty(logp, logp, "k3")), 0.0)


def test_kl_gradient_through_logp_only():
    logp, _, ref, _, _ = batch(5)
    f = lambda lp, rf: jnp.sum(kl_penalty(lp, rf, "k3"))
    g_logp, g_ref = jax.grad(f, argnums=(0, 1))(jnp.asarray(logp, jnp.float32),
                                                jnp.asarray(ref, jnp.float32))
    np.testing.assert_array_equal(np.asarray(g_ref), 0.0)
    close(g_logp, 1.0 - np.exp(ref - logp))          # d/dlogp [e^r - r - 1], r = ref - logp


def test_kl_bad_kind():
    with pytest.raises(ValueError, match="k9"):
        kl_penalty(np.zeros((1, 1)), np.zeros((1, 1)), "k9")


# ---------------------------------------------------------------- surrogate

def test_surrogate_golden_asymmetric_eps():
    logp, old, _, adv, _ = batch(6, n=10)
    adv = np.abs(adv) * np.where(np.arange(10) % 2 == 0, 1.0, -1.0)   # alternate signs
    loss, clipped = clipped_surrogate(jnp.asarray(logp, jnp.float32),
                                      jnp.asarray(old, jnp.float32),
                                      jnp.asarray(adv, jnp.float32), eps_low=0.2, eps_high=0.28)
    want_loss, want_clipped = np_surrogate(logp, old, adv, 0.2, 0.28)
    close(loss, want_loss)
    np.testing.assert_array_equal(np.asarray(clipped), want_clipped)
    # The batch must exercise both clip sides with both advantage signs.
    ratio = np.exp(logp - old)
    a = adv[:, None]
    assert np.any(want_clipped & (a > 0) & (ratio > 1.28))
    assert np.any(want_clipped & (a < 0) & (ratio < 0.8))
    assert np.any(~want_clipped & (a < 0) & (ratio > 1.28))   # not clipped: pessimistic side
    # Asymmetry matters: a ratio in (1.2, 1.28] with A > 0 is clipped only under symmetric eps.
    lp = np.log(np.array([[1.25]])); o = np.zeros((1, 1)); A = np.array([1.0])
    assert not bool(clipped_surrogate(lp, o, A, eps_low=0.2, eps_high=0.28)[1][0, 0])
    assert bool(clipped_surrogate(lp, o, A, eps_low=0.2, eps_high=0.2)[1][0, 0])


# ---------------------------------------------------------------- aggregation

@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_golden(mode):
    logp, _, _, _, mask = batch(7)
    x = np.random.default_rng(8).normal(size=logp.shape)
    x[~mask] = 1e6                                   # padding values must be ignored
    total, count = aggregate(jnp.asarray(x, jnp.float32), mask, mode, max_len=mask.shape[1])
    want_total, want_count = np_aggregate(x, mask, mode, max_len=mask.shape[1])
    close(total, want_total)
    close(count, want_count)
    assert total.dtype == jnp.float32 and count.dtype == jnp.float32


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_all_empty(mode):
    mask = np.zeros((3, 4), bool)
    total, count = aggregate(np.ones((3, 4)), mask, mode, max_len=4)
    close(total, 0.0)
    assert np.isfinite(float(total))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_shard_property(mode):
    """Totals and counts of two halves, summed, give the whole-batch (total, count)."""
    _, _, _, _, mask = batch(9, n=8)
    x = np.random.default_rng(10).normal(size=mask.shape).astype(np.float32)
    T = mask.shape[1]
    whole = aggregate(x, mask, mode, max_len=T)
    h = [aggregate(x[s], mask[s], mode, max_len=T) for s in (slice(0, 3), slice(3, None))]
    close(h[0][0] + h[1][0], whole[0])
    close(h[0][1] + h[1][1], whole[1])
    close((h[0][0] + h[1][0]) / (h[0][1] + h[1][1]), float(whole[0]) / float(whole[1]))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="nope"):
        aggregate(np.zeros((1, 2)), np.ones((1, 2), bool), "nope")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(np.zeros((1, 2)), np.ones((1, 2), bool), "drgrpo")


def test_masked_mean():
    close(masked_mean(np.array([[1.0, 2.0, 100.0]]), np.array([[1, 1, 0]], bool)), 1.5)
    close(masked_mean(np.array([[1.0, 2.0]]), np.zeros((1, 2), bool)), 0.0)


# ---------------------------------------------------------------- policy loss

# Jitted so each test compiles one program instead of dispatching (and compiling) op by op.
_policy_loss = jax.jit(policy_loss, static_argnames=("eps_low", "eps_high", "beta", "kl_kind",
                                                     "agg", "max_len"))


def _run(logp, old, ref, adv, mask, **kw):
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    return _policy_loss(f32(logp), f32(old), f32(ref), f32(adv), mask, **kw)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_policy_loss_golden(agg, kind):
    logp, old, ref, adv, mask = batch(11)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05, agg=agg, max_len=mask.shape[1])
    loss, m = _run(logp, old, ref, adv, mask, kl_kind=kind, **kw)
    close(loss, np_policy_loss(logp, old, ref, adv, mask, kind=kind, **kw))
    _, clipped = np_surrogate(logp, old, adv, 0.2, 0.28)
    valid = mask.nonzero()
    close(m["loss"], float(loss))
    close(m["kl"], np_kl(logp, ref, kind)[valid].mean())
    close(m["clip_frac"], clipped[valid].mean())
    close(m["ratio_mean"], np.exp(logp - old)[valid].mean())
    for v in m.values():
        assert v.shape == () and v.dtype == jnp.float32


def test_policy_loss_beta0_and_no_ref():
    logp, old, ref, adv, mask = batch(12)
    kw = dict(eps_low=0.2, eps_high=0.2, kl_kind="k3", agg="token_mean")
    with_ref, m_ref = _run(logp, old, ref, adv, mask, beta=0.0, **kw)
    no_ref, m_none = _run(logp, old, None, adv, mask, beta=0.5, **kw)
    want = np_policy_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
                          kind="k3", agg="token_mean")
    close(with_ref, want)
    close(no_ref, want)
    close(m_ref["kl"], np_kl(logp, ref, "k3")[mask].mean())   # still logged at beta == 0
    close(m_none["kl"], 0.0)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_loss_grad_vs_finite_difference(agg):
    """jax.grad wrt logp against central differences of the float64 golden loss."""
    logp, old, ref, adv, mask = batch(13, n=4, t=5)
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.1, agg=agg, max_len=5)
    grad = jax.jit(jax.grad(lambda lp: _run(lp, old, ref, adv, mask, kl_kind="k3", **kw)[0]))(
        jnp.asarray(logp, jnp.float32))
    h = 1e-6
    fd = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        up, dn = logp.copy(), logp.copy()
        up[idx] += h
        dn[idx] -= h
        fd[idx] = (np_policy_loss(up, old, ref, adv, mask, kind="k3", **kw)
                   - np_policy_loss(dn, old, ref, adv, mask, kind="k3", **kw)) / (2 * h)
    # FD in float64 with h=1e-6 is accurate to ~1e-9; float32 grads to ~1e-7 absolute.
    close(grad, fd, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


def test_policy_loss_grad_hand_derived():
    """token_mean, k3: d loss / d logp_ij = [unclipped_ij] * (-ratio_ij * A_i)
    + beta * (1 - exp(ref_ij - logp_ij)), divided by the number of valid tokens."""
    logp, old, ref, adv, mask = batch(14, n=3, t=4)
    beta = 0.1
    grad = jax.jit(jax.grad(lambda lp: _run(lp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28,
                                            beta=beta, kl_kind="k3", agg="token_mean")[0]))(
        jnp.asarray(logp, jnp.float32))
    _, clipped = np_surrogate(logp, old, adv, 0.2, 0.28)
    want = np.zeros_like(logp)
    count = mask.sum()
    for i in range(3):
        for j in range(4):
            if mask[i, j]:
                ratio = math.exp(logp[i, j] - old[i, j])
                pg = 0.0 if clipped[i, j] else -ratio * adv[i]
                want[i, j] = (pg + beta * (1.0 - math.exp(ref[i, j] - logp[i, j]))) / count
    close(grad, want)


def test_policy_loss_padding_with_neg_inf_is_finite():
    logp, old, ref, adv, mask = batch(15)
    for a in (logp, old, ref):
        a[~mask] = -np.inf
    f = lambda lp: _run(lp, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.1,
                        kl_kind="k3", agg="seq_mean_token_mean")
    (loss, m), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(logp, jnp.float32))
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in m.values())
    assert np.all(np.isfinite(np.asarray(grad)))


def test_policy_loss_jits():
    logp, old, ref, adv, mask = batch(16)
    f = jax.jit(lambda lp, o, r, a, m: policy_loss(lp, o, r, a, m, eps_low=0.2, eps_high=0.28,
                                                   beta=0.04, kl_kind="k3", agg="drgrpo",
                                                   max_len=7))
    loss, _ = f(*(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv)), mask)
    close(loss, np_policy_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28,
                               beta=0.04, kind="k3", agg="drgrpo", max_len=7))
