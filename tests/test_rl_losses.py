"""PPO / GRPO math against float64 NumPy implementations written straight from the papers' formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import losses

RNG = np.random.default_rng(0)
B, T, V = 6, 9, 11
LENGTHS = np.array([9, 5, 1, 9, 3, 7])  # rows that end early, and one with a single valid token
MASK = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)
PAD = MASK == 0
ZLENGTHS = np.array([9, 5, 0, 1, 3, 7])  # as LENGTHS, but row 2 is masked out entirely (dropped by dynamic sampling)
ZMASK = (np.arange(T)[None, :] < ZLENGTHS[:, None]).astype(np.float32)
BUDGET = 12  # the generation budget seq_mean_token_sum_norm divides by: a constant, here larger than T
AGGS = {mode: losses.aggregator(mode, BUDGET) for mode in losses.AGGREGATIONS}

# everything is tested under jit: it must trace, and one compile per function beats eager op-by-op dispatch
kl_estimate = jax.jit(losses.kl_estimate, static_argnames="kind")
gae = jax.jit(losses.gae)
whiten = jax.jit(losses.whiten, static_argnames="shift_mean")
entropy = jax.jit(losses.entropy, static_argnames="agg")
explained_variance = jax.jit(losses.explained_variance)
ppo_policy_loss = jax.jit(losses.ppo_policy_loss, static_argnames="agg")
ppo_value_loss = jax.jit(losses.ppo_value_loss, static_argnames="agg")
group_advantages = jax.jit(losses.group_advantages, static_argnames=("group_size", "scale", "baseline"))
unanimous_groups = jax.jit(losses.unanimous_groups, static_argnames="group_size")
overlong_penalty = jax.jit(losses.overlong_penalty, static_argnames=("max_len", "buffer"))
adaptive_kl_coef = jax.jit(losses.adaptive_kl_coef)
token_rewards = jax.jit(losses.token_rewards)


def rand(*shape, scale=1.0, pad=np.nan):
    """float32 normals with `pad` written into the padding, so any leak of it shows up in the result."""
    x = (scale * RNG.standard_normal(shape)).astype(np.float32)
    if shape == (B, T):
        x[PAD] = pad
    return x


def masked_mean(x, mask=MASK):
    return sum(x[b, t] for b in range(B) for t in range(T) if mask[b, t]) / mask.sum()


def masked_var(x, mask=MASK):
    mu = masked_mean(x, mask)
    return masked_mean((x - mu) ** 2, mask)


def numpy_aggregate(x, mask, mode, max_len=BUDGET):
    """The three aggregations as float64 loops over rows and tokens, straight from their definitions."""
    if mode == "token_mean":
        valid = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
        return sum(valid) / max(len(valid), 1)
    seqs = []
    for b in range(x.shape[0]):
        valid = [float(x[b, t]) for t in range(x.shape[1]) if mask[b, t]]
        if valid:  # a row with no valid token neither contributes nor counts
            seqs.append(sum(valid) / (len(valid) if mode == "seq_mean_token_mean" else max_len))
    return sum(seqs) / max(len(seqs), 1)


def numpy_token_weights(mask, mode, max_len=BUDGET):
    """d aggregate / d x[b, t]: 1/tokens, 1/(row's tokens * rows) or 1/(max_len * rows) on valid tokens, else 0."""
    rows = [b for b in range(mask.shape[0]) if mask[b].any()]
    w = np.zeros(mask.shape)
    for b in rows:
        for t in range(mask.shape[1]):
            if mask[b, t]:
                w[b, t] = {"token_mean": 1 / mask.sum(), "seq_mean_token_mean": 1 / (mask[b].sum() * len(rows)),
                           "seq_mean_token_sum_norm": 1 / (max_len * len(rows))}[mode]
    return w


def metric_mode(mode):
    """What a loss's aux metrics average over under `mode` (Aggregator.metric): tokens, or sequence means."""
    return "token_mean" if mode == "token_mean" else "seq_mean_token_mean"


# --- KL estimators ----------------------------------------------------------------------------------------------

def test_kl_estimators_match_definitions():
    logp, ref = rand(B, T, pad=0.0) - 2, rand(B, T, pad=0.0) - 2
    log_r = ref.astype(np.float64) - logp
    want = {"k1": -log_r, "k2": log_r ** 2 / 2, "k3": np.exp(log_r) - 1 - log_r}
    for kind in losses.KL_ESTIMATORS:
        got = kl_estimate(jnp.asarray(logp), jnp.asarray(ref), kind)
        np.testing.assert_allclose(got, want[kind], rtol=2e-5, atol=1e-6, err_msg=kind)
    assert np.all(np.asarray(kl_estimate(jnp.asarray(logp), jnp.asarray(ref), "k3")) >= 0)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(jnp.asarray(logp), jnp.asarray(ref), "k4")


def test_k3_is_exact_near_ratio_one():
    """expm1 keeps k3 ~ (log r)^2 / 2 to ~0.1% where float32 exp(log r) - 1 - log r is off by up to 3x."""
    log_r = np.array([1e-4, -3e-4, 2e-3], np.float32)
    got = kl_estimate(jnp.zeros(3), jnp.asarray(log_r), "k3")
    lr = log_r.astype(np.float64)
    np.testing.assert_allclose(got, np.expm1(lr) - lr, rtol=1e-2)


def test_k1_and_k3_estimate_the_exact_kl_from_samples():
    pi, ref = np.array([0.7, 0.15, 0.08, 0.05, 0.02]), np.full(5, 0.2)
    forward, reverse = np.sum(pi * np.log(pi / ref)), np.sum(ref * np.log(ref / pi))
    assert abs(forward - reverse) > 0.05  # so matching `forward` within 0.015 checks the direction of the KL
    x = np.random.default_rng(1).choice(5, size=200_000, p=pi)
    logp, ref_logp = jnp.asarray(np.log(pi[x])[None]), jnp.asarray(np.log(ref[x])[None])
    for kind in ("k1", "k3"):
        est = float(jnp.mean(kl_estimate(logp, ref_logp, kind)))
        assert abs(est - forward) < 0.015, (kind, est, forward)
    assert float(jnp.mean(kl_estimate(logp, ref_logp, "k2"))) - forward > 0.03  # k2 is biased
    k1, k3 = (np.asarray(kl_estimate(logp, ref_logp, k)) for k in ("k1", "k3"))
    assert k1.min() < 0 <= k3.min() and k3.std() < k1.std()  # k3: same mean, nonnegative, lower variance


# --- GAE --------------------------------------------------------------------------------------------------------

def numpy_gae(rewards, values, lengths, gamma, lam):
    """Explicit loops: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; V, A = 0 past the end."""
    adv = np.zeros((B, T))
    for b in range(B):
        next_v = next_a = 0.0
        for t in reversed(range(lengths[b])):
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            adv[b, t] = next_a = delta + gamma * lam * next_a
            next_v = float(values[b, t])
    rets = np.where(MASK > 0, adv + np.nan_to_num(values.astype(np.float64)), 0.0)
    return adv, rets


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.7, 0.0)])
def test_gae_matches_numpy_loops(gamma, lam):
    rewards, values = rand(B, T), rand(B, T)  # NaN in the padding of both
    adv, rets = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(MASK), gamma, lam)
    want_adv, want_rets = numpy_gae(rewards, values, LENGTHS, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(rets, want_rets, rtol=1e-5, atol=2e-5)
    assert np.all(np.asarray(adv)[PAD] == 0) and np.all(np.asarray(rets)[PAD] == 0)


def test_gae_by_hand():
    """One row of length 2 padded to 3; gamma = 0.5, lam = 0.5. A_1 = 1 - 2 = -1 (no bootstrap past the end);
    A_0 = (0 + 0.5 * 2 - 1) + 0.25 * A_1 = -0.25. The padding's value 100 must not be bootstrapped from."""
    adv, rets = gae(jnp.array([[0.0, 1.0, 5.0]]), jnp.array([[1.0, 2.0, 100.0]]),
                           jnp.array([[1, 1, 0]]), 0.5, 0.5)
    np.testing.assert_allclose(adv, [[-0.25, -1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(rets, [[0.75, 1.0, 0.0]], rtol=1e-6)


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    rewards, values = rand(B, T, pad=0.0), rand(B, T, pad=0.0)
    adv, rets = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(MASK), 0.9, 1.0)
    disc = np.array([[sum(0.9 ** (k - t) * rewards[b, k] for k in range(t, LENGTHS[b])) if t < LENGTHS[b] else 0.0
                      for t in range(T)] for b in range(B)])
    np.testing.assert_allclose(rets, disc, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(adv, disc - values * MASK, rtol=1e-5, atol=2e-5)


# --- whitening, entropy, explained variance ---------------------------------------------------------------------

@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
    x = rand(B, T, scale=3.0) + 2.0
    got = np.asarray(whiten(jnp.asarray(x), jnp.asarray(MASK), shift_mean=shift_mean))
    x64 = np.nan_to_num(x.astype(np.float64))
    mu, var = masked_mean(x64), masked_var(x64)
    want = np.where(MASK > 0, (x64 - mu) / np.sqrt(var) + (0 if shift_mean else mu), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(masked_var(got.astype(np.float64)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(masked_mean(got.astype(np.float64)), 0.0 if shift_mean else mu, atol=1e-5)


def test_entropy_matches_numpy():
    logits = rand(B, T, V, scale=2.0)
    got = entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(MASK))
    assert got.dtype == jnp.float32
    x = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, masked_mean(-(np.exp(logp) * logp).sum(-1)), rtol=1e-5)
    nan_padded = jnp.asarray(np.where(ZMASK[..., None] > 0, logits, np.nan), jnp.bfloat16)
    for mode, agg in AGGS.items():
        np.testing.assert_allclose(entropy(nan_padded, jnp.asarray(ZMASK), agg),
                                   numpy_aggregate(-(np.exp(logp) * logp).sum(-1), ZMASK, mode), rtol=1e-5)
    np.testing.assert_allclose(entropy(jnp.zeros((2, 3, V)), jnp.ones((2, 3))), np.log(V), rtol=1e-6)


def test_explained_variance_matches_numpy():
    rets = rand(B, T)
    values = rets + rand(B, T, scale=0.5)
    got = explained_variance(jnp.asarray(values), jnp.asarray(rets), jnp.asarray(MASK))
    r64, v64 = rets.astype(np.float64), values.astype(np.float64)
    np.testing.assert_allclose(got, 1 - masked_var(r64 - v64) / masked_var(r64), rtol=1e-5)
    ev = explained_variance
    mean_r = np.full_like(rets, masked_mean(r64))
    np.testing.assert_allclose(ev(jnp.asarray(rets), jnp.asarray(rets), jnp.asarray(MASK)), 1.0)
    np.testing.assert_allclose(ev(jnp.asarray(mean_r), jnp.asarray(rets), jnp.asarray(MASK)), 0.0, atol=1e-6)
    assert float(ev(jnp.ones((1, 3)), jnp.full((1, 3), 2.0), jnp.ones((1, 3)))) == 0.0  # Var(R) = 0: no NaN


# --- PPO clipped losses -----------------------------------------------------------------------------------------

def test_ppo_policy_loss_by_hand():
    """eps = 0.2. A > 0, r = 1.5: clip active (-1.2). A > 0, r = 0.5: not (-0.5). A < 0, r = 1.5: not (1.5).
    A < 0, r = 0.5: active (0.8). A = 2, r = 1: -2. The last token is padding."""
    ratio = np.array([[1.5, 0.5, 1.5, 0.5, 1.0, 9.0]])
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0, 2.0, 1e6]])
    old, mask = jnp.full((1, 6), -2.0), jnp.array([[1, 1, 1, 1, 1, 0]])
    logp = jnp.asarray(np.log(ratio) - 2.0)
    loss, aux = ppo_policy_loss(logp, old, adv, mask, 0.2)
    np.testing.assert_allclose(loss, (-1.2 - 0.5 + 1.5 + 0.8 - 2.0) / 5, rtol=1e-6)
    np.testing.assert_allclose(aux["clip_frac"], 2 / 5)
    np.testing.assert_allclose(aux["ratio_mean"], (1.5 + 0.5 + 1.5 + 0.5 + 1.0) / 5, rtol=1e-6)
    # gradient -A r / n where the unclipped term is taken, 0 where the clip is active or the token is padding
    grad = jax.jit(jax.grad(lambda lp: ppo_policy_loss(lp, old, adv, mask, 0.2)[0]))(logp)
    np.testing.assert_allclose(grad, [[0.0, -0.5 / 5, 1.5 / 5, 0.0, -2.0 / 5, 0.0]], rtol=1e-6, atol=1e-7)


def test_ppo_policy_loss_matches_numpy():
    old = rand(B, T, pad=0.0) - 3
    logp, adv = old + rand(B, T, scale=0.3, pad=0.0), rand(B, T)
    loss, aux = ppo_policy_loss(*map(jnp.asarray, (logp, old, adv, MASK)), 0.2)
    log_r = logp.astype(np.float64) - old
    r = np.exp(log_r)
    a = np.nan_to_num(adv.astype(np.float64))
    np.testing.assert_allclose(loss, masked_mean(-np.minimum(r * a, np.clip(r, 0.8, 1.2) * a)), rtol=1e-5)
    np.testing.assert_allclose(aux["clip_frac"], masked_mean(((r < 0.8) & (a < 0)) | ((r > 1.2) & (a > 0))))
    np.testing.assert_allclose(aux["approx_kl"], masked_mean(np.expm1(log_r) - log_r), rtol=1e-4)
    np.testing.assert_allclose(aux["ratio_mean"], masked_mean(r), rtol=1e-5)
    assert 0 < float(aux["clip_frac"]) < 1  # the random ratios exercise both sides


def test_ppo_value_loss_by_hand():
    """eps = 0.2, V_old = 0. V = 0.5, R = 1: clipped V = 0.2 is further, 0.64 (active). V = 0.5, R = 0: 0.25 vs
    0.04, unclipped (not). V = 0.1 inside the clip: 0.81 (not). The last token is padding."""
    values, rets = jnp.array([[0.5, 0.5, 0.1, 50.0]]), jnp.array([[1.0, 0.0, 1.0, -50.0]])
    loss, aux = ppo_value_loss(values, jnp.zeros((1, 4)), rets, jnp.array([[1, 1, 1, 0]]), 0.2)
    np.testing.assert_allclose(loss, 0.5 * (0.64 + 0.25 + 0.81) / 3, rtol=1e-6)
    np.testing.assert_allclose(aux["value_clip_frac"], 1 / 3)


def test_ppo_value_loss_matches_numpy():
    old, rets = rand(B, T), rand(B, T)
    values = old + rand(B, T, scale=0.4)
    loss, aux = ppo_value_loss(*map(jnp.asarray, (values, old, rets, MASK)), 0.2)
    v, vo, ret = (np.nan_to_num(a.astype(np.float64)) for a in (values, old, rets))
    err, err_c = (v - ret) ** 2, (np.clip(v, vo - 0.2, vo + 0.2) - ret) ** 2
    np.testing.assert_allclose(loss, 0.5 * masked_mean(np.maximum(err, err_c)), rtol=1e-5)
    np.testing.assert_allclose(aux["value_clip_frac"], masked_mean(err_c > err))
    assert 0 < float(aux["value_clip_frac"]) < 1
    for mode, agg in AGGS.items():
        loss, aux = ppo_value_loss(*map(jnp.asarray, (values, old, rets, ZMASK)), 0.2, agg)
        np.testing.assert_allclose(loss, 0.5 * numpy_aggregate(np.maximum(err, err_c), ZMASK, mode), rtol=1e-5)
        np.testing.assert_allclose(aux["value_clip_frac"], numpy_aggregate(err_c > err, ZMASK, metric_mode(mode)),
                                   rtol=1e-6)


# --- GRPO, KL controller, InstructGPT rewards -------------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 2.0])
    got = group_advantages(rewards, 4)
    s1, s3 = np.sqrt(1 / 3), np.sqrt(3 * 0.25 + 2.25) / np.sqrt(3)  # sample std of [1,0,0,1] and [0,0,0,2]
    want = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 0, 0, 0, 0, -0.5 / s3, -0.5 / s3, -0.5 / s3, 1.5 / s3]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # a unanimous group gives 0, not NaN
    np.testing.assert_allclose(group_advantages(rewards, 4, scale=False),
                               [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.5, -0.5, -0.5, 1.5], atol=1e-6)
    half = np.sqrt(0.5)  # pairs [1, 0], [0, 1]: sample std sqrt(1/2)
    np.testing.assert_allclose(group_advantages(rewards, 2)[:4], [half, -half, -half, half], rtol=1e-5)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 5)


