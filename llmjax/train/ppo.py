"""RLHF: PPO with a KL penalty to the frozen SFT reference (InstructGPT), and GRPO as a config option.

One iteration is a rollout then an update. The rollout samples responses to a batch of prompts with the KV-cache
sampler, scores them (a reward model run, or the synthetic tasks' checkers with ppo.reward=tasks), and computes
the reference's log-probs and the values; PPO adds the per-token KL penalty to the reward and takes GAE
advantages, GRPO normalises each prompt's K scores within their group. The update is the usual
step(state, batch) -> (state, metrics), jitted once: ppo.epochs passes over ppo.minibatches minibatches of the
rollout with the clipped policy loss (+ the clipped value loss and an entropy bonus for PPO, + the k3 KL to the
reference for GRPO).

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
from llmjax.data import chat, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.evaluate import make_evaluator
from llmjax.models import heads, transformer
from llmjax.sharding import Constrain, batch_sharding, make_constrain, make_mesh
from llmjax.train import loop, reward
from llmjax.train.pretrain import flops_per_token
from llmjax.train.state import TrainState, from_params, param_specs


def token_logprobs(params, rows: dict, cfg, constrain: Constrain) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logp_BT of the targets, masked; logits_BTV; hidden h_BTD) of a language model on rows, over the
    tokenizer's ids (what the sampler draws from)."""
    logits, h = transformer.forward(params, rows["inputs"], rows["positions"], rows["segment_ids"], cfg.model,
                                    constrain)
    logits = sampling.limit_vocab(logits, get_tokenizer(cfg.data.tokenizer).vocab_size)
    return losses.sequence_logprobs(logits, rows["targets"], rows["loss_mask"]), logits, h


def value_estimates(params, rows: dict, h_BTD: jax.Array | None, cfg, constrain: Constrain) -> jax.Array:
    """V_BT: the separate value model on rows, or the shared head on the policy's hidden states h_BTD."""
    if cfg.ppo.value == "separate":
        return heads.values(params["value"], rows, cfg.model, constrain)
    return heads.apply(params["value_head"], h_BTD)


def rows_of(prompts_BP: jax.Array, lengths_B: jax.Array, out: dict, eos_id: int,
            read_eos: bool) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The rollout as training rows (next-token layout): left-padded prompt then response, the loss mask on the
    response tokens up to and including eos, old_logp (the sampler's log-probs) aligned with the targets; and
    as a reward model's rows, the whole sequence as inputs with the mask ending where the score is read (at the
    eos, or at the response's last token before it)."""
    P, N = prompts_BP.shape[1], out["tokens"].shape[1]
    seq_BS = jnp.concatenate([prompts_BP, out["tokens"]], axis=1)
    slot_BP = jnp.arange(P)[None] - (P - lengths_B[:, None])
    response_BN = jnp.arange(N)[None] < out["lengths"][:, None]
    positions = jnp.concatenate([jnp.maximum(slot_BP, 0), lengths_B[:, None] + jnp.arange(N)[None]], axis=1)
    segments = jnp.concatenate([slot_BP >= 0, response_BN], axis=1).astype(jnp.int32)
    mask_BS = jnp.concatenate([jnp.zeros_like(slot_BP, jnp.float32), response_BN.astype(jnp.float32)], axis=1)
    old_BS = jnp.concatenate([jnp.zeros_like(slot_BP, jnp.float32), out["logprobs"] * response_BN], axis=1)
    rows = {"inputs": seq_BS[:, :-1], "targets": seq_BS[:, 1:], "positions": positions[:, :-1],
            "segment_ids": segments[:, :-1], "loss_mask": mask_BS[:, 1:], "old_logp": old_BS[:, 1:]}
    ended_B = jnp.any(out["tokens"] == eos_id, axis=1)
    read_BN = jnp.arange(N)[None] < (out["lengths"] - (ended_B & (not read_eos)))[:, None]
    scored = {"inputs": seq_BS, "positions": positions, "segment_ids": segments,
              "loss_mask": jnp.concatenate([jnp.zeros_like(slot_BP, jnp.float32), read_BN.astype(jnp.float32)], 1)}
    return rows, scored


def experience(params, reference, rows: dict, scores_B: jax.Array, kl_coef: jax.Array, cfg,
               constrain: Constrain) -> tuple[dict, dict]:
    """Reference log-probs, values, rewards and advantages of a rollout; returns (rows + them, metrics)."""
    p, mask = cfg.ppo, rows["loss_mask"]
    ref_logp, _, _ = token_logprobs(reference, rows, cfg, constrain)
    kl_BT = losses.kl_estimate(rows["old_logp"], ref_logp, p.kl_estimator) * mask
    if p.algorithm == "grpo":
        values = jnp.zeros_like(mask)
        advantages = losses.group_advantages(scores_B, p.group_size)[:, None] * mask
        returns = advantages
    else:
        _, _, h = token_logprobs(params["policy"], rows, cfg, constrain) if p.value == "shared" else (0, 0, None)
        values = value_estimates(params, rows, h, cfg, constrain) * mask
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
    logp, logits, h = token_logprobs(params["policy"], mb, cfg, constrain)
    loss, aux = losses.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mask, p.clip_eps)
    aux["entropy"] = losses.entropy(logits, mask)
    aux["policy_loss"] = loss
    if p.algorithm == "grpo":
        kl = jnp.sum(losses.kl_estimate(logp, mb["ref_logp"], "k3") * mask) / jnp.maximum(jnp.sum(mask), 1)
        return loss + p.kl_coef * kl, aux | {"kl_loss": kl}
    values = value_estimates(params, mb, h, cfg, constrain)
    value_loss, value_aux = losses.ppo_value_loss(values, mb["old_values"], mb["returns"], mask, p.value_clip_eps)
    aux |= value_aux | {"value_loss": value_loss,
                        "explained_variance": losses.explained_variance(mb["old_values"], mb["returns"], mask)}
    return loss + p.vf_coef * value_loss - p.entropy_coef * aux["entropy"], aux


