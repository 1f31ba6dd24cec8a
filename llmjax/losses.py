"""Losses as pure functions of arrays: each returns (scalar loss, aux dict of scalars).

Masked-out positions never enter the arithmetic: their inputs are replaced (`jnp.where`, not a product) before
any use, so padding that holds -100 targets or NaN/inf values reaches neither the values nor the gradients.
"""

import dataclasses

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, z_loss: float = 0.0,
                  normalizer: jax.Array | float | None = None) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy over the tokens where mask_BT is 1, plus PaLM's z-loss
    (z_loss * log(Z)^2, which keeps the softmax normaliser near 1 for stability).

    Divides by `normalizer` (default: the number of masked-in tokens); passing the whole batch's token
    count makes microbatch losses sum exactly to the full-batch loss under gradient accumulation.
    Masked positions never enter the arithmetic: their targets (e.g. -100) and logits (even NaN/inf) are
    swapped for safe values first, so neither the loss nor the gradients can see them.
    """
    m_BT = mask_BT > 0
    logits, targets = _safe_logits_and_targets(logits_BTV, targets_BT, m_BT)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask_BT.astype(jnp.float32)
    n = jnp.sum(mask) if normalizer is None else normalizer
    n = jnp.maximum(n, 1.0)
    ce = jnp.sum(jnp.where(m_BT, (log_z_BT - target_logit_BT) * mask, 0.0)) / n
    zl = z_loss * jnp.sum(jnp.where(m_BT, jnp.square(log_z_BT) * mask, 0.0)) / n
    return ce + zl, {"ce": ce, "z_loss": zl}


def sequence_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Per-token log p(target) where mask is 1, else 0: sum over a response's tokens for its sequence log-prob.
    Masked targets (e.g. -100) and logits (even NaN/inf) never reach the result or its gradient."""
    m_BT = mask_BT > 0
    logits, targets = _safe_logits_and_targets(logits_BTV, targets_BT, m_BT)
    logp_BTV = jax.nn.log_softmax(logits, axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, targets[..., None], axis=-1)[..., 0]
    return jnp.where(m_BT, logp_BT * mask_BT, 0.0)