def test_group_advantages_match_numpy():
    rewards = RNG.normal(size=24)
    got = group_advantages(jnp.asarray(rewards, jnp.float32), 6)
    g = rewards.reshape(4, 6)
    np.testing.assert_allclose(got, ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6))
                               .reshape(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("baseline", losses.BASELINES)
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_baselines_match_numpy(baseline, scale):
    K = 4
    rewards = RNG.normal(size=24)
    rewards[8:12] = 0.7  # a unanimous group: exactly 0, neither NaN nor float32 noise (r - mean) / eps
    got = group_advantages(jnp.asarray(rewards, jnp.float32), K, scale=scale, baseline=baseline)
    want = np.zeros(24)
    for g in range(0, 24, K):
        group = [float(x) for x in rewards[g:g + K]]
        for i in range(K):
            others = group[:i] + group[i + 1:]
            want[g + i] = group[i] - (np.mean(others) if baseline == "leave_one_out" else np.mean(group))
            if scale:
                want[g + i] /= np.std(group, ddof=1) + 1e-6
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[8:12] == 0.0)


def test_leave_one_out_by_hand():
    """[1, 0, 0, 1]: the other three average 1/3 for a 1 and 2/3 for a 0, so A = +-2/3 = K/(K-1) * GRPO's +-1/2."""
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(group_advantages(rewards, 4, scale=False, baseline="leave_one_out"),
                               [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown baseline 'median'.*leave_one_out"):
        group_advantages(rewards, 4, baseline="median")


def test_unanimous_groups():
    just_above_one = np.nextafter(np.float32(1), np.float32(2))  # equality is exact
    rewards = np.array([1, 1, 1, 0, 1, 0, 2, 2, 2, 0, 0, 0, 1, 1, just_above_one], np.float32)
    got = unanimous_groups(jnp.asarray(rewards), 3)
    assert got.dtype == jnp.bool_
    np.testing.assert_array_equal(got, np.repeat([True, False, True, True, False], 3))
    with pytest.raises(ValueError, match="group_size"):
        unanimous_groups(jnp.asarray(rewards), 4)


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_dynamic_sampling_drops_unanimous_groups_from_the_gradient(mode):
    """Masking out the rows of unanimous groups gives them exactly 0 gradient and leaves the other rows'
    gradients those of the batch without them: the dropped rows do not dilute any aggregation."""
    K, n, t = 3, 12, 5
    rng = np.random.default_rng(5)
    rewards = np.array([1, 0, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0], np.float32)  # groups 2 and 4 are unanimous
    mask = (np.arange(t)[None, :] < rng.integers(1, t + 1, n)[:, None]).astype(np.float32)
    old = (rng.standard_normal((n, t)) - 2).astype(np.float32)
    logp = (old + 0.3 * rng.standard_normal((n, t))).astype(np.float32)
    logp[mask == 0] = old[mask == 0] = np.nan
    adv = np.repeat(np.asarray(group_advantages(jnp.asarray(rewards), K))[:, None], t, axis=1)
    drop = np.asarray(unanimous_groups(jnp.asarray(rewards), K))
    np.testing.assert_array_equal(drop, np.repeat([False, True, False, True], K))
    agg, keep = losses.aggregator(mode, t), ~drop

    def value_and_grad(rows, m):
        return jax.jit(jax.value_and_grad(lambda lp: losses.ppo_policy_loss(
            lp, jnp.asarray(old[rows]), jnp.asarray(adv[rows]), jnp.asarray(m), 0.2, 0.28, agg)[0]))(
            jnp.asarray(logp[rows]))

    loss, grad = value_and_grad(slice(None), mask * keep[:, None])
    want_loss, want_grad = value_and_grad(keep, mask[keep])
    assert np.all(np.asarray(grad)[drop] == 0.0)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad)[keep], want_grad, rtol=1e-6, atol=1e-9)
    diluted = np.asarray(value_and_grad(slice(None), mask)[1])[keep]  # left in, they still count
    assert not np.allclose(diluted, want_grad, rtol=1e-3)


