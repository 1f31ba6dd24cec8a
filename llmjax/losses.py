"""Losses as pure functions of arrays: each returns (scalar loss, aux dict of scalars)."""

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, z_loss: float = 0.0,
                  normalizer: jax.Array | float | None = None) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy over the tokens where mask_BT is 1, plus PaLM's z-loss
    (z_loss * log(Z)^2, which keeps the softmax normaliser near 1 for stability).

    Divides by `normalizer` (default: the number of masked-in tokens); passing the whole batch's token
    count makes microbatch losses sum exactly to the full-batch loss under gradient accumulation.
    """
    logits = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    mask = mask_BT.astype(jnp.float32)
    n = jnp.sum(mask) if normalizer is None else normalizer
    n = jnp.maximum(n, 1.0)
    ce = jnp.sum((log_z_BT - target_logit_BT) * mask) / n
    zl = z_loss * jnp.sum(jnp.square(log_z_BT) * mask) / n
    return ce + zl, {"ce": ce, "z_loss": zl}


def sequence_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Per-token log p(target) where mask is 1, else 0: sum over a response's tokens for its sequence log-prob."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0] * mask_BT


def bradley_terry(chosen_B: jax.Array, rejected_B: jax.Array, margin: jax.Array | float = 0.0,
                  weight_B: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Reward-model loss -log sigmoid(r_chosen - r_rejected - margin) (InstructGPT; Llama 2's margin), a
    weighted mean over pairs (a ranked list of K gives each of its C(K,2) pairs weight 1/C(K,2))."""
    diff_B = chosen_B - rejected_B
    weight_B = jnp.ones_like(diff_B) if weight_B is None else weight_B
    loss = jnp.sum(-jax.nn.log_sigmoid(diff_B - margin) * weight_B) / jnp.maximum(jnp.sum(weight_B), 1e-9)
    aux = {"accuracy": jnp.sum((diff_B > 0) * weight_B) / jnp.maximum(jnp.sum(weight_B), 1e-9),
           "margin": jnp.mean(diff_B), "reward_mean": jnp.mean(jnp.concatenate([chosen_B, rejected_B])),
           "reward_std": jnp.std(jnp.concatenate([chosen_B, rejected_B]))}
    return loss, aux


DPO_LOSSES = ("sigmoid", "cdpo", "ipo", "hinge", "simpo")


def dpo(policy_chosen_B: jax.Array, policy_rejected_B: jax.Array, ref_chosen_B: jax.Array,
        ref_rejected_B: jax.Array, *, kind: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
        chosen_len_B: jax.Array | None = None, rejected_len_B: jax.Array | None = None,
        simpo_gamma: float = 0.5, nll_weight: float = 0.0) -> tuple[jax.Array, dict]:
    """The DPO family on sequence log-probs (sums over response tokens), mean over pairs.

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
      sigmoid  -log sigmoid(beta h)                                   DPO, Rafailov et al. 2023
      cdpo     -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)  conservative DPO, label smoothing eps
      ipo      (h - 1/(2 beta))^2                                     IPO, Azar et al. 2023 (tau = beta)
      hinge    max(0, 1 - beta h)                                     SLiC-HF, Zhao et al. 2023
      simpo    -log sigmoid(beta (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)   SimPO, Meng et al.
               2024: reference-free and length-normalised (ref log-probs are ignored)
    nll_weight > 0 adds nll_weight * -log pi(y_w)/|y_w| (RPO, Pang et al. 2024), which keeps the chosen
    answer's likelihood from falling along with the rejected one's.
    Metrics: implicit rewards beta * (log pi - log ref), their accuracy and margin, and the KL estimate
    mean(log pi - log ref) over chosen and rejected sequences.
    """
    chosen_ratio, rejected_ratio = policy_chosen_B - ref_chosen_B, policy_rejected_B - ref_rejected_B
    h_B = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        loss_B = -jax.nn.log_sigmoid(beta * h_B)
    elif kind == "cdpo":
        loss_B = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B) - label_smoothing * jax.nn.log_sigmoid(
            -beta * h_B)
    elif kind == "ipo":
        loss_B = jnp.square(h_B - 1 / (2 * beta))
    elif kind == "hinge":
        loss_B = jax.nn.relu(1 - beta * h_B)
    elif kind == "simpo":
        loss_B = -jax.nn.log_sigmoid(beta * (policy_chosen_B / chosen_len_B - policy_rejected_B / rejected_len_B)
                                     - simpo_gamma)
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; choose one of {DPO_LOSSES}")
    if nll_weight:
        loss_B = loss_B - nll_weight * policy_chosen_B / chosen_len_B
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    aux = {"reward_chosen": jnp.mean(chosen_reward), "reward_rejected": jnp.mean(rejected_reward),
           "reward_accuracy": jnp.mean(chosen_reward > rejected_reward),
           "reward_margin": jnp.mean(chosen_reward - rejected_reward),
           "kl": 0.5 * jnp.mean(chosen_ratio + rejected_ratio)}
    return jnp.mean(loss_B), aux
