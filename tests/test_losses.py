import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import losses
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


def dirty_padding(logits, targets, mask):
    """The batch with PyTorch's -100 at masked targets and NaN / -inf in masked logits (whole rows and single
    entries), and the same batch with clean padding (targets 0, the finite logits)."""
    dirty = logits.copy()
    pad = np.argwhere(mask == 0)
    for i, (b, t) in enumerate(pad):
        if i % 3 == 0:
            dirty[b, t] = np.nan
        elif i % 3 == 1:
            dirty[b, t] = -np.inf
        else:
            dirty[b, t, i % logits.shape[-1]] = np.nan
            dirty[b, t, (i + 1) % logits.shape[-1]] = np.inf
    return (dirty, np.where(mask > 0, targets, -100)), (logits, np.where(mask > 0, targets, 0))


@pytest.mark.parametrize("normalizer", [None, 20.0])
def test_cross_entropy_masked_positions_never_enter(normalizer):
    """-100 targets and NaN / inf logits where the mask is 0: the loss and the gradient at masked-in positions are
    those of clean padding, and the gradient at masked positions is exactly 0."""
    (dirty_l, dirty_t), (clean_l, clean_t) = dirty_padding(LOGITS, TARGETS, MASK)

    def run(logits, targets):
        fn = lambda x: cross_entropy(x, jnp.asarray(targets), jnp.asarray(MASK), z_loss=1e-2,  # noqa: E731
                                     normalizer=normalizer)
        (loss, aux), grad = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logits))
        return np.array([loss, aux["ce"], aux["z_loss"]]), np.asarray(grad)

    (want, want_grad), (got, got_grad) = run(clean_l, clean_t), run(dirty_l, dirty_t)
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(got_grad))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_grad[MASK > 0], want_grad[MASK > 0], rtol=1e-6, atol=1e-9)
    assert np.all(got_grad[MASK == 0] == 0.0) and np.all(want_grad[MASK == 0] == 0.0)


@pytest.mark.parametrize("fn", ["sequence_logprobs", "entropy"])
def test_masked_positions_never_enter_logprobs_and_entropy(fn):
    """As above, for the summed sequence log-probs and the masked-mean entropy."""
    (dirty_l, dirty_t), (clean_l, clean_t) = dirty_padding(LOGITS, TARGETS, MASK)
    if fn == "sequence_logprobs":
        def f(x, targets):
            return losses.sequence_logprobs(x, jnp.asarray(targets), jnp.asarray(MASK)).sum()
    else:
        def f(x, targets):
            return losses.entropy(x, jnp.asarray(MASK))

    def run(logits, targets):
        value, grad = jax.value_and_grad(f)(jnp.asarray(logits), targets)
        return float(value), np.asarray(grad)

    (want, want_grad), (got, got_grad) = run(clean_l, clean_t), run(dirty_l, dirty_t)
    assert np.isfinite(got) and np.all(np.isfinite(got_grad))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_grad[MASK > 0], want_grad[MASK > 0], rtol=1e-6, atol=1e-9)
    assert np.all(got_grad[MASK == 0] == 0.0) and np.all(want_grad[MASK == 0] == 0.0)


def test_out_of_range_targets_at_masked_positions():
    """Only the -100s, with finite logits: the case that used to gather NaN."""
    loss, _ = cross_entropy(jnp.asarray(LOGITS), jnp.asarray(np.where(MASK > 0, TARGETS, -100)), jnp.asarray(MASK))
    want, _ = cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(MASK))
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(loss, want, rtol=1e-6)