def test_overlong_penalty_by_hand():
    """max_len 10, buffer 4: nothing up to length 6, then -1/4 a token down to -1 at 10; cut off unended: -1."""
    lengths, ended = jnp.array([0, 6, 7, 8, 9, 10, 10]), jnp.array([True] * 6 + [False])
    got = overlong_penalty(lengths, ended, 10, 4)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, [0, 0, -0.25, -0.5, -0.75, -1, -1], rtol=1e-6)
    np.testing.assert_allclose(overlong_penalty(jnp.array([0, 5, 10]), jnp.ones(3, bool), 10, 10), [0, -0.5, -1])
    np.testing.assert_allclose(overlong_penalty(jnp.array([9, 10]), jnp.ones(2, bool), 10, 1), [0, -1])
    for buffer in (0, -2, 11):
        with pytest.raises(ValueError, match="buffer must be in"):
            overlong_penalty(lengths, ended, 10, buffer)


def test_adaptive_kl_coef():
    f = adaptive_kl_coef  # jitted: coef, observed KL and n_steps may be traced values
    np.testing.assert_allclose(f(0.1, 7.0, 6.0, 10_000, 256), 0.1 * (1 + (7 / 6 - 1) * 256 / 10_000), rtol=1e-6)
    assert f(0.1, 7.0, 6.0, 10_000, 256) > 0.1 > f(0.1, 5.0, 6.0, 10_000, 256)  # too far from ref: push back
    np.testing.assert_allclose(f(0.1, 6.0, 6.0, 10_000, 256), 0.1, rtol=1e-6)
    np.testing.assert_allclose(f(0.1, 600.0, 6.0, 1000, 100), 0.1 * 1.02, rtol=1e-6)  # error clipped at +0.2
    np.testing.assert_allclose(f(0.1, 0.0, 6.0, 1000, 100), 0.1 * 0.98, rtol=1e-6)  # and at -0.2


