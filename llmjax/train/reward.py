"""Reward modelling: a trunk with a scalar head learns to score preferred responses higher (Bradley-Terry).

Starts from the language model of an SFT or pretraining run (cfg.init_from) as its trunk, with a fresh head (or
from another reward run, head and all). Each prompt comes with K responses
ranked best first (K = 2: a chosen and a rejected one); its C(K,2) pairs each weigh 1/C(K,2), so every prompt
counts once however long its list (InstructGPT). The score is read from the hidden state at the response's last
token, or (reward.read=eos) at the eos that ends it, fed as an input.
"""

import itertools
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import checkpoint, losses, optim
from llmjax.config import ConfigError, check_ranges
from llmjax.data import preference
from llmjax.evaluate import HELD_OUT
from llmjax.models import heads, lora, moe
from llmjax.sharding import Constrain, batch_sharding, make_constrain
from llmjax.train import loop, state
from llmjax.train.pretrain import flops_per_token, reads_lm
from llmjax.train.step import make_step

PARTS = {"scorer": ()}  # the whole of the parameters: {"trunk": a language model, "head"}


def scores(params, rows: dict[str, jax.Array], cfg, constrain: Constrain) -> jax.Array:
    """The reward of every sequence of rows [B, C, T] (or [B, T]): scores_BC (scores_B)."""
    return _scored(params, rows, cfg, constrain)[0]


def _scored(params, rows: dict[str, jax.Array], cfg, constrain: Constrain) -> tuple[jax.Array, dict]:
    lead = rows["inputs"].shape[:-1]
    flat = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), rows)
    values_BT, stats = heads.values(params, flat, cfg.model, constrain)
    return heads.at_last(values_BT, flat["loss_mask"]).reshape(lead), stats


def loss_fn(params, batch: dict, cfg, constrain: Constrain) -> tuple[jax.Array, dict]:
    """Bradley-Terry over every ranked pair (i better than j), margin reward.margin per rank apart, plus the
    trunk's MoE router losses."""
    rows = batch["responses"]
    r_BC, stats = _scored(params, rows, cfg, constrain)
    valid_BC = jnp.any(rows["loss_mask"] > 0, axis=-1).astype(jnp.float32)
    n_B = jnp.sum(valid_BC, axis=-1)
    pairs = list(itertools.combinations(range(r_BC.shape[1]), 2))
    better, worse = (np.array(idx) for idx in zip(*pairs, strict=True))
    weight_BQ = valid_BC[:, better] * valid_BC[:, worse] / jnp.maximum(n_B * (n_B - 1) / 2, 1)[:, None]
    margin_Q = cfg.reward.margin * (worse - better)
    loss, aux = losses.bradley_terry(r_BC[:, better].ravel(), r_BC[:, worse].ravel(),
                                     jnp.broadcast_to(margin_Q, weight_BQ.shape).ravel(), weight_BQ.ravel())
    count = jnp.maximum(jnp.sum(valid_BC), 1)
    mean = jnp.sum(r_BC * valid_BC) / count
    std = jnp.sqrt(jnp.sum(jnp.square(r_BC - mean) * valid_BC) / count)
    router_loss, router = moe.loss(stats, cfg.model)
    return loss + router_loss, aux | router | {"reward_mean": mean, "reward_std": std,
                                               "reward_best": jnp.mean(r_BC[:, 0])}


def pairs(batch: dict) -> jax.Array:
    """What the loss averages over: prompts with at least two responses (each prompt's pairs weigh 1 in all)."""
    return jnp.sum(jnp.sum(jnp.any(batch["responses"]["loss_mask"] > 0, axis=-1), axis=-1) >= 2)


def validate(cfg, sizes: dict[str, int]) -> None:
    if cfg.data.format != "chat":
        raise ConfigError(f"data.format={cfg.data.format!r}: a reward model reads prompts and responses through the "
                          "chat template; set --config.data.format=chat")
    if cfg.loss.z_loss:
        raise ConfigError("loss.z_loss applies to next-token training only; set --config.loss.z_loss=0")
    if "reward" not in cfg or cfg.reward.read not in ("last", "eos") or cfg.reward.responses < 2:
        raise ConfigError("a reward run needs reward.read in ('last', 'eos') and reward.responses >= 2 (responses "
                          "ranked per prompt); start from configs/reward.py")
    check_ranges(cfg, {"reward.margin": ("[0, inf)", "how much more a response one rank better must score; "
                                                      "below 0 a worse response may outscore a better one")})


def reads_scorer(cfg, workdir: str, mesh, reader: str) -> Callable[[], dict]:
    """A reward model from another run when called: the whole of a reward run's, else a language model's
    trunk (the head starts fresh). Checked now, read later."""
    if "scorer" in checkpoint.run_parts(workdir):
        checkpoint.check_part(workdir, "scorer", cfg.model, cfg.data.tokenizer, reader)
        return lambda: checkpoint.load_params(workdir, mesh, "scorer")
    lm = reads_lm(cfg, workdir, mesh, reader)
    return lambda: {"trunk": lm()}


def task(cfg, workdir: str, mesh) -> loop.Task:
    del workdir
    specs = lora.apply(heads.specs(cfg.model), cfg)
    tx = optim.make(cfg, specs)
    constrain = make_constrain(mesh, cfg.rules)
    sharding = batch_sharding(mesh, cfg.rules)
    k, eos = cfg.reward.responses, cfg.reward.read == "eos"
    get = preference.batches(cfg, sharding, preference.source(cfg, k=k), layout="ranked", k=k, eos_input=eos)
    step = make_step(partial(loss_fn, cfg=cfg, constrain=constrain), tx, optim.schedule(cfg), cfg.optim.grad_accum,
                     pairs, state.trainable(specs), cfg.seed)
    evaluate = None
    if cfg.eval_every:
        held_out = preference.source(cfg, "validation", HELD_OUT, k)
        eval_batches = preference.batches(cfg, sharding, held_out, layout="ranked", k=k, eos_input=eos)
        eval_batches = [eval_batches(i) for i in range(max(1, cfg.eval_prompts // cfg.batch_size))]
        metrics_fn = jax.jit(lambda params, batch: loss_fn(params, batch, cfg, constrain))

        def evaluate(params) -> dict[str, float]:
            rows = jax.device_get([metrics_fn(params, b) for b in eval_batches])
            return {name: float(np.mean([loss if name == "loss" else aux[name] for loss, aux in rows]))
                    for name in ("loss", *rows[0][1])}

    given = reads_scorer(cfg, cfg.init_from, mesh, "a reward model") if cfg.init_from else lambda: None
    return loop.Task(step, lambda _, i: (get(i), {}), sharding, lambda: state.create(specs, cfg, mesh, tx, given()),
                     state.abstract(specs, cfg, mesh, tx), PARTS, flops_per_token(cfg), evaluate,
                     trainable=state.trainable(specs))


OBJECTIVE = loop.Objective("reward", validate, task)
