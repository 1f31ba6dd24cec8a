import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.losses import cross_entropy

RNG = np.random.default_rng(0)
LOGITS = (3 * RNG.standard_normal((2, 5, 7))).astype(np.float32)
TARGETS = RNG.integers(0, 7, (2, 5)).astype(np.int32)
MASK = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], np.float32)


def numpy_terms():
    """Per-token cross-entropy and log Z in float64."""
    x = LOGITS.astype(np.float64)
    top = x.max(-1, keepdims=True)
    log_z = np.log(np.exp(x - top).sum(-1)) + top[..., 0]
    return log_z - np.take_along_axis(x, TARGETS[..., None], -1)[..., 0], log_z


def test_cross_entropy_is_masked_mean():
    ce, _ = numpy_terms()
    loss, aux = cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(MASK))
    want = (ce * MASK).sum() / MASK.sum()
    np.testing.assert_allclose([loss, aux["ce"], aux["z_loss"]], [want, want, 0.0], rtol=1e-6)


@pytest.mark.parametrize("normalizer", [None, 20.0])
def test_z_loss_and_normalizer(normalizer):
    ce, log_z = numpy_terms()
    n = MASK.sum() if normalizer is None else normalizer
    want_ce, want_z = (ce * MASK).sum() / n, 1e-2 * (log_z**2 * MASK).sum() / n
    loss, aux = cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(MASK), z_loss=1e-2,
                              normalizer=normalizer)
    np.testing.assert_allclose([loss, aux["ce"], aux["z_loss"]], [want_ce + want_z, want_ce, want_z], rtol=1e-6)


def test_all_masked_is_zero():
    loss, aux = cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.zeros((2, 5)), z_loss=1e-2)
    assert float(loss) == 0.0 and float(aux["ce"]) == 0.0 and float(aux["z_loss"]) == 0.0