def test_token_rewards_match_numpy():
    lengths = np.append(LENGTHS, 0)  # plus a row with no valid token: it gets no reward at all
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    scores, kl = RNG.normal(size=B + 1).astype(np.float32), RNG.normal(size=(B + 1, T)).astype(np.float32)
    kl[mask == 0] = np.nan
    got = token_rewards(jnp.asarray(scores), jnp.asarray(kl), jnp.asarray(mask), 0.05)
    want = np.zeros((B + 1, T))
    for b in range(B + 1):
        for t in range(lengths[b]):
            want[b, t] = -0.05 * float(kl[b, t]) + (float(scores[b]) if t == lengths[b] - 1 else 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(1), np.nansum(-0.05 * kl.astype(np.float64), 1)
                               + scores * (lengths > 0), rtol=1e-5, atol=1e-5)


# --- loss aggregation (DAPO's token mean, GRPO's sequence mean, Dr. GRPO's budget-normalised sum) -----------------

@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_aggregation_matches_numpy_loops(mode):
    x = np.random.default_rng(7).standard_normal((B, T)).astype(np.float32)  # its own stream: not test order's
    x[ZMASK == 0] = np.nan
    value, grad = jax.jit(jax.value_and_grad(AGGS[mode]))(jnp.asarray(x), jnp.asarray(ZMASK))
    np.testing.assert_allclose(value, numpy_aggregate(x, ZMASK, mode), rtol=1e-6, atol=1e-6)  # a mean near 0
    assert np.all(np.asarray(grad)[ZMASK == 0] == 0.0)  # NaN padding: exactly 0, not NaN
    np.testing.assert_allclose(grad, numpy_token_weights(ZMASK, mode), rtol=1e-6)
    assert int(losses.aggregation_weight(jnp.asarray(ZMASK), mode)) == (ZLENGTHS.sum() if mode == "token_mean" else 5)


