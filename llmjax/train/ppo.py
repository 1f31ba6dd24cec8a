"""RLHF: PPO with a KL penalty to the frozen SFT reference (InstructGPT), and GRPO as a config option.

One iteration is a rollout then an update. The rollout samples responses to a batch of prompts with the KV-cache
sampler, scores them (a reward model run, or the synthetic tasks' checkers with ppo.reward=tasks), and computes
the reference's log-probs and the values; PPO adds the per-token KL penalty to the reward and takes GAE
advantages, GRPO normalises each prompt's K scores within their group. The update is the usual
step(state, batch) -> (state, metrics), jitted once: ppo.epochs passes over ppo.minibatches minibatches of the
rollout with the clipped policy loss (+ the clipped value loss and an entropy bonus for PPO, + for GRPO the KL
to the reference, estimated as ppo.kl_estimator says: k3 in configs/ppo.py).

Parameters: {"policy": a language model, "value": a reward-model-shaped value model (ppo.value=separate,
initialised from the reward model, or from the SFT trunk with ppo.reward=tasks) or "value_head": a head on the
policy's own trunk (ppo.value=shared)}; GRPO has no value function. The adaptive KL coefficient (ppo.target_kl)
lives in the train state, so a resumed run carries it on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from llmjax import checkpoint, losses, optim, sampling
from llmjax.config import ConfigError, check_choices, check_ranges
from llmjax.data import chat, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.evaluate import make_evaluator
from llmjax.models import heads, lora, moe, transformer
from llmjax.sharding import Constrain, batch_sharding, make_constrain
from llmjax.train import loop, pretrain, reward, state
from llmjax.train.state import TrainState
from llmjax.train.step import advance, make_update

PARTS = {"lm": ("policy",)}  # the policy is a language model; the value function is PPO's own


def token_logprobs(params, rows: dict, cfg, constrain: Constrain) -> tuple[jax.Array, transformer.Output]:
    """(logp_BT of the targets, masked; the forward's output) of a language model on rows, its logits over the
    tokenizer's ids (what the sampler draws from)."""
    out = transformer.forward(params, rows["inputs"], rows["positions"], rows["segment_ids"], cfg.model, constrain)
    out = out._replace(logits_BTV=sampling.limit_vocab(out.logits_BTV, get_tokenizer(cfg.data.tokenizer).vocab_size))
    return losses.sequence_logprobs(out.logits_BTV, rows["targets"], rows["loss_mask"]), out


def value_estimates(params, rows: dict, h_BTD: jax.Array | None, cfg, constrain: Constrain) -> tuple[jax.Array, dict]:
    """V_BT: the separate value model on rows (with its MoE statistics), or the shared head on the policy's hidden
    states h_BTD."""
    if cfg.ppo.value == "separate":
        return heads.values(params["value"], rows, cfg.model, constrain)
    return heads.apply(params["value_head"], h_BTD), {}


def rows_of(prompts_BP: jax.Array, lengths_B: jax.Array, out: dict, eos_id: int,
            read_eos: bool) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The rollout as training rows (next-token layout): left-padded prompt then response, the loss mask on the
    response tokens up to and including eos, old_logp (the sampler's log-probs) aligned with the targets; and
    as a reward model's rows, the whole sequence as inputs with the mask ending where the score is read (at the
    eos, or at the response's last token before it)."""
    P, R = prompts_BP.shape[1], out["tokens"].shape[1]
    seq_BT = jnp.concatenate([prompts_BP, out["tokens"]], axis=1)
    slot_BP = jnp.arange(P)[None] - (P - lengths_B[:, None])
    response_BR = jnp.arange(R)[None] < out["lengths"][:, None]
    positions = jnp.concatenate([jnp.maximum(slot_BP, 0), lengths_B[:, None] + jnp.arange(R)[None]], axis=1)
    segments = jnp.concatenate([slot_BP >= 0, response_BR], axis=1).astype(jnp.int32)
    mask_BT = jnp.concatenate([jnp.zeros_like(slot_BP, jnp.float32), response_BR.astype(jnp.float32)], axis=1)
    old_BT = jnp.concatenate([jnp.zeros_like(slot_BP, jnp.float32), out["logprobs"] * response_BR], axis=1)
    rows = {"inputs": seq_BT[:, :-1], "targets": seq_BT[:, 1:], "positions": positions[:, :-1],
            "segment_ids": segments[:, :-1], "loss_mask": mask_BT[:, 1:], "old_logp": old_BT[:, 1:]}
    ended_B = jnp.any(out["tokens"] == eos_id, axis=1)
    read_BR = jnp.arange(R)[None] < (out["lengths"] - (ended_B & (not read_eos)))[:, None]
    scored = {"inputs": seq_BT, "positions": positions, "segment_ids": segments,
              "loss_mask": jnp.concatenate([jnp.zeros_like(slot_BP, jnp.float32), read_BR.astype(jnp.float32)], 1)}
    return rows, scored


def experience(params, reference, rows: dict, scores_B: jax.Array, kl_coef: jax.Array, cfg,
               constrain: Constrain) -> tuple[dict, dict]:
    """Reference log-probs, values, rewards and advantages of a rollout; returns (rows + them, metrics)."""
    p, mask = cfg.ppo, rows["loss_mask"]
    ref_logp, _ = token_logprobs(reference, rows, cfg, constrain)
    kl_BT = losses.kl_estimate(rows["old_logp"], ref_logp, p.kl_estimator) * mask
    if p.algorithm == "grpo":
        values = jnp.zeros_like(mask)
        advantages = losses.group_advantages(scores_B, p.group_size)[:, None] * mask
        returns = advantages
    else:
        h = token_logprobs(params["policy"], rows, cfg, constrain)[1].h_BTD if p.value == "shared" else None
        values = value_estimates(params, rows, h, cfg, constrain)[0] * mask
        rewards = losses.token_rewards(scores_B, kl_BT, mask, kl_coef)
        advantages, returns = losses.gae(rewards, values, mask, p.gamma, p.lam)
        if p.whiten:
            advantages = losses.whiten(advantages, mask)
    kl_B = jnp.sum(kl_BT, axis=-1)
    metrics = {"score": jnp.mean(scores_B), "reward_with_kl": jnp.mean(scores_B - kl_coef * kl_B),
               "kl_to_ref": jnp.mean(kl_B), "kl_coef": kl_coef, "response_length": jnp.mean(jnp.sum(mask, -1))}
    batch = rows | {"ref_logp": ref_logp, "old_values": values, "advantages": advantages, "returns": returns,
                    "kl": kl_B}
    return batch, metrics


def loss_fn(params, mb: dict, cfg, constrain: Constrain) -> tuple[jax.Array, dict]:
    p, mask = cfg.ppo, mb["loss_mask"]
    logp, out = token_logprobs(params["policy"], mb, cfg, constrain)
    loss, aux = losses.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mask, p.clip_eps)
    aux["entropy"] = losses.entropy(out.logits_BTV, mask)
    aux["policy_loss"] = loss
    router_loss, router = moe.loss(out.moe, cfg.model)
    aux |= router
    if p.algorithm == "grpo":
        kl_BT = losses.kl_estimate(logp, mb["ref_logp"], p.kl_estimator)
        kl = jnp.sum(jnp.where(mask > 0, kl_BT, 0.0)) / jnp.maximum(jnp.sum(mask > 0), 1)
        return loss + p.kl_coef * kl + router_loss, aux | {"kl_loss": kl}
    values, value_stats = value_estimates(params, mb, out.h_BTD, cfg, constrain)
    value_loss, value_aux = losses.ppo_value_loss(values, mb["old_values"], mb["returns"], mask, p.value_clip_eps)
    aux |= value_aux | {"value_loss": value_loss,
                        "explained_variance": losses.explained_variance(mb["old_values"], mb["returns"], mask)}
    router_loss += moe.loss(value_stats, cfg.model)[0]
    return loss + p.vf_coef * value_loss - p.entropy_coef * aux["entropy"] + router_loss, aux


def tokens(mb: dict) -> jax.Array:
    """What every term of the loss averages over: the response tokens (the weight of a microbatch)."""
    return jnp.sum(mb["loss_mask"] > 0)


def make_step(cfg, tx: optax.GradientTransformation, constrain: Constrain, mask=None):
    """step(state, rollout) -> (state, metrics): ppo.epochs passes over ppo.minibatches shuffled minibatches,
    each minibatch one call of the shared update (over optim.grad_accum microbatches; of the `mask`ed leaves)."""
    p = cfg.ppo
    update = make_update(lambda params, mb: loss_fn(params, mb, cfg, constrain), tx, cfg.optim.grad_accum, tokens,
                         mask)
    lr = optim.schedule(cfg)

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
            extra["kl_coef"] = losses.adaptive_kl_coef(state.extra["kl_coef"], jnp.mean(batch["kl"]), p.target_kl,
                                                       p.kl_horizon, B)
        new, standard = advance(state, params, opt_state, metrics["nonfinite"], lr, **extra)
        return new, metrics | standard

    return step


def flops_per_token(cfg) -> float:
    """Per rollout token: sampling and the reference's forward, ppo.epochs updates of the policy, the reward
    model's forward (when one scores), and for PPO the value model's forward and updates (a separate one) or the
    policy's forward again for its hidden states (a shared head)."""
    p, train, forward = cfg.ppo, pretrain.flops_per_token(cfg), pretrain.flops_per_token(cfg, forward=True)
    total = 2 * forward + p.epochs * train + (forward if p.reward != "tasks" else 0)
    if p.algorithm == "ppo":
        total += forward + (p.epochs * train if p.value == "separate" else 0)
    return total


def prompts(cfg):
    """step -> this step's synthetic task examples (GRPO: each prompt repeated group_size times in a row), from
    ppo.tasks, or data.tasks when it is empty (the evaluation covers data.tasks either way)."""
    names, k = (cfg.ppo.tasks or cfg.data.tasks).split(","), cfg.ppo.group_size if cfg.ppo.algorithm == "grpo" else 1

    def get(step: int) -> list[tasks.Example]:
        rng = np.random.default_rng([cfg.seed, step])
        return [ex for ex in (tasks.sample(rng, names) for _ in range(cfg.batch_size // k)) for _ in range(k)]

    return get


class Rollout:
    """Experience from the current policy, in stages a benchmark can time apart: `sample` (KV-cache generation),
    `score` (the tasks' checkers or a reward model) and `experience` (reference log-probs, values, advantages).
    Calling it runs all three on step's prompts: the loop's batch source, (state, step) -> (batch, metrics)."""

    def __init__(self, cfg, mesh: Mesh, reference):
        p = cfg.ppo
        self.cfg, self.reference, self.prompts = cfg, reference, prompts(cfg)
        self.tokenizer = tok = get_tokenizer(cfg.data.tokenizer)
        self.sharding = batch_sharding(mesh, cfg.rules)
        constrain = make_constrain(mesh, cfg.rules)
        self.reward_model = None if p.reward == "tasks" else checkpoint.load_params(
            p.reward, mesh, "scorer", cfg.model, cfg.data.tokenizer, reader="ppo.reward")
        reward_cfg = None if p.reward == "tasks" else checkpoint.run_config(p.reward)
        read_eos = reward_cfg is not None and reward_cfg.reward.read == "eos"
        self._generate = sampling.sampler(cfg.model, max_new_tokens=p.max_new_tokens, eos_id=tok.eos_id,
                                          pad_id=tok.pad_id, temperature=p.temperature, vocab_size=tok.vocab_size,
                                          constrain=constrain)
        self._rows = jax.jit(lambda ids, lengths, out: rows_of(ids, lengths, out, tok.eos_id, read_eos))
        self._score = jax.jit(lambda rm, rows: reward.scores(rm, rows, reward_cfg, constrain))
        # A LoRA policy's reference is its own base with the adapters off (reference=None): no second copy.
        self._experience = jax.jit(lambda params, rows, scores, kl_coef: experience(
            params, lora.strip(params["policy"]) if reference is None else reference, rows, scores, kl_coef, cfg,
            constrain), out_shardings=(self.sharding, None))

    def _put(self, x: np.ndarray) -> jax.Array:  # every process holds the whole (small) array
        return jax.make_array_from_callback(x.shape, self.sharding, lambda index: x[index])

    def sample(self, params, examples: list[tasks.Example], step: int) -> tuple[dict, dict, np.ndarray]:
        """(training rows, reward-model rows, whether each answer passes its task's checker)."""
        tok = self.tokenizer
        ids, lengths = sampling.left_pad([chat.prompt_ids(tok, ex.prompt) for ex in examples])
        key = jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step)
        out = self._generate(params["policy"], self._put(ids), self._put(lengths), key)
        rows, scored = self._rows(self._put(ids), self._put(lengths), out)
        tokens, n = multihost_utils.process_allgather((out["tokens"], out["lengths"]), tiled=True)
        correct = np.array([tasks.TASKS[ex.task].check(ex.prompt, tok.decode(t[:m]))
                            for ex, t, m in zip(examples, tokens, n, strict=True)], np.float32)
        return rows, scored, correct

    def score(self, scored: dict, correct: np.ndarray) -> jax.Array:
        return self._put(correct) if self.reward_model is None else self._score(self.reward_model, scored)

    def experience(self, params, rows: dict, scores: jax.Array, kl_coef: jax.Array) -> tuple[dict, dict]:
        return self._experience(params, rows, scores, kl_coef)

    def __call__(self, state: TrainState, step: int) -> tuple[dict, dict]:
        rows, scored, correct = self.sample(state.params, self.prompts(step), step)
        batch, metrics = self.experience(state.params, rows, self.score(scored, correct), state.extra["kl_coef"])
        return batch, metrics | {"accuracy": float(correct.mean())}


def specs(cfg) -> dict:
    """The policy, and PPO's value function: a reward-model-shaped value model or a head on the policy's trunk."""
    out = {"policy": transformer.specs(cfg.model)}
    if cfg.ppo.algorithm == "ppo" and cfg.ppo.value == "separate":
        out["value"] = heads.specs(cfg.model)
    elif cfg.ppo.algorithm == "ppo":
        out["value_head"] = heads.specs(cfg.model)["head"]
    return out


RANGES = {
    "ppo.clip_eps": ("(0, inf)", "how far a step may move the policy's probability ratio from 1"),
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
}


def validate(cfg, sizes: dict[str, int]) -> None:
    p = cfg.get("ppo")
    if p is None:
        raise ConfigError("a ppo run needs the ppo section; start from configs/ppo.py")
    check_choices(cfg, {"ppo.algorithm": ("ppo", "grpo"), "ppo.value": ("separate", "shared"),
                        "ppo.kl_estimator": losses.KL_ESTIMATORS})
    check_ranges(cfg, RANGES)
    if not cfg.init_from:
        raise ConfigError("PPO starts from an SFT run (the policy and its frozen reference): set --config.init_from")
    if cfg.data.source != "synthetic":
        raise ConfigError("PPO prompts come from the synthetic tasks for now: set --config.data.source=synthetic")
    if p.tasks:
        tasks.check_names("ppo.tasks", p.tasks)
    dp, k = sizes["data"] * sizes["expert"] * sizes["fsdp"], cfg.optim.grad_accum
    group = p.group_size if p.algorithm == "grpo" else 1
    if p.algorithm == "grpo" and group < 2:
        raise ConfigError(f"ppo.group_size={group}: GRPO normalises over K >= 2 samples per prompt")
    if cfg.batch_size % (p.minibatches * group) or cfg.batch_size // p.minibatches % (dp * k):
        raise ConfigError(f"batch_size={cfg.batch_size} must split into ppo.minibatches={p.minibatches} minibatches "
                          f"that divide over data*expert*fsdp*grad_accum={dp}*{k} (and whole groups of ppo.group_size="
                          f"{group})")
    if cfg.loss.z_loss:
        raise ConfigError("loss.z_loss applies to next-token training only; set --config.loss.z_loss=0")
    if p.algorithm == "grpo" and p.target_kl:
        raise ConfigError("ppo.target_kl adapts PPO's KL penalty on the reward; GRPO's KL term in the loss has the "
                          "fixed weight ppo.kl_coef: set --config.ppo.target_kl=0")


def task(cfg, workdir: str, mesh: Mesh) -> loop.Task:
    del workdir
    p = cfg.ppo
    layout = lora.apply(specs(cfg), cfg)
    mask = state.trainable(layout)
    tx = optim.make(cfg, layout)
    constrain = make_constrain(mesh, cfg.rules)
    given = pretrain.reads_lm(cfg, cfg.init_from, mesh, "PPO's policy")
    reference = None if mask else given()  # a LoRA policy's reference is its own base: read only to start
    rollout = Rollout(cfg, mesh, reference)
    evaluate = None
    if cfg.eval_every:
        evaluate_policy = make_evaluator(cfg, mesh, constrain, n=cfg.eval_prompts)
        evaluate = lambda params: evaluate_policy(params["policy"])  # noqa: E731

    def start() -> dict:
        policy = given() if reference is None else reference
        out = {"policy": policy}
        if "value" in layout:  # from the reward model, else the SFT trunk with a fresh head
            out["value"] = rollout.reward_model or {"trunk": policy}
        return out

    extra = {"kl_coef": p.kl_coef}
    return loop.Task(make_step(cfg, tx, constrain, mask), rollout, rollout.sharding,
                     lambda: state.create(layout, cfg, mesh, tx, start(), extra),
                     state.abstract(layout, cfg, mesh, tx, extra), PARTS, flops_per_token(cfg), evaluate,
                     trainable=mask)


OBJECTIVE = loop.Objective("ppo", validate, task)