def make_step(cfg, tx: optax.GradientTransformation, constrain: Constrain):
    """step(state, rollout) -> (state, metrics): ppo.epochs passes over ppo.minibatches shuffled minibatches."""
    p = cfg.ppo
    grad_fn = jax.value_and_grad(lambda params, mb: loss_fn(params, mb, cfg, constrain), has_aux=True)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        B = batch["inputs"].shape[0]
        key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        order = jnp.stack([jax.random.permutation(k, B) for k in jax.random.split(key, p.epochs)])
        order = order.reshape(p.epochs * p.minibatches, B // p.minibatches)

        def one(carry, idx):
            params, opt_state = carry
            (loss, aux), g = grad_fn(params, jax.tree.map(lambda x: x[idx], batch))
            updates, opt_state = tx.update(g, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), aux | {"loss": loss,
                                                                            "grad_norm": optax.global_norm(g)}

        (params, opt_state), aux = jax.lax.scan(one, (state.params, state.opt_state), order)
        metrics = jax.tree.map(jnp.mean, aux)
        extra = state.extra
        if p.target_kl:  # Ziegler et al.: move the KL coefficient toward the KL that was targeted
            extra = {"kl_coef": losses.adaptive_kl_coef(extra["kl_coef"], jnp.mean(batch["kl"]), p.target_kl,
                                                        p.kl_horizon, B)}
        return TrainState(state.step + 1, params, opt_state, extra), metrics

    return step


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
    Calling it runs all three: (state, examples, step) -> (batch for the update step, metrics)."""

    def __init__(self, cfg, mesh: Mesh, reference):
        p = cfg.ppo
        self.cfg, self.reference = cfg, reference
        self.tokenizer = tok = get_tokenizer(cfg.data.tokenizer)
        self.sharding = batch_sharding(mesh, cfg.rules)
        constrain = make_constrain(mesh, cfg.rules)
        self.reward_model = None if p.reward == "tasks" else checkpoint.load_params(p.reward, mesh,
                                                                                    tokenizer=cfg.data.tokenizer)
        reward_cfg = None if p.reward == "tasks" else checkpoint.run_config(p.reward)
        read_eos = reward_cfg is not None and reward_cfg.reward.read == "eos"
        self._generate = sampling.sampler(cfg.model, max_new_tokens=p.max_new_tokens, eos_id=tok.eos_id,
                                          pad_id=tok.pad_id, temperature=p.temperature, vocab_size=tok.vocab_size,
                                          constrain=constrain)
        self._rows = jax.jit(lambda ids, lengths, out: rows_of(ids, lengths, out, tok.eos_id, read_eos))
        self._score = jax.jit(lambda rm, rows: reward.scores(rm, rows, reward_cfg, constrain))
        self._experience = jax.jit(lambda params, rows, scores, kl_coef: experience(
            params, reference, rows, scores, kl_coef, cfg, constrain), out_shardings=(self.sharding, None))

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

    def __call__(self, state: TrainState, examples: list[tasks.Example], step: int) -> tuple[dict, dict]:
        rows, scored, correct = self.sample(state.params, examples, step)
        batch, metrics = self.experience(state.params, rows, self.score(scored, correct), state.extra["kl_coef"])
        return batch, metrics | {"accuracy": float(correct.mean())}


def task(cfg, workdir: str, mesh: Mesh | None = None) -> loop.Task:
    p = cfg.ppo
    mesh = mesh or make_mesh(cfg.mesh)
    tx = optim.make(cfg, param_specs(cfg))
    constrain = make_constrain(mesh, cfg.rules)
    reference = checkpoint.load_params(cfg.init_from, mesh, cfg.model, cfg.data.tokenizer)
    rollout = Rollout(cfg, mesh, reference)
    evaluate = None
    if cfg.eval_every:
        evaluate_policy = make_evaluator(cfg, mesh, constrain, n=cfg.eval_prompts)
        evaluate = lambda params: evaluate_policy(params["policy"])  # noqa: E731
    start = {"policy": reference}
    if p.algorithm == "ppo" and p.value == "separate":  # from the reward model, else the SFT trunk + a fresh head
        start["value"] = rollout.reward_model or {"trunk": reference}
    return loop.Task(mesh, tx, make_step(cfg, tx, constrain), prompts(cfg), rollout.sharding, flops_per_token(cfg),
                     evaluate, rollout=rollout, init_params=lambda: from_params(cfg, mesh, tx, start))


def train(cfg, workdir: str) -> TrainState:
    return loop.run(cfg, workdir, task(cfg, workdir))
