"""RL from the SFT run: PPO with a KL penalty to the frozen reference (InstructGPT), and GRPO and its variants.

One iteration is a rollout then an update. The rollout (llmjax.train.rollout) samples answers to a batch of prompt
records (the synthetic tasks, or a files:/tfds: source's), scores them with ppo.reward (a reward model run, the
tasks' checkers, built-in verifiers, a user's function, or a weighted sum of them; llmjax.rewards), and computes
the reference's log-probs and the values; PPO adds the per-token KL penalty to the reward and takes GAE
advantages, GRPO takes each prompt's K scores against their group's baseline (its mean, or RLOO's leave-one-out
mean), scaled by the group's std unless ppo.scale_rewards=False (Dr. GRPO). The update is the usual
step(state, batch) -> (state, metrics), jitted once: ppo.epochs passes over ppo.minibatches minibatches of the
rollout with the clipped policy loss (clip-higher: ppo.clip_high above ppo.clip_low, DAPO) (+ the clipped value
loss and an entropy bonus for PPO, + for GRPO the KL to the reference, estimated as ppo.kl_estimator says), every
term averaged as ppo.loss_agg says (token mean, DAPO; sequence mean of token means, GRPO; Dr. GRPO's constant).

Parameters: {"policy": a language model, "value": a reward-model-shaped value model (ppo.value=separate,
initialised from the reward model, or from the SFT trunk when no reward model scores) or "value_head": a head on
the policy's own trunk (ppo.value=shared)}; GRPO has no value function. The adaptive KL coefficient
(ppo.target_kl) lives in the train state, so a resumed run carries it on.
"""
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llmjax import losses, rewards, sampling
from llmjax.config import check_choices, check_ranges
from llmjax.data import prompts, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.evaluate import make_evaluator
from llmjax.models import heads, lora, moe, transformer
from llmjax.sharding import Constrain
from llmjax.train.common import Context, Definition, Objective, lm_flops
from llmjax.train.rollout import Rollout
from llmjax.train.state import TrainState
from llmjax.train.step import advance


def token_logprobs(params, rows: dict, cfg, constrain: Constrain) -> tuple[jax.Array, transformer.Output]:
    """(logp_BT of the targets, masked; the forward's output) of a language model on rows, its logits those the
    rollout samples from: over the tokenizer's ids, divided by ppo.temperature (as TRL and verl do), so that the
    ratio, the KL to the reference and the entropy are all the sampling policy's at any temperature."""
    out = transformer.forward(params, rows["inputs"], rows["positions"], rows["segment_ids"], cfg.model, constrain)
    logits_BTV = sampling.limit_vocab(out.logits_BTV, get_tokenizer(cfg.data.tokenizer).vocab_size)
    out = out._replace(logits_BTV=logits_BTV / cfg.ppo.temperature)
    return losses.sequence_logprobs(out.logits_BTV, rows["targets"], rows["loss_mask"]), out


def value_estimates(params, rows: dict, h_BTD: jax.Array | None, cfg, constrain: Constrain) -> tuple[jax.Array, dict]:
    """V_BT: the separate value model on rows (with its MoE statistics), or the shared head on the policy's hidden
    states h_BTD."""
    if cfg.ppo.value == "separate":
        return heads.values(params["value"], rows, cfg.model, constrain)
    return heads.apply(params["value_head"], h_BTD), {}


def aggregate(cfg):
    """How every term of the loss averages over the rollout's tokens (ppo.loss_agg)."""
    return losses.aggregator(cfg.ppo.loss_agg, cfg.ppo.max_new_tokens)