def _safe_logits_and_targets(logits_BTV: jax.Array, targets_BT: jax.Array,
                             m_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 logits and targets with masked positions set to 0: an out-of-range gather is NaN in JAX, and a
    NaN/inf row must be replaced before log-softmax, since masking only its output still leaves NaN gradients."""
    logits = jnp.where(m_BT[..., None], logits_BTV.astype(jnp.float32), 0.0)
    return logits, jnp.where(m_BT, targets_BT, 0)


def bradley_terry(chosen_B: jax.Array, rejected_B: jax.Array, margin: jax.Array | float = 0.0,
                  weight_B: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Reward-model loss -log sigmoid(r_chosen - r_rejected - margin) (InstructGPT; Llama 2's margin), a
    weighted mean over pairs (a ranked list of K gives each of its C(K,2) pairs weight 1/C(K,2))."""
    diff_B = chosen_B - rejected_B
    weight_B = jnp.ones_like(diff_B) if weight_B is None else weight_B
    on_B = weight_B > 0
    diff_B = jnp.where(on_B, diff_B, 0.0)  # a weight-0 pair's scores (even NaN) reach neither loss nor gradient

    def mean(x_B):
        return jnp.sum(jnp.where(on_B, x_B * weight_B, 0.0)) / jnp.maximum(jnp.sum(weight_B), 1e-9)

    return mean(-jax.nn.log_sigmoid(diff_B - margin)), {"accuracy": mean(diff_B > 0), "margin": mean(diff_B)}


DPO_LOSSES = ("sigmoid", "cdpo", "ipo", "hinge", "simpo")


def dpo(policy_chosen_B: jax.Array, policy_rejected_B: jax.Array, ref_chosen_B: jax.Array,
        ref_rejected_B: jax.Array, *, kind: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
        chosen_len_B: jax.Array | None = None, rejected_len_B: jax.Array | None = None,
        simpo_gamma: float = 0.5, nll_weight: float = 0.0) -> tuple[jax.Array, dict]:
    """The DPO family on sequence log-probs (sums over response tokens), mean over pairs.

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), eps = label_smoothing:
      sigmoid  -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)  DPO, Rafailov et al. 2023; eps > 0 is
               conservative DPO (cDPO: labels flipped with probability eps), as in TRL's sigmoid loss
      cdpo     the same as sigmoid (kept as a name for existing configs)
      ipo      (h - 1/(2 beta))^2                                     IPO, Azar et al. 2023 (tau = beta)
      hinge    max(0, 1 - beta h)                                     SLiC-HF, Zhao et al. 2023
      simpo    -log sigmoid(beta (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)   SimPO, Meng et al.
               2024: reference-free and length-normalised (ref log-probs are ignored)
    nll_weight > 0 adds nll_weight * -log pi(y_w)/|y_w| (RPO, Pang et al. 2024), which keeps the chosen
    answer's likelihood from falling along with the rejected one's.
    label_smoothing means nothing to ipo/hinge/simpo, so a nonzero one raises there rather than being ignored.
    Metrics: implicit rewards beta * (log pi - log ref), their accuracy and margin, and the KL estimate
    mean(log pi - log ref) over chosen and rejected sequences.
    """
    if kind not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {kind!r}; choose one of {DPO_LOSSES}")
    if label_smoothing and kind not in ("sigmoid", "cdpo"):
        raise ValueError(f"label_smoothing applies to the sigmoid/cdpo losses only, not {kind!r}; "
                         f"got label_smoothing={label_smoothing}")
    chosen_ratio, rejected_ratio = policy_chosen_B - ref_chosen_B, policy_rejected_B - ref_rejected_B
    h_B = chosen_ratio - rejected_ratio
    if kind in ("sigmoid", "cdpo"):
        loss_B = -jax.nn.log_sigmoid(beta * h_B)
        if label_smoothing:  # a Python branch: eps = 0 is plain DPO bit for bit
            loss_B = (1 - label_smoothing) * loss_B - label_smoothing * jax.nn.log_sigmoid(-beta * h_B)
    elif kind == "ipo":
        loss_B = jnp.square(h_B - 1 / (2 * beta))
    elif kind == "hinge":
        loss_B = jax.nn.relu(1 - beta * h_B)
    else:  # simpo
        loss_B = -jax.nn.log_sigmoid(beta * (policy_chosen_B / chosen_len_B - policy_rejected_B / rejected_len_B)
                                     - simpo_gamma)
    if nll_weight:
        loss_B = loss_B - nll_weight * policy_chosen_B / chosen_len_B
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    aux = {"reward_chosen": jnp.mean(chosen_reward), "reward_rejected": jnp.mean(rejected_reward),
           "reward_accuracy": jnp.mean(chosen_reward > rejected_reward),
           "reward_margin": jnp.mean(chosen_reward - rejected_reward),
           "kl": 0.5 * jnp.mean(chosen_ratio + rejected_ratio)}
    return jnp.mean(loss_B), aux


# --- RL: PPO (Schulman et al. 2017) with a KL penalty to a frozen reference (InstructGPT), and GRPO ---------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x where mask is 1; `where`, not a product, so NaN/inf in padding cannot leak in."""
    m = mask > 0
    return jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(jnp.sum(m), 1)


def _masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance of x over the masked-in entries."""
    x = _zero_padding(mask, x)  # else square's gradient at padding is 0 * NaN
    return _masked_mean(jnp.square(x - _masked_mean(x, mask)), mask)


def _zero_padding(mask: jax.Array, x: jax.Array) -> jax.Array:
    """x as float32 with 0 where mask is 0. Applied to inputs before any arithmetic: masking only the output
    drops padding from the value, but its gradient would still be 0 * NaN = NaN there."""
    return jnp.where(mask > 0, x.astype(jnp.float32), 0.0)


def kl_estimate(logp_BT: jax.Array, ref_logp_BT: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token estimators of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL
    divergence", 2020), with log r = log ref - log pi:
      k1 = -log r               unbiased, high variance, can be negative
      k2 = (log r)^2 / 2        biased (little when pi ~ ref), low variance, >= 0
      k3 = (r - 1) - log r      unbiased and >= 0 (r - 1 is a zero-mean control variate); GRPO's KL term
    """
    log_r = ref_logp_BT.astype(jnp.float32) - logp_BT.astype(jnp.float32)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * jnp.square(log_r)
    if kind == "k3":
        return jnp.expm1(log_r) - log_r  # expm1: no float32 cancellation near r = 1
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {KL_ESTIMATORS}")


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float | jax.Array,
        lam: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), a reverse scan over time:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  returns R_t = A_t + V_t.

    mask_BT is 1 on a row's response tokens (a contiguous run; rows that end early are 0 after their end).
    The episode ends at the last valid token, so V and A beyond it count as 0; padding (even NaN) never
    reaches a valid position, and advantages and returns are 0 there.
    """
    m_TB = (mask_BT > 0).T
    r_TB = jnp.where(m_TB, rewards_BT.astype(jnp.float32).T, 0.0)
    v_TB = jnp.where(m_TB, values_BT.astype(jnp.float32).T, 0.0)

    def step(carry, xs):
        next_v_B, next_a_B = carry  # both already 0 past a row's end
        r_B, v_B, m_B = xs
        a_B = jnp.where(m_B, r_B + gamma * next_v_B - v_B + gamma * lam * next_a_B, 0.0)
        return (v_B, a_B), a_B

    zeros_B = jnp.zeros(m_TB.shape[1], jnp.float32)
    _, a_TB = jax.lax.scan(step, (zeros_B, zeros_B), (r_TB, v_TB, m_TB), reverse=True)
    advantages_BT = a_TB.T
    return advantages_BT, jnp.where(mask_BT > 0, advantages_BT + v_TB.T, 0.0)


def whiten(x_BT: jax.Array, mask_BT: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked-in entries (population variance), 0 at padding: PPO's advantage
    normalisation, which makes the policy step size independent of the reward scale. shift_mean=False
    only rescales (keeps the mean), as in TRL/InstructGPT's reward whitening."""
    x = _zero_padding(mask_BT, x_BT)
    mean, var = _masked_mean(x, mask_BT), _masked_var(x, mask_BT)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask_BT > 0, out, 0.0)


AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclasses.dataclass(frozen=True)
class Aggregator:
    """agg(x_BT, mask_BT) -> scalar: how per-token terms become a batch's loss; made by `aggregator`. Frozen, so
    equal settings hash alike (one compile as a static jit argument)."""
    mode: str = "token_mean"
    max_len: int | None = None

    def __post_init__(self):
        _check_aggregation(self.mode)
        if self.mode == "seq_mean_token_sum_norm" and (self.max_len is None or self.max_len < 1):
            raise ValueError(f"seq_mean_token_sum_norm divides by the generation budget; got max_len={self.max_len}")

    def __call__(self, x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
        if self.mode == "token_mean":
            return _masked_mean(x_BT, mask_BT)
        m_BT = mask_BT > 0
        n_B = jnp.sum(m_BT, axis=-1)
        sum_B = jnp.sum(jnp.where(m_BT, x_BT, 0.0), axis=-1)
        seq_B = sum_B / (jnp.maximum(n_B, 1) if self.mode == "seq_mean_token_mean" else self.max_len)
        return jnp.sum(seq_B) / jnp.maximum(jnp.sum(n_B > 0), 1)  # an empty row adds 0 and is not counted

    def metric(self, x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
        """A mean of x over the units this mode's weight counts: the token mean, or for both sequence modes the
        mean of per-sequence means. Exact under grad accumulation like the loss, and still a mean of x (a
        fraction stays a fraction) where the loss is a sum over a budget."""
        return (self if self.mode == "token_mean" else Aggregator("seq_mean_token_mean"))(x_BT, mask_BT)


def _check_aggregation(mode: str) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}")


def aggregator(mode: str, max_len: int | None = None) -> Aggregator:
    """The loss aggregation the RL objectives disagree on, for per-token terms x_BT (0/1 mask_BT):
      token_mean               sum over all valid tokens / their number: every token weighs the same (DAPO,
                               Yu et al. 2025, sec. 3.3), so long responses are not under-weighted
      seq_mean_token_mean      each sequence's mean over its tokens, then the mean over sequences (GRPO, Shao et
                               al. 2024, eq. 3): a token of a short response weighs more
      seq_mean_token_sum_norm  each sequence's token sum / max_len (the generation budget, a constant), then the
                               mean over sequences (Dr. GRPO, Liu et al. 2025): no length bias
    Sequence means count only rows with a valid token: a row masked out entirely (dropped by dynamic sampling)
    neither contributes nor dilutes. Padding (even NaN) reaches neither the value nor the gradient of x.
    max_len matters only to seq_mean_token_sum_norm, which requires it."""
    return Aggregator(mode, max_len if mode == "seq_mean_token_sum_norm" else None)


def aggregation_weight(mask_BT: jax.Array, mode: str) -> jax.Array:
    """The number of units an aggregate averages over: valid tokens (token_mean) or rows with a valid token
    (sequence modes). Microbatch aggregates weighed by it (llmjax.train.step.grads' `weight`) average to exactly
    the whole batch's aggregate."""
    _check_aggregation(mode)
    m_BT = mask_BT > 0
    return jnp.sum(m_BT) if mode == "token_mean" else jnp.sum(jnp.any(m_BT, axis=-1))


def ppo_policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, advantages_BT: jax.Array, mask_BT: jax.Array,
                    clip_low: float = 0.2, clip_high: float | None = None,
                    agg: Aggregator | None = None) -> tuple[jax.Array, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated and aggregated by `agg` (default: the mean
    over masked-in tokens): -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) with r = pi / pi_old. The min is
    a pessimistic bound, so the gradient vanishes where moving r further outside the range would only help the
    objective. clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025, sec. 3.1): a token with A > 0 may gain
    more probability before its gradient stops, which keeps unlikely tokens explorable (less entropy collapse);
    clip_high=None is the symmetric clip_low.

    aux, each an `agg.metric` (a token mean, or a mean of per-sequence means for the sequence modes): clip_frac
    (the clipped term is the one taken), approx_kl (k3 estimate of KL(pi_old || pi): the tokens were sampled from
    pi_old), ratio_mean.
    """
    agg = Aggregator() if agg is None else agg
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = _zero_padding(mask_BT, logp_BT) - _zero_padding(mask_BT, old_logp_BT)
    ratio = jnp.exp(log_ratio)
    adv = _zero_padding(mask_BT, advantages_BT)
    unclipped, clipped = -adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = agg(jnp.maximum(unclipped, clipped), mask_BT)
    aux = {"clip_frac": agg.metric((clipped > unclipped).astype(jnp.float32), mask_BT),
           "approx_kl": agg.metric(jax.lax.stop_gradient(jnp.expm1(log_ratio) - log_ratio), mask_BT),
           "ratio_mean": agg.metric(jax.lax.stop_gradient(ratio), mask_BT)}
    return loss, aux


def ppo_value_loss(values_BT: jax.Array, old_values_BT: jax.Array, returns_BT: jax.Array, mask_BT: jax.Array,
                   clip_eps: float = 0.2, agg: Aggregator | None = None) -> tuple[jax.Array, dict]:
    """Clipped value loss (PPO2 baselines; InstructGPT): 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps)
    - R)^2), aggregated by `agg` (default: token mean), so one update cannot move the value far from the
    rollout's estimate. aux: value_clip_frac (the clipped error is the larger one), an `agg.metric`."""
    agg = Aggregator() if agg is None else agg
    v, v_old, ret = (_zero_padding(mask_BT, a) for a in (values_BT, old_values_BT, returns_BT))
    err, err_clipped = jnp.square(v - ret), jnp.square(jnp.clip(v, v_old - clip_eps, v_old + clip_eps) - ret)
    loss = 0.5 * agg(jnp.maximum(err, err_clipped), mask_BT)
    return loss, {"value_clip_frac": agg.metric((err_clipped > err).astype(jnp.float32), mask_BT)}