def test_aggregations_differ_and_validate():
    x = jnp.asarray(np.where(ZMASK > 0, RNG.standard_normal((B, T)), 0.0))
    values = {float(agg(x, jnp.asarray(ZMASK))) for agg in AGGS.values()}
    assert len(values) == 3  # the ragged mask tells them apart
    assert float(AGGS["token_mean"](x, jnp.zeros((B, T)))) == 0.0  # nothing valid: 0, not NaN
    assert float(AGGS["seq_mean_token_mean"](x, jnp.zeros((B, T)))) == 0.0
    assert losses.aggregator("token_mean", 7) == losses.aggregator("token_mean")  # max_len only matters to sum_norm
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq_sum'.*token_mean.*seq_mean_token_sum_norm"):
        losses.aggregator("seq_sum", 10)
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq_sum'"):
        losses.aggregation_weight(jnp.asarray(ZMASK), "seq_sum")
    with pytest.raises(ValueError, match="max_len"):
        losses.aggregator("seq_mean_token_sum_norm")


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_microbatches_weighed_by_aggregation_weight_equal_the_whole_batch(mode):
    agg = AGGS[mode]
    x = np.random.default_rng(8).standard_normal((B, T)).astype(np.float32)
    x[ZMASK == 0] = np.nan
    halves = [slice(0, 2), slice(2, B)]  # 14 tokens in 2 rows | 11 tokens in 3 valid rows of 4
    w = [float(losses.aggregation_weight(jnp.asarray(ZMASK[h]), mode)) for h in halves]
    parts = [float(agg(jnp.asarray(x[h]), jnp.asarray(ZMASK[h]))) for h in halves]
    np.testing.assert_allclose(np.dot(w, parts) / sum(w), numpy_aggregate(x, ZMASK, mode), rtol=1e-6, atol=1e-6)

    # through the accumulation every objective takes (step.grads, microbatches of rows 0,2,4 | 1,3,5): the loss,
    # its metrics and the gradients of a stand-in parameter theta_T, logp = old + theta * direction
    from llmjax.train import step
    old, direction, adv = rand(B, T) - 2, rand(B, T, pad=0.0), rand(B, T)
    batch = {k: jnp.asarray(v) for k, v in {"old": old, "dir": direction, "adv": adv, "mask": ZMASK}.items()}

    def loss_fn(theta, mb):
        logp = mb["old"] + theta[None, :] * mb["dir"]
        return losses.ppo_policy_loss(logp, mb["old"], mb["adv"], mb["mask"], 0.2, 0.28, agg)

    theta = jnp.full(T, 0.4)
    whole = jax.jit(step.grads(loss_fn))(theta, batch)
    accumulated = jax.jit(step.grads(loss_fn, 2, lambda mb: losses.aggregation_weight(mb["mask"], mode)))(theta, batch)
    for got, want in zip(jax.tree.leaves(accumulated), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    assert 0 < float(whole[1]["clip_frac"]) < 1


# --- PPO asymmetric clipping (DAPO's clip-higher) -------------------------------------------------------------

@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_asymmetric_clipping_matches_numpy(mode):
    """Ratios above 1 + high, in (1 + low, 1 + high], inside, below 1 - low, with advantages of both signs."""
    low, high, rng = 0.2, 0.28, np.random.default_rng(4)
    k = np.cumsum(ZMASK > 0).reshape(B, T) - 1  # the valid tokens in order: each ratio region with either sign
    ratio = np.array([1.5, 1.25, 1.1, 0.9, 0.7, 0.5])[k % 6] * np.exp(0.004 * rng.standard_normal((B, T)))
    old = (rng.standard_normal((B, T)) - 3).astype(np.float32)
    logp = (old + np.log(ratio)).astype(np.float32)
    adv = (np.where(k // 6 % 2, -1.0, 1.0) * rng.uniform(0.5, 2.0, (B, T))).astype(np.float32)
    for a in (logp, old, adv):
        a[ZMASK == 0] = np.nan
    agg = AGGS[mode]
    (loss, aux), grad = jax.jit(jax.value_and_grad(
        lambda lp: losses.ppo_policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(ZMASK), low, high, agg),
        has_aux=True))(jnp.asarray(logp))

    valid = ZMASK > 0
    r = np.where(valid, np.exp(logp.astype(np.float64) - old), 1.0)
    a = np.where(valid, adv.astype(np.float64), 0.0)
    unclipped, clipped = -a * r, -a * np.clip(r, 1 - low, 1 + high)
    clip_taken = valid & (clipped > unclipped)
    np.testing.assert_allclose(loss, numpy_aggregate(np.maximum(unclipped, clipped), ZMASK, mode), rtol=1e-5)
    # d/dlogp: -A r (times the token's aggregation weight) where the unclipped term is taken, else exactly 0
    want_grad = np.where(clip_taken, 0.0, -a * r) * numpy_token_weights(ZMASK, mode)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(grad)[clip_taken | ~valid] == 0.0) and np.all(np.asarray(grad)[valid & ~clip_taken] != 0)
    np.testing.assert_allclose(aux["clip_frac"], numpy_aggregate(clip_taken, ZMASK, metric_mode(mode)), rtol=1e-6)
    np.testing.assert_allclose(aux["ratio_mean"], numpy_aggregate(r, ZMASK, metric_mode(mode)), rtol=1e-5)
    # every region is exercised: A > 0 in (1 + low, 1 + high] is kept only because high > low
    for lo, hi in [(1.3, 9), (1.2, 1.28), (0.8, 1.2), (0, 0.8)]:
        in_region = valid & (r > lo) & (r < hi)
        assert np.any(in_region & (a > 0)) and np.any(in_region & (a < 0)), (lo, hi)
    assert np.any(valid & (r > 1.2) & (r < 1.28) & (a > 0) & ~clip_taken)
    symmetric = ppo_policy_loss(*map(jnp.asarray, (logp, old, adv, ZMASK)), low, None, agg)[0]
    np.testing.assert_allclose(symmetric, ppo_policy_loss(*map(jnp.asarray, (logp, old, adv, ZMASK)), low, low, agg)[0])
    assert float(symmetric) != float(loss)


def test_policy_loss_defaults_are_the_token_mean():
    old = rand(B, T) - 3
    logp, adv = old + rand(B, T, scale=0.3), rand(B, T)
    args = tuple(map(jnp.asarray, (logp, old, adv, MASK)))
    default, explicit = ppo_policy_loss(*args, 0.2), ppo_policy_loss(*args, 0.2, 0.2, AGGS["token_mean"])
    for got, want in zip(jax.tree.leaves(default), jax.tree.leaves(explicit), strict=True):
        assert float(got) == float(want)


# --- padding never reaches a value or a gradient ----------------------------------------------------------------

def padded(rng, pad, scale=1.0, shift=0.0):
    x = (shift + scale * rng.standard_normal((B, T))).astype(np.float32)
    x[PAD] = pad
    return x


# each: (function of the [B, T] inputs to a scalar, how many inputs, input scale and shift)
GRAD_CASES = {
    "ppo_policy_loss": (lambda lp, old, adv: losses.ppo_policy_loss(lp, old, adv, MASK, 0.2)[0], 3),
    "ppo_value_loss": (lambda v, old, ret: losses.ppo_value_loss(v, old, ret, MASK, 0.2)[0], 3),
    "ppo_policy_loss_seq_mean": (lambda lp, old, adv: losses.ppo_policy_loss(
        lp, old, adv, MASK, 0.2, 0.28, losses.aggregator("seq_mean_token_mean"))[0], 3),
    "ppo_value_loss_sum_norm": (lambda v, old, ret: losses.ppo_value_loss(
        v, old, ret, MASK, 0.2, losses.aggregator("seq_mean_token_sum_norm", T))[0], 3),
    "whiten": (lambda x: jnp.sum(losses.whiten(x, MASK) * jnp.arange(B * T).reshape(B, T)), 1),
    "whiten_scale_only": (lambda x: jnp.sum(losses.whiten(x, MASK, False) * jnp.arange(B * T).reshape(B, T)), 1),
    "explained_variance": (lambda v, ret: losses.explained_variance(v, ret, MASK), 2),
    "gae": (lambda r, v: jnp.sum(losses.gae(r, v, MASK, 0.9, 0.8)[0] * jnp.arange(B * T).reshape(B, T)), 2),
    "token_rewards": (lambda kl: jnp.sum(losses.token_rewards(jnp.ones(B), kl, MASK, 0.1) ** 2), 1),
}


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("pad", [np.nan, np.inf, -np.inf])
def test_padding_never_reaches_gradients(case, pad):
    """NaN / inf in the padding of every input: the same value and gradients as zero padding, and gradients of
    exactly 0 at padding (masking only an output would leave 0 * NaN there, and in reductions over the row)."""
    fn, n = GRAD_CASES[case]
    rng = np.random.default_rng(1)
    clean = [padded(rng, 0.0, scale=0.5, shift=-2.0) for _ in range(n)]
    dirty = [np.where(PAD, np.float32(pad), x) for x in clean]
    f = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(n))))
    want, want_grads = f(*map(jnp.asarray, clean))
    got, got_grads = f(*map(jnp.asarray, dirty))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        assert np.all(np.asarray(g)[PAD] == 0.0)


