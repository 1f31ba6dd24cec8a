"""Preference losses against float64 NumPy implementations of their papers' formulas."""

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
        "sigmoid": -log_sigmoid(beta * h),
        "cdpo": -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": np.maximum(0.0, 1 - beta * h),
        "simpo": -log_sigmoid(beta * (PC / LC - PR / LR) - gamma),
    }[kind].mean()


@pytest.mark.parametrize("kind", losses.DPO_LOSSES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_family_matches_numpy(kind, beta):
    got, aux = losses.dpo(*map(jnp.asarray, (PC, PR, RC, RR)), kind=kind, beta=beta, label_smoothing=0.2,
                          chosen_len_B=jnp.asarray(LC), rejected_len_B=jnp.asarray(LR), simpo_gamma=0.5)
    np.testing.assert_allclose(got, reference(kind, beta, eps=0.2), rtol=2e-5)
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