def entropy(logits_BTV: jax.Array, mask_BT: jax.Array, agg: Aggregator | None = None) -> jax.Array:
    """Per-token entropy -sum_v p log p of the softmax (float32), aggregated by `agg` (default: token mean) like
    the loss it joins as PPO's bonus (under seq_mean_token_sum_norm: a sum per budget token, below the per-token
    mean); also a collapse detector. Masked rows' logits (even NaN/inf) are replaced before the softmax, and
    p log p counts as 0 where p = 0 (a -inf logit), so neither gives NaN values or gradients."""
    m_BT = mask_BT > 0
    logp_BTV = jax.nn.log_softmax(jnp.where(m_BT[..., None], logits_BTV.astype(jnp.float32), 0.0), axis=-1)
    p_BTV = jnp.exp(logp_BTV)
    logp_BTV = jnp.where(p_BTV > 0, logp_BTV, 0.0)  # else 0 * -inf, and its gradient, would be NaN
    return (Aggregator() if agg is None else agg)(-jnp.sum(p_BTV * logp_BTV, axis=-1), mask_BT)


def explained_variance(values_BT: jax.Array, returns_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """1 - Var(R - V) / Var(R) over masked-in entries: 1 for a perfect critic, 0 for one that predicts the mean,
    negative for a worse one. 0 when the returns have no variance."""
    ret = _zero_padding(mask_BT, returns_BT)
    var_r = _masked_var(ret, mask_BT)
    ev = 1.0 - _masked_var(ret - _zero_padding(mask_BT, values_BT), mask_BT) / jnp.where(var_r > 0, var_r, 1.0)
    return jnp.where(var_r > 0, ev, 0.0)


BASELINES = ("mean", "leave_one_out")


def _groups(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """[G, C] view of rows that come in consecutive groups of C = group_size samples of one prompt."""
    n = rewards_B.shape[0]
    if group_size < 2 or n % group_size:
        raise ValueError(f"group_size must be >= 2 and divide the batch; got {group_size} for {n} rows")
    return rewards_B.reshape(n // group_size, group_size)


def group_advantages(rewards_B: jax.Array, group_size: int, eps: float = 1e-6, scale: bool = True,
                     baseline: str = "mean") -> jax.Array:
    """Critic-free outcome advantages from rows in consecutive groups of K = group_size samples of one prompt:
      mean           A_i = r_i - mean_j r_j                 GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1.2)
      leave_one_out  A_i = r_i - mean_{j != i} r_j          RLOO (Kool et al. 2019; Ahmadian et al. 2024): a
                     baseline independent of sample i, so the gradient estimate stays unbiased (= K/(K-1) x mean's)
    scale divides by the group's sample (ddof=1) std + eps, as in TRL/verl/OpenRLHF; scale=False leaves it out
    (Dr. GRPO, Liu et al. 2025: dividing by std up-weights near-unanimous groups)."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    r_GC = _groups(rewards_B.astype(jnp.float32), group_size)
    # exactly 0 for a unanimous group: float32 r - mean can be ~1e-7 off, which / (std + eps) would blow up
    adv_GC = jnp.where(_unanimous_G1(r_GC), 0.0, r_GC - jnp.mean(r_GC, axis=1, keepdims=True))
    if baseline == "leave_one_out":  # r_i - (K mean - r_i) / (K - 1) = K / (K - 1) (r_i - mean)
        adv_GC = adv_GC * (group_size / (group_size - 1))
    if scale:
        adv_GC = adv_GC / (jnp.std(r_GC, axis=1, keepdims=True, ddof=1) + eps)
    return adv_GC.reshape(-1)


def unanimous_groups(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """bool_B: True on the rows of groups whose rewards are all exactly equal. Their group-relative advantages
    are 0, so they carry no learning signal, only dilution: DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2)
    drops them (e.g. mask them out of the loss, with a sequence aggregation or token_mean not counting them)."""
    return jnp.repeat(_unanimous_G1(_groups(rewards_B, group_size))[:, 0], group_size)


def _unanimous_G1(r_GC: jax.Array) -> jax.Array:
    return jnp.all(r_GC == r_GC[:, :1], axis=1, keepdims=True)


def overlong_penalty(lengths_B: jax.Array, ended_B: jax.Array, max_len: int, buffer: int) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, sec. 3.4, eq. 13), added to the reward: 0 up to length
    max_len - buffer, then falling linearly to -1 at length == max_len; -1 for a response the budget cut off
    (ended_B False: it would have run past max_len). max_len is the generation budget and buffer, in (0, max_len],
    the punished stretch before it, so a response is warned off the cut-off before it gets there."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"buffer must be in (0, max_len]; got buffer={buffer}, max_len={max_len}")
    ramp_B = jnp.clip((max_len - buffer - lengths_B.astype(jnp.float32)) / buffer, -1.0, 0.0)
    return jnp.where(ended_B, ramp_B, -1.0)


def adaptive_kl_coef(coef: float | jax.Array, observed_kl: float | jax.Array, target_kl: float,
                     horizon: float, n_steps: int | jax.Array) -> jax.Array:
    """Ziegler et al. 2019's proportional KL controller (sec. 2.2): coef * (1 + clip(KL/KL_target - 1, -0.2,
    0.2) * n_steps / horizon). Raises beta when the policy drifts past the target KL, lowers it below;
    n_steps is the number of samples (or steps) since the last update."""
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target_kl - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def token_rewards(scores_B: jax.Array, kl_BT: jax.Array, mask_BT: jax.Array,
                  kl_coef: float | jax.Array) -> jax.Array:
    """InstructGPT's (Ouyang et al. 2022, eq. 2; Stiennon et al. 2020) per-token reward: -kl_coef * KL_t on every
    response token, plus the reward model's scalar score at the row's last valid token; 0 at padding."""
    m = mask_BT > 0
    t = m.shape[1]
    last_B = t - 1 - jnp.argmax(m[:, ::-1], axis=1)  # a row with no valid token gets nothing (masked below)
    at_end_BT = jnp.arange(t)[None, :] == last_B[:, None]
    rewards = -kl_coef * _zero_padding(m, kl_BT) + jnp.where(at_end_BT, scores_B.astype(jnp.float32)[:, None], 0.0)
    return jnp.where(m, rewards, 0.0)


# --- Knowledge distillation: token-level divergences between a teacher's and a student's next-token distributions ---

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def distill(student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array, mask_BT: jax.Array,
            kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
            normalizer: jax.Array | float | None = None) -> tuple[jax.Array, dict]:
    """A divergence between the teacher's p = softmax(teacher / temperature) and the student's
    q = softmax(student / temperature), summed over the vocabulary at each token, then the mean over the tokens
    where mask_BT is 1 (float32 math):
      forward_kl  KL(p || q) = sum_v p (log p - log q)   mode-covering: q must put mass wherever p does, so the
                  student spreads over all the teacher's modes (Hinton et al. 2015's KD)
      reverse_kl  KL(q || p) = sum_v q (log q - log p)   mode-seeking: q is punished only where p is small, so the
                  student may settle on one of the teacher's modes
      jsd         beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q: GKD's generalised
                  Jensen-Shannon divergence (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
                  Learning from Self-Generated Mistakes"), bounded, and interpolating between the two for beta in
                  (0, 1): ~ beta KL(p || q) as beta -> 0, ~ (1 - beta) KL(q || p) as beta -> 1
    No T^2 scaling of the loss (Hinton's factor for mixing with a hard-label loss): the gradient scale is the
    learning rate's business.

    Divides by `normalizer` (default: the number of masked-in tokens), like `cross_entropy`, so microbatch losses
    weighed by token count sum to the full-batch loss under gradient accumulation. The teacher is a target: its
    logits are under stop_gradient. Masked positions' logits (even NaN/inf) are replaced before any arithmetic,
    and p log p-style terms count as 0 where a probability underflows to 0, so neither gives NaN values or
    gradients. aux: divergence (the loss), teacher_entropy and student_entropy (token means of -sum p log p).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")
    m_BT = mask_BT > 0

    def log_probs(logits_BTV):  # padding replaced before the softmax: masking its output leaves NaN gradients
        return jax.nn.log_softmax(jnp.where(m_BT[..., None], logits_BTV.astype(jnp.float32), 0.0) / temperature,
                                  axis=-1)

    logq_BTV, logp_BTV = log_probs(student_logits_BTV), log_probs(jax.lax.stop_gradient(teacher_logits_BTV))
    q_BTV, p_BTV = jnp.exp(logq_BTV), jnp.exp(logp_BTV)

    def kl_BT(a_BTV, log_a_BTV, log_b_BTV):  # sum_v a (log a - log b), a term 0 where a = 0 (xlogy-style)
        return jnp.sum(jnp.where(a_BTV > 0, a_BTV * (log_a_BTV - log_b_BTV), 0.0), axis=-1)

    if kind == "forward_kl":
        div_BT = kl_BT(p_BTV, logp_BTV, logq_BTV)
    elif kind == "reverse_kl":
        div_BT = kl_BT(q_BTV, logq_BTV, logp_BTV)
    else:  # jsd; log m = logsumexp(log p + log beta, log q + log(1 - beta)), stable where p or q underflows
        logm_BTV = jnp.logaddexp(logp_BTV + jnp.log(beta), logq_BTV + jnp.log1p(-beta))
        div_BT = beta * kl_BT(p_BTV, logp_BTV, logm_BTV) + (1 - beta) * kl_BT(q_BTV, logq_BTV, logm_BTV)
    mask = mask_BT.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask) if normalizer is None else normalizer, 1.0)
    loss = jnp.sum(jnp.where(m_BT, div_BT * mask, 0.0)) / n

    def entropy_BT(a_BTV, log_a_BTV):
        return -jnp.sum(jnp.where(a_BTV > 0, a_BTV * log_a_BTV, 0.0), axis=-1)

    return loss, {"divergence": loss, "teacher_entropy": _masked_mean(entropy_BT(p_BTV, logp_BTV), mask_BT),
                  "student_entropy": _masked_mean(entropy_BT(q_BTV, logq_BTV), mask_BT)}