def test_token_rewards_kl_coef_gradient_ignores_padding():
    rng = np.random.default_rng(2)
    kl = padded(rng, np.nan)
    grad = jax.grad(lambda c: jnp.sum(losses.token_rewards(jnp.ones(B), jnp.asarray(kl), MASK, c)))(0.1)
    np.testing.assert_allclose(grad, -np.nansum(kl.astype(np.float64)), rtol=1e-5)


def test_entropy_of_impossible_tokens():
    """-inf logits (tokens ruled out, e.g. by a vocab mask) at masked-in positions count 0 * log 0 = 0: the entropy
    and its gradient are those of the remaining tokens, not NaN."""
    rng = np.random.default_rng(3)
    logits = (2 * rng.standard_normal((B, T, V))).astype(np.float32)
    banned = np.zeros((B, T, V), bool)
    banned[..., :3] = True  # the first three tokens everywhere
    f = jax.value_and_grad(losses.entropy)
    got, got_grad = f(jnp.asarray(np.where(banned, -np.inf, logits)), jnp.asarray(MASK))
    want, want_grad = f(jnp.asarray(logits[..., 3:]), jnp.asarray(MASK))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(got_grad))) and np.all(np.asarray(got_grad)[banned] == 0.0)
    np.testing.assert_allclose(np.asarray(got_grad)[..., 3:], want_grad, rtol=1e-5, atol=1e-7)
