"""token_logprobs: hand-written gradient vs autodiff of log_softmax + take."""
import jax
import jax.numpy as jnp
import numpy as np

from nla_jax.models.logprobs import next_token_loss, token_logprobs


def _ref(x, t):
    return jnp.take_along_axis(jax.nn.log_softmax(x.astype(jnp.float32), -1), t[..., None], -1)[..., 0]


def test_values_and_gradient_match_autodiff():
    x = 3.0 * jax.random.normal(jax.random.key(0), (3, 7, 50))
    t = jax.random.randint(jax.random.key(1), (3, 7), 0, 50)
    w = jax.random.normal(jax.random.key(2), (3, 7))
    np.testing.assert_allclose(token_logprobs(x, t), _ref(x, t), atol=1e-5)
    g1 = jax.grad(lambda x: jnp.sum(token_logprobs(x, t) * w))(x)
    g2 = jax.grad(lambda x: jnp.sum(_ref(x, t) * w))(x)
    np.testing.assert_allclose(g1, g2, atol=1e-6)


def test_bfloat16_logits_computed_in_float32():
    x = (10 * jax.random.normal(jax.random.key(3), (2, 4, 300))).astype(jnp.bfloat16)
    t = jax.random.randint(jax.random.key(4), (2, 4), 0, 300)
    out = token_logprobs(x, t)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _ref(x.astype(jnp.float32), t), atol=1e-4)


def test_next_token_loss_masks_positions():
    x = jax.random.normal(jax.random.key(5), (2, 6, 20))
    toks = jax.random.randint(jax.random.key(6), (2, 6), 0, 20)
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    lp = np.asarray(_ref(x[:, :-1], toks[:, 1:]))
    m = np.asarray(mask[:, 1:], np.float32)
    np.testing.assert_allclose(next_token_loss(x, toks, mask), -(lp * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(next_token_loss(x, toks), -lp.mean(), rtol=1e-5)
