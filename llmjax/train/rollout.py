"""The batch source of objectives that learn from the policy's own answers (PPO, GRPO, on-policy distillation): the
current policy answers a batch of prompt records, the rewards score the answers, and the experience (reference
log-probs, values, advantages) is computed for the update.

Stages a benchmark can time apart: `sample` (KV-cache generation over prompts left-padded to max_prompt_len, one
shape whatever the prompts' lengths, so the sampler compiles once), `score` (the reward's terms on the decoded
answers, on the host; a reward model's term on the devices) and `experience`. Calling the Rollout runs all three on
step's prompts: the loop's batch source, (state, step) -> (batch, metrics).
"""

import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from llmjax import losses, rewards, runs, sampling
from llmjax.data import prompts
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.evaluate import check
from llmjax.models import heads, lora
from llmjax.sharding import batch_sharding, make_constrain


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


def put(x: np.ndarray, sharding) -> jax.Array:
    """A small host array on the batch sharding; every process holds the whole of it."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def encode(tokenizer, records: list[dict], width: int, key: str, sharding) -> tuple[jax.Array, jax.Array]:
    """(prompts_BP, lengths_B): the records' prompts through the chat template, left-padded to P = width (one shape,
    so the sampler compiles once); a prompt longer than that refused in one line naming `key`."""
    ids = prompts.ids(tokenizer, [r["prompt"] for r in records], width, key)
    return tuple(put(x, sharding) for x in sampling.left_pad(ids, tokenizer.pad_id, multiple=width))


class Sampled(NamedTuple):
    """One rollout's answers: the training rows and reward-model rows on the devices, and on the host the decoded
    responses, their lengths in tokens and whether each ended (eos) within max_new_tokens."""

    rows: dict
    scored: dict
    responses: list[str]
    lengths: np.ndarray
    ended: np.ndarray


class Rollout:
    """Experience from the current policy on the run's prompt source, scored by the reward (see the module
    docstring). `section` names the objective's config section, which holds tasks, reward, temperature,
    max_new_tokens, max_prompt_len and overlong_buffer; `group` answers per prompt; `at_eos(reward_cfg)` whether
    a reward model run reads its score at the eos token. `experience_fn(params, reference, rows, scores, kl_coef)`
    is the objective's (reference log-probs, values and advantages)."""

    def __init__(self, cfg, mesh: Mesh, section: str, reference, group: int, experience_fn,
                 at_eos: Callable[[object], bool] = lambda reward_cfg: False):
        p = self.settings = cfg[section]
        self.section = section
        self.cfg, self.reference = cfg, reference
        self.prompts = prompts.source(cfg, group, p.tasks)
        self.terms = rewards.parse(p.reward, f"{section}.reward")
        self.tokenizer = tok = get_tokenizer(cfg.data.tokenizer)
        for view in prompts.record_sources(cfg).values():  # refuse a prompt too long for the sampler now
            for split in ("train", "validation") if cfg.eval_every else ("train",):
                found = prompts.records(view, split)
                prompts.ids(tok, [found[i]["prompt"] for i in range(len(found))], p.max_prompt_len,
                            f"{section}.max_prompt_len")
        self.sharding = batch_sharding(mesh, cfg.rules)
        constrain = make_constrain(mesh, cfg.rules)
        run = next((t.run for t in self.terms if t.run), None)
        if run and not os.path.exists(os.path.join(run, "config.json")):
            raise LlmjaxError(f"{section}.reward={p.reward!r}: {run!r} is neither a reward (tasks, math, exact, "
                              "format:REGEX, module.path:function) nor a reward model run's workdir")
        self.reward_model = run and runs.load_params(run, mesh, "scorer", cfg.model, cfg.data.tokenizer,
                                                     reader=f"{section}.reward")
        reward_cfg = run and runs.run_config(run)
        read_eos = bool(reward_cfg) and at_eos(reward_cfg)
        self._generate = sampling.sampler(cfg.model, max_new_tokens=p.max_new_tokens, eos_id=tok.eos_id,
                                          pad_id=tok.pad_id, temperature=p.temperature, vocab_size=tok.vocab_size,
                                          constrain=constrain)
        self._rows = jax.jit(lambda ids, lengths, out: rows_of(ids, lengths, out, tok.eos_id, read_eos))
        self._score = jax.jit(lambda rm, rows: heads.scores(rm, rows, reward_cfg.model, constrain)[0])
        # A LoRA policy's reference is its own base with the adapters off (reference=None): no second copy.
        self._experience = jax.jit(lambda params, rows, scores, kl_coef: experience_fn(
            params, lora.strip(params["policy"]) if reference is None else reference, rows, scores, kl_coef),
            out_shardings=(self.sharding, None))

    def encode(self, records: list[dict]) -> tuple[jax.Array, jax.Array]:
        return encode(self.tokenizer, records, self.settings.max_prompt_len, f"{self.section}.max_prompt_len",
                      self.sharding)

    def sample(self, params, records: list[dict], step: int) -> Sampled:
        tok = self.tokenizer
        ids, lengths = self.encode(records)
        key = jax.random.fold_in(jax.random.key(self.cfg.seed + 1), step)
        out = self._generate(params["policy"], ids, lengths, key)
        rows, scored = self._rows(ids, lengths, out)
        tokens, n = multihost_utils.process_allgather((out["tokens"], out["lengths"]), tiled=True)
        ended = (tokens == tok.eos_id).any(axis=1)
        return Sampled(rows, scored, [tok.decode(t[:m]) for t, m in zip(tokens, n, strict=True)], n, ended)

    def score(self, records: list[dict], sampled: Sampled) -> tuple[jax.Array, dict[str, float]]:
        """(each answer's reward: the reward's weighted terms, plus the overlong penalty; what they were)."""
        model = None if self.reward_model is None else multihost_utils.process_allgather(
            self._score(self.reward_model, sampled.scored), tiled=True)
        return self.combine(records, sampled, model)

    def combine(self, records: list[dict], sampled: Sampled,
                model: np.ndarray | None) -> tuple[jax.Array, dict[str, float]]:
        """`score` on the host, given the reward model's scores (if one scores)."""
        p = self.settings
        total, terms = rewards.score(self.terms, [r["prompt"] for r in records], sampled.responses, records, model)
        metrics = {f"reward/{name}": float(np.mean(v)) for name, v in terms.items()} if len(terms) > 1 else {}
        if p.overlong_buffer:
            penalty = np.asarray(losses.overlong_penalty(sampled.lengths, sampled.ended, p.max_new_tokens,
                                                         p.overlong_buffer))
            total = total + penalty
            metrics["overlong_penalty"] = float(penalty.mean())
        marks = [check(r, response) for r, response in zip(records, sampled.responses, strict=True)]
        if None not in marks:
            metrics["accuracy"] = float(np.mean(marks))
        metrics["truncated"] = float(1 - sampled.ended.mean())
        return put(np.asarray(total, np.float32), self.sharding), metrics

    def experience(self, params, rows: dict, scores: jax.Array, kl_coef: jax.Array) -> tuple[dict, dict]:
        return self._experience(params, rows, scores, kl_coef)

    def __call__(self, state, step: int) -> tuple[dict, dict]:
        records = self.prompts(step)
        sampled = self.sample(state.params, records, step)
        scores, metrics = self.score(records, sampled)
        batch, made = self.experience(state.params, sampled.rows, scores, state.extra["kl_coef"])
        return batch, made | metrics