def _gae(params, rows: dict, scores_B: jax.Array, kl_BT: jax.Array, kl_coef: jax.Array, cfg,
         constrain: Constrain) -> tuple[dict, jax.Array, jax.Array, jax.Array, dict]:
    """PPO's experience: the value model's estimates, the per-token KL penalty on the reward, GAE advantages."""
    p, mask = cfg.ppo, rows["loss_mask"]
    h = token_logprobs(params["policy"], rows, cfg, constrain)[1].h_BTD if p.value == "shared" else None
    values = value_estimates(params, rows, h, cfg, constrain)[0] * mask
    rewards_BT = losses.token_rewards(scores_B, kl_BT, mask, kl_coef)
    advantages, returns = losses.gae(rewards_BT, values, mask, p.gamma, p.lam)
    if p.whiten:
        advantages = losses.whiten(advantages, mask)
    return rows, values, advantages, returns, {}


def _grouped(params, rows: dict, scores_B: jax.Array, kl_BT: jax.Array, kl_coef: jax.Array, cfg,
             constrain: Constrain) -> tuple[dict, jax.Array, jax.Array, jax.Array, dict]:
    """GRPO's experience: each answer's score against its group's baseline; dynamic sampling takes the groups whose
    answers all scored alike out of the loss mask (no gradient from them)."""
    p, mask, metrics = cfg.ppo, rows["loss_mask"], {}
    advantages_B = losses.group_advantages(scores_B, p.group_size, scale=p.scale_rewards, baseline=p.baseline)
    if p.dynamic_sampling:
        kept_B = ~losses.unanimous_groups(scores_B, p.group_size)
        metrics["groups_kept"] = jnp.mean(kept_B.astype(jnp.float32))
        rows = rows | {"loss_mask": mask * kept_B[:, None]}
    advantages = advantages_B[:, None] * rows["loss_mask"]
    return rows, jnp.zeros_like(mask), advantages, advantages, metrics


def _value_term(params, mb: dict, logp_BT: jax.Array, out: transformer.Output, entropy: jax.Array, cfg,
                constrain: Constrain) -> tuple[jax.Array, dict]:
    """PPO's loss beside the clipped policy loss: the clipped value loss and the entropy bonus (and the separate
    value model's router losses)."""
    p, mask, agg = cfg.ppo, mb["loss_mask"], aggregate(cfg)
    values, value_stats = value_estimates(params, mb, out.h_BTD, cfg, constrain)
    value_loss, aux = losses.ppo_value_loss(values, mb["old_values"], mb["returns"], mask, p.value_clip_eps, agg)
    aux |= {"value_loss": value_loss,
            "explained_variance": losses.explained_variance(mb["old_values"], mb["returns"], mask)}
    return p.vf_coef * value_loss - p.entropy_coef * entropy + moe.loss(value_stats, cfg.model)[0], aux


def _kl_term(params, mb: dict, logp_BT: jax.Array, out: transformer.Output, entropy: jax.Array, cfg,
             constrain: Constrain) -> tuple[jax.Array, dict]:
    """GRPO's loss beside the clipped policy loss: the KL to the reference, estimated as ppo.kl_estimator says."""
    kl = aggregate(cfg)(losses.kl_estimate(logp_BT, mb["ref_logp"], cfg.ppo.kl_estimator), mb["loss_mask"])
    return cfg.ppo.kl_coef * kl, {"kl_loss": kl}


def _critic(cfg) -> dict:
    """PPO's value function: a reward-model-shaped value model, or a head on the policy's trunk."""
    return {"value": heads.specs(cfg.model)} if cfg.ppo.value == "separate" else {
        "value_head": heads.specs(cfg.model)["head"]}


def _no_groups(p) -> None:
    """PPO's advantages come from its value model: the keys that shape group advantages must stay at default."""
    grouped = {"ppo.scale_rewards": p.scale_rewards is not True, "ppo.baseline": p.baseline != "mean",
               "ppo.dynamic_sampling": p.dynamic_sampling}
    changed = [key for key, differs in grouped.items() if differs]
    if changed:
        raise LlmjaxError(f"{changed[0]} shapes GRPO's group advantages; PPO's come from its value model: set "
                          "--config.ppo.algorithm=grpo or leave it at its default")


