"""Preference losses against float64 NumPy implementations of their papers' formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import losses

RNG = np.random.default_rng(0)
PC, PR, RC, RR = (RNG.normal(-20, 5, 64) for _ in range(4))  # sequence log-probs
LC, LR = RNG.integers(3, 30, 64).astype(float), RNG.integers(3, 30, 64).astype(float)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def reference(kind, beta, eps=0.0, gamma=0.5):
    h = (PC - RC) - (PR - RR)
    return {
        "sigmoid": -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h),  # label-smoothed, as TRL
        "cdpo": -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": np.maximum(0.0, 1 - beta * h),
        "simpo": -log_sigmoid(beta * (PC / LC - PR / LR) - gamma),
    }[kind].mean()


@pytest.mark.parametrize("kind", losses.DPO_LOSSES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_family_matches_numpy(kind, beta):
    eps = 0.2 if kind in ("sigmoid", "cdpo") else 0.0  # label smoothing means nothing to the others (they raise)
    got, aux = losses.dpo(*map(jnp.asarray, (PC, PR, RC, RR)), kind=kind, beta=beta, label_smoothing=eps,
                          chosen_len_B=jnp.asarray(LC), rejected_len_B=jnp.asarray(LR), simpo_gamma=0.5)
    np.testing.assert_allclose(got, reference(kind, beta, eps=eps), rtol=2e-5)
    rc, rr = beta * (PC - RC), beta * (PR - RR)
    np.testing.assert_allclose(aux["reward_margin"], np.mean(rc - rr), rtol=1e-4)
    np.testing.assert_allclose(aux["reward_accuracy"], np.mean(rc > rr))


def test_nll_term_is_rpo():
    args = tuple(map(jnp.asarray, (PC, PR, RC, RR)))
    got = losses.dpo(*args, beta=0.1, nll_weight=0.7, chosen_len_B=jnp.asarray(LC), rejected_len_B=jnp.asarray(LR))[0]
    np.testing.assert_allclose(got, reference("sigmoid", 0.1) + 0.7 * np.mean(-PC / LC), rtol=2e-5)


def test_cdpo_without_smoothing_is_dpo():
    args = tuple(map(jnp.asarray, (PC, PR, RC, RR)))
    np.testing.assert_allclose(losses.dpo(*args, kind="cdpo", label_smoothing=0.0)[0],
                               losses.dpo(*args, kind="sigmoid")[0], rtol=1e-6)


def test_unknown_dpo_loss():
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        losses.dpo(*map(jnp.asarray, (PC, PR, RC, RR)), kind="kto")


def test_bradley_terry_matches_numpy():
    weight = RNG.uniform(0.1, 1.0, 64)
    got, aux = losses.bradley_terry(jnp.asarray(PC / 10), jnp.asarray(PR / 10), margin=0.3,
                                    weight_B=jnp.asarray(weight))
    want = np.sum(-log_sigmoid(PC / 10 - PR / 10 - 0.3) * weight) / weight.sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], np.sum((PC > PR) * weight) / weight.sum(), rtol=1e-5)
    np.testing.assert_allclose(aux["margin"], np.sum((PC - PR) / 10 * weight) / weight.sum(), rtol=1e-5)


def test_sequence_logprobs_by_hand():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))  # softmax = the probs
    targets, mask = np.array([[0, 1, 2]]), np.array([[0.0, 1.0, 1.0]])  # the first token is prompt
    got = losses.sequence_logprobs(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)).sum()
    np.testing.assert_allclose(got, np.log(0.8) + np.log(0.6), rtol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_label_smoothing_is_cdpo_formula(beta):
    """TRL's sigmoid loss: -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h), written out by hand in float64
    on the float32 inputs the loss sees; "cdpo" is the same loss under its old name."""
    eps = 0.2
    pc, pr, rc, rr = (x.astype(np.float32).astype(np.float64) for x in (PC, PR, RC, RR))
    h = (pc - rc) - (pr - rr)
    want = np.mean((1 - eps) * np.logaddexp(0.0, -beta * h) + eps * np.logaddexp(0.0, beta * h))
    args = tuple(jnp.asarray(x, jnp.float32) for x in (PC, PR, RC, RR))
    sigmoid = losses.dpo(*args, kind="sigmoid", beta=beta, label_smoothing=eps)[0]
    cdpo = losses.dpo(*args, kind="cdpo", beta=beta, label_smoothing=eps)[0]
    np.testing.assert_allclose(sigmoid, want, rtol=1e-6)
    assert float(cdpo) == float(sigmoid)
    plain = losses.dpo(*args, kind="sigmoid", beta=beta)[0]
    assert float(losses.dpo(*args, kind="sigmoid", beta=beta, label_smoothing=0.0)[0]) == float(plain)
    assert float(sigmoid) != float(plain)


@pytest.mark.parametrize("kind", ["ipo", "hinge", "simpo"])
def test_label_smoothing_raises_where_it_means_nothing(kind):
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid/cdpo losses only"):
        losses.dpo(*map(jnp.asarray, (PC, PR, RC, RR)), kind=kind, label_smoothing=0.1,
                   chosen_len_B=jnp.asarray(LC), rejected_len_B=jnp.asarray(LR))


def test_ipo_with_label_smoothing_raises():
    with pytest.raises(ValueError):
        losses.dpo(*map(jnp.asarray, (PC, PR, RC, RR)), kind="ipo", label_smoothing=0.1)


def test_bradley_terry_ignores_weight_zero_pairs():
    """Pairs of weight 0 (missing responses) may hold any score, NaN included: same loss, metrics and gradients
    as with finite scores there, and zero gradient for them."""
    weight = np.where(np.arange(64) % 4 == 0, 0.0, RNG.uniform(0.1, 1.0, 64)).astype(np.float32)
    clean_c, clean_r = (PC / 10).astype(np.float32), (PR / 10).astype(np.float32)
    dirty_c, dirty_r = clean_c.copy(), clean_r.copy()
    dirty_c[weight == 0], dirty_r[weight == 0] = np.nan, np.inf

    def run(c, r):
        fn = lambda c, r: losses.bradley_terry(c, r, margin=0.3, weight_B=jnp.asarray(weight))  # noqa: E731
        (loss, aux), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(jnp.asarray(c), jnp.asarray(r))
        return [loss, aux["accuracy"], aux["margin"]], grads

    (want, want_grads), (got, got_grads) = run(clean_c, clean_r), run(dirty_c, dirty_r)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9)
        assert np.all(np.asarray(g)[weight == 0] == 0.0)


def test_sequence_logprobs_masked_positions_are_zero():
    """-100 targets and NaN / -inf logits where the mask is 0 give exactly 0 there, and the sum and its gradient
    match clean padding (targets 0, finite logits); the gradient at masked positions is exactly 0."""
    logits = (2 * RNG.standard_normal((2, 4, 5))).astype(np.float32)
    targets = RNG.integers(0, 5, (2, 4)).astype(np.int32)
    mask = np.array([[0, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    clean_t, dirty_t, dirty_l = np.where(mask > 0, targets, 0), np.where(mask > 0, targets, -100), logits.copy()
    dirty_l[0, 0], dirty_l[0, 3, 2], dirty_l[1, 2], dirty_l[1, 3, 0] = np.nan, -np.inf, -np.inf, np.nan

    def run(lg, tg):
        per_token = losses.sequence_logprobs(jnp.asarray(lg), jnp.asarray(tg), jnp.asarray(mask))
        grad = jax.grad(lambda x: losses.sequence_logprobs(x, jnp.asarray(tg), jnp.asarray(mask)).sum())(
            jnp.asarray(lg))
        return np.asarray(per_token), np.asarray(grad)

    (want, want_grad), (got, got_grad) = run(logits, clean_t), run(dirty_l, dirty_t)
    assert np.all(got[mask == 0] == 0.0) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got.sum(), want.sum(), rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-9)
    assert np.all(got_grad[mask == 0] == 0.0)
