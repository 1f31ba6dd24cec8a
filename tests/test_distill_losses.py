import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.losses import DIVERGENCES, distill

RNG = np.random.default_rng(0)
STUDENT = (2 * RNG.standard_normal((3, 5, 7))).astype(np.float32)
TEACHER = (3 * RNG.standard_normal((3, 5, 7))).astype(np.float32)
MASK = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 1, 1, 1, 0]], np.float32)
# garbage but finite logits at masked positions: they must not reach the loss, the metrics or the gradient
GARBAGE = np.float32(1e30) * np.where(RNG.random((3, 5, 7)) < 0.5, 1, -1).astype(np.float32)
DIRTY_STUDENT = np.where(MASK[..., None] > 0, STUDENT, GARBAGE)
DIRTY_TEACHER = np.where(MASK[..., None] > 0, TEACHER, -GARBAGE)
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


def numpy_log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_divergence_BT(student, teacher, kind, beta, temperature):
    """Per-token divergence in float64, straight from the formulas."""
    log_q, log_p = numpy_log_softmax(student / temperature), numpy_log_softmax(teacher / temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    if kind == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)


def numpy_entropy_BT(logits, temperature):
    log_p = numpy_log_softmax(logits / temperature)
    return -(np.exp(log_p) * log_p).sum(-1)


def run(student, teacher, mask=MASK, **kw):
    loss, aux = distill(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask), **kw)
    return float(loss), {k: float(v) for k, v in aux.items()}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", CASES)
def test_matches_numpy(kind, beta, temperature):
    """Garbage logits at masked positions, clean ones elsewhere: the loss and metrics are the float64 reference's
    over the masked-in tokens only."""
    on = MASK > 0
    div = numpy_divergence_BT(STUDENT, TEACHER, kind, beta, temperature)[on]
    loss, aux = run(DIRTY_STUDENT, DIRTY_TEACHER, kind=kind, beta=beta, temperature=temperature)
    want = [div.mean(), div.mean(), numpy_entropy_BT(TEACHER, temperature)[on].mean(),
            numpy_entropy_BT(STUDENT, temperature)[on].mean()]
    got = [loss, aux["divergence"], aux["teacher_entropy"], aux["student_entropy"]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(div > 0) and loss > 0


@pytest.mark.parametrize("kind,beta", CASES)
def test_identical_logits_give_zero(kind, beta):
    loss, _ = run(DIRTY_STUDENT, DIRTY_STUDENT, kind=kind, beta=beta, temperature=2.0)
    assert abs(loss) < 1e-6


def test_jsd_half_is_symmetric():
    a, _ = run(STUDENT, TEACHER, kind="jsd", beta=0.5)
    b, _ = run(TEACHER, STUDENT, kind="jsd", beta=0.5)
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("kind,beta", CASES)
def test_normalizer_divides_masked_sum(kind, beta):
    masked_sum = numpy_divergence_BT(STUDENT, TEACHER, kind, beta, 1.0)[MASK > 0].sum()
    loss, aux = run(DIRTY_STUDENT, DIRTY_TEACHER, kind=kind, beta=beta, normalizer=40.0)
    np.testing.assert_allclose([loss, aux["divergence"]], [masked_sum / 40.0] * 2, rtol=1e-5)


@pytest.mark.parametrize("kind,beta", CASES)
def test_nonnegative_on_random_logits(kind, beta):
    rng = np.random.default_rng(1)
    for scale in (0.1, 1.0, 10.0):
        s, t = (scale * rng.standard_normal((2, 3, 5, 7))).astype(np.float32)
        assert run(s, t, kind=kind, beta=beta)[0] >= 0.0


@pytest.mark.parametrize("kind,beta", CASES)
def test_student_gradient_is_finite_and_zero_at_padding(kind, beta):
    """Including a very negative teacher logit (p underflows to 0) and garbage at masked positions."""
    teacher = DIRTY_TEACHER.copy()
    teacher[0, 0, 0] = -1e4
    fn = lambda x: distill(x, jnp.asarray(teacher), jnp.asarray(MASK), kind=kind, beta=beta)[0]  # noqa: E731
    grad = np.asarray(jax.grad(fn)(jnp.asarray(DIRTY_STUDENT)))
    assert np.all(np.isfinite(grad)) and np.any(grad != 0.0)
    assert np.all(grad[MASK == 0] == 0.0)
    assert np.isfinite(float(fn(jnp.asarray(DIRTY_STUDENT))))


def test_all_masked_is_zero():
    loss, aux = run(DIRTY_STUDENT, DIRTY_TEACHER, mask=np.zeros((3, 5), np.float32), kind="jsd")
    assert loss == 0.0 and all(v == 0.0 for v in aux.values())


def test_unknown_kind_raises():
    assert "jsd" in DIVERGENCES
    with pytest.raises(ValueError, match="unknown divergence"):
        distill(jnp.asarray(STUDENT), jnp.asarray(TEACHER), jnp.asarray(MASK), kind="tvd")