def _groups(p) -> None:
    """GRPO normalises within groups, and its KL is a loss term of fixed weight."""
    if p.group_size < 2:
        raise LlmjaxError(f"ppo.group_size={p.group_size}: GRPO normalises over K >= 2 samples per prompt")
    if p.target_kl:
        raise LlmjaxError("ppo.target_kl adapts PPO's KL penalty on the reward; GRPO's KL term in the loss has the "
                          "fixed weight ppo.kl_coef: set --config.ppo.target_kl=0")


class Algorithm(NamedTuple):
    """What PPO and GRPO do differently: everything else in this file is theirs alike."""

    advantages: Callable  # experience: (params, rows, scores_B, kl_BT, kl_coef, cfg, constrain) -> rows, values, ...
    term: Callable  # the loss beside the clipped policy loss: (params, mb, logp, out, entropy, cfg, constrain) -> ...
    layout: Callable[[object], dict]  # parameters beside the policy
    group: Callable[[object], int]  # answers per prompt
    meaning: tuple[str, ...]  # keys beside ppo.algorithm that change what the parameters mean
    check: Callable[[object], None]  # refuses (cfg.ppo) settings that mean nothing under this algorithm


ALGORITHMS = {
    "ppo": Algorithm(_gae, _value_term, _critic, lambda cfg: 1, ("ppo.value",), _no_groups),
    "grpo": Algorithm(_grouped, _kl_term, lambda cfg: {}, lambda cfg: cfg.ppo.group_size, (), _groups),
}


def experience(params, reference, rows: dict, scores_B: jax.Array, kl_coef: jax.Array, cfg,
               constrain: Constrain) -> tuple[dict, dict]:
    """Reference log-probs, values, rewards and advantages of a rollout (by ppo.algorithm's estimator); returns
    (rows + them, metrics)."""
    p, mask = cfg.ppo, rows["loss_mask"]
    ref_logp, _ = token_logprobs(reference, rows, cfg, constrain)
    kl_BT = losses.kl_estimate(rows["old_logp"], ref_logp, p.kl_estimator) * mask
    rows, values, advantages, returns, metrics = ALGORITHMS[p.algorithm].advantages(params, rows, scores_B, kl_BT,
                                                                                    kl_coef, cfg, constrain)
    kl_B = jnp.sum(kl_BT, axis=-1)
    metrics |= {"score": jnp.mean(scores_B), "reward_with_kl": jnp.mean(scores_B - kl_coef * kl_B),
                "kl_to_ref": jnp.mean(kl_B), "kl_coef": kl_coef, "response_length": jnp.mean(jnp.sum(mask, -1))}
    batch = rows | {"ref_logp": ref_logp, "old_values": values, "advantages": advantages, "returns": returns,
                    "kl": kl_B}
    return batch, metrics


def loss_fn(params, mb: dict, cfg, constrain: Constrain) -> tuple[jax.Array, dict]:
    p, mask, agg = cfg.ppo, mb["loss_mask"], aggregate(cfg)
    logp, out = token_logprobs(params["policy"], mb, cfg, constrain)
    loss, aux = losses.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mask, p.clip_low, p.clip_high, agg)
    aux["entropy"] = losses.entropy(out.logits_BTV, mask, agg)
    aux["policy_loss"] = loss
    router_loss, router = moe.loss(out.moe, cfg.model)
    term, term_aux = ALGORITHMS[p.algorithm].term(params, mb, logp, out, aux["entropy"], cfg, constrain)
    return loss + term + router_loss, aux | router | term_aux


def epochs(cfg) -> Callable:
    """(update, lr) -> step(state, rollout) -> (state, metrics): ppo.epochs passes over ppo.minibatches shuffled
    minibatches, each minibatch one call of the shared update (over optim.grad_accum microbatches)."""
    p = cfg.ppo

    def schedule(update: Callable, lr) -> Callable:
        def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
            B = batch["inputs"].shape[0]
            key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
            order = jnp.stack([jax.random.permutation(k, B) for k in jax.random.split(key, p.epochs)])
            order = order.reshape(p.epochs * p.minibatches, B // p.minibatches)
            dropout_keys = jax.random.split(jax.random.fold_in(key, 1), p.epochs * p.minibatches)

            def one(carry, xs):
                idx, dropout_key = xs
                params, opt_state, aux = update(*carry, jax.tree.map(lambda x: x[idx], batch), key=dropout_key)
                return (params, opt_state), aux

            (params, opt_state), aux = jax.lax.scan(one, (state.params, state.opt_state), (order, dropout_keys))
            metrics = jax.tree.map(jnp.mean, aux)
            extra = {}
            if p.target_kl:  # Ziegler et al.: move the KL coefficient toward the KL that was targeted
                extra["kl_coef"] = losses.adaptive_kl_coef(state.extra["kl_coef"], jnp.mean(batch["kl"]),
                                                           p.target_kl, p.kl_horizon, B)
            new, standard = advance(state, params, opt_state, metrics["nonfinite"], lr, **extra)
            return new, metrics | standard

        return step

    return schedule


def flops_per_token(cfg) -> float:
    """Per rollout token: sampling and the reference's forward, ppo.epochs updates of the policy, the reward
    model's forward (when one scores), and for PPO the value model's forward and updates (a separate one) or the
    policy's forward again for its hidden states (a shared head)."""
    p, train, forward = cfg.ppo, lm_flops(cfg), lm_flops(cfg, forward=True)
    scored_by_model = any(t.run for t in rewards.parse(p.reward, "ppo.reward"))
    total = 2 * forward + p.epochs * train + (forward if scored_by_model else 0)
    if "value" in specs(cfg):
        total += forward + p.epochs * train
    elif "value_head" in specs(cfg):
        total += forward
    return total


def specs(cfg) -> dict:
    """The policy, and what ppo.algorithm keeps beside it."""
    return {"policy": transformer.specs(cfg.model)} | ALGORITHMS[cfg.ppo.algorithm].layout(cfg)


RANGES = {
    "ppo.clip_low": ("(0, 1]", "how far below 1 a step may move the policy's probability ratio"),
    "ppo.clip_high": ("(0, inf)", "how far above 1 a step may move the policy's probability ratio"),
    "ppo.value_clip_eps": ("(0, inf)", "how far a step may move a value from the rollout's"),
    "ppo.vf_coef": ("[0, inf)", "the value loss's weight; below 0 it unlearns the values"),
    "ppo.entropy_coef": ("[0, inf)", "the entropy bonus's weight; below 0 it rewards collapse"),
    "ppo.kl_coef": ("[0, inf)", "the KL penalty's weight; below 0 it rewards leaving the reference"),
    "ppo.target_kl": ("[0, inf)", "the KL the adaptive coefficient aims at; 0 keeps ppo.kl_coef fixed"),
    "ppo.kl_horizon": ("(0, inf)", "the samples over which the adaptive KL coefficient moves; it divides by it"),
    "ppo.gamma": ("[0, 1]", "GAE's discount"),
    "ppo.lam": ("[0, 1]", "GAE's lambda"),
    "ppo.temperature": ("(0, inf)", "the rollout's sampling temperature; it divides the logits"),
    "ppo.epochs": ("[1, inf)", "passes over each rollout"),
    "ppo.minibatches": ("[1, inf)", "minibatches per pass"),
    "ppo.max_new_tokens": ("[1, inf)", "tokens per response at most"),
    "ppo.max_prompt_len": ("[1, inf)", "the prompts' padded width in tokens"),
    "ppo.overlong_buffer": ("[0, inf)", "the last tokens of ppo.max_new_tokens over which the length penalty grows"),
}


def validate(cfg, sizes: dict[str, int]) -> None:
    p = cfg.get("ppo")
    if p is None:
        raise LlmjaxError("a ppo run needs the ppo section; start from configs/ppo.py")
    check_choices(cfg, {"ppo.algorithm": tuple(ALGORITHMS), "ppo.value": ("separate", "shared"),
                        "ppo.kl_estimator": losses.KL_ESTIMATORS, "ppo.loss_agg": losses.AGGREGATIONS,
                        "ppo.baseline": losses.BASELINES})
    check_ranges(cfg, RANGES)
    if not cfg.init_from:
        raise LlmjaxError("PPO starts from an SFT run (the policy and its frozen reference): set --config.init_from")
    terms = rewards.parse(p.reward, "ppo.reward")
    if prompts.record_sources(cfg) and any(t.name == "tasks" for t in terms):
        raise LlmjaxError(f"ppo.reward={p.reward!r}: the tasks' checkers score the synthetic tasks, and data.source="
                          f"{cfg.data.source!r} holds other prompts; reward their answers with math, exact, "
                          "format:REGEX or module.path:function")
    if cfg.data.source != "synthetic" and p.tasks:
        raise LlmjaxError(f"ppo.tasks={p.tasks!r} chooses synthetic prompts, but data.source={cfg.data.source!r} "
                          "gives the prompts; set --config.ppo.tasks=''")
    if p.tasks:
        tasks.check_names("ppo.tasks", p.tasks)
    if p.overlong_buffer > p.max_new_tokens:
        raise LlmjaxError(f"ppo.overlong_buffer={p.overlong_buffer} is longer than ppo.max_new_tokens="
                          f"{p.max_new_tokens}; the penalty grows over the budget's last tokens")
    ALGORITHMS[p.algorithm].check(p)
    dp, k = sizes["data"] * sizes["expert"] * sizes["fsdp"], cfg.optim.grad_accum
    group = ALGORITHMS[p.algorithm].group(cfg)
    if cfg.batch_size % (p.minibatches * group) or cfg.batch_size // p.minibatches % (dp * k):
        raise LlmjaxError(f"batch_size={cfg.batch_size} must split into ppo.minibatches={p.minibatches} minibatches "
                          f"that divide over data*expert*fsdp*grad_accum={dp}*{k} (and whole groups of ppo.group_size="
                          f"{group})")
    if cfg.loss.z_loss:
        raise LlmjaxError("loss.z_loss applies to next-token training only; set --config.loss.z_loss=0")


def define(ctx: Context) -> Definition:
    cfg, mesh, p = ctx.cfg, ctx.mesh, ctx.cfg.ppo
    adapted = bool(lora.targets(cfg))
    given = ctx.read(cfg.init_from, "lm", "PPO's policy")
    reference = None if adapted else given()  # a LoRA policy's reference is its own base: read only to start
    rollout = Rollout(cfg, mesh, "ppo", reference, ALGORITHMS[p.algorithm].group(cfg),
                      lambda params, ref, rows, scores, kl_coef: experience(params, ref, rows, scores, kl_coef, cfg,
                                                                            ctx.constrain),
                      at_eos=lambda reward_cfg: reward_cfg.reward.read == "eos")
    evaluate = None
    if cfg.eval_every:
        evaluate_policy = make_evaluator(cfg, mesh, ctx.constrain, n=cfg.eval_prompts, on_prompts=True)
        evaluate = lambda params: evaluate_policy(params["policy"])  # noqa: E731

    def start() -> dict:
        policy = given() if reference is None else reference
        out = {"policy": policy}
        if "value" in specs(cfg):  # from the reward model, else the SFT trunk with a fresh head
            out["value"] = rollout.reward_model or {"trunk": policy}
        return out

    # A microbatch weighs what its loss averages over (ppo.loss_agg: tokens or answers), so accumulation is exact.
    return Definition(loss=partial(loss_fn, cfg=cfg, constrain=ctx.constrain), source=rollout,
                      weight=lambda mb: losses.aggregation_weight(mb["loss_mask"], p.loss_agg), start=start,
                      evaluate=evaluate, extra={"kl_coef": p.kl_coef}, schedule=epochs(cfg))


OBJECTIVE = Objective("ppo", define, validate, layout=specs, flops_per_token=flops_per_token,
                      parts={"lm": ("policy",)},  # the policy is a language model; the value function is PPO's own
                      meaning=lambda cfg: ("ppo.algorithm", *ALGORITHMS[cfg.ppo.algorithm].meaning), prompts=True,
                      reference=lambda cfg: True)
