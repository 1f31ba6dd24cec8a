"""Next-token training: pretraining, and SFT (the same objective; the loss mask hides prompts).

Parameters: a language model. It starts fresh, or from the language model of the run in cfg.init_from (a
pretraining, SFT or DPO run, or a PPO run's policy); a reward run holds no language model and is refused.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from llmjax import checkpoint, losses, metrics, optim
from llmjax.data import pipeline, synthetic
from llmjax.evaluate import make_evaluator
from llmjax.models import lora, moe, transformer
from llmjax.sharding import Constrain, batch_sharding, make_constrain
from llmjax.train import loop, state
from llmjax.train.step import make_step

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids, loss_mask: all [B, T]
PARTS = {"lm": ()}  # a language model at the root of the parameters


def loss_fn(params: transformer.Params, batch: Batch, cfg, constrain: Constrain,
            normalizer: jax.Array | None = None) -> tuple[jax.Array, dict]:
    out = transformer.forward(params, batch["inputs"], batch["positions"], batch["segment_ids"], cfg.model, constrain)
    loss, aux = losses.cross_entropy(out.logits_BTV, batch["targets"], batch["loss_mask"], cfg.loss.z_loss, normalizer)
    router_loss, router = moe.loss(out.moe, cfg.model)
    return loss + router_loss, aux | router


def tokens(batch: Batch) -> jax.Array:
    """What the loss averages over: the tokens it scores (the weight of a microbatch)."""
    return jnp.sum(batch["loss_mask"] > 0)


def flops_per_token(cfg, forward: bool = False) -> float:
    """Training FLOPs per token of cfg's model at cfg's sequence length (the convention in llmjax.metrics), or its
    forward pass's (a third). With LoRA the frozen weights get no weight gradient (2 of their 6 FLOPs per
    parameter), while the adapters cost the full 6."""
    m = cfg.model
    n = transformer.matmul_param_count(m)
    full = metrics.flops_per_token(n, m.n_layers, cfg.seq_len, m.n_heads * m.head_dim)
    if forward:
        return full / 3
    return full - 2 * n + 6 * lora.param_count(cfg) if lora.targets(cfg) else full


def reads_lm(cfg, workdir: str, mesh, reader: str) -> Callable[[], transformer.Params]:
    """Reads the language model of another run when called; checks now (one line, before anything compiles)
    that the run holds one of this run's model and tokenizer."""
    checkpoint.check_part(workdir, "lm", cfg.model, cfg.data.tokenizer, reader)
    return lambda: checkpoint.load_params(workdir, mesh, "lm", reader=reader)


def validate(cfg, sizes: dict[str, int]) -> None:
    """Nothing beyond the common checks: init_from is read (and refused) before anything compiles."""


def task(cfg, workdir: str, mesh) -> loop.Task:
    del workdir
    specs = lora.apply(transformer.specs(cfg.model), cfg)
    tx = optim.make(cfg, specs)
    sharding = batch_sharding(mesh, cfg.rules)
    constrain = make_constrain(mesh, cfg.rules)
    step = make_step(partial(loss_fn, cfg=cfg, constrain=constrain), tx, optim.schedule(cfg), cfg.optim.grad_accum,
                     tokens, state.trainable(specs), cfg.seed)
    evaluate = make_evaluator(cfg, mesh, constrain, n=cfg.eval_prompts) if cfg.eval_every else None
    if cfg.data.source == "synthetic":
        iterator, batches = None, synthetic.batches(cfg, sharding)
    else:
        iterator, batches = pipeline.batches(cfg, sharding)
    given = reads_lm(cfg, cfg.init_from, mesh, "pretraining/SFT") if cfg.init_from else lambda: None
    return loop.Task(step, lambda _, i: (batches(i), {}), sharding, lambda: state.create(specs, cfg, mesh, tx, given()),
                     state.abstract(specs, cfg, mesh, tx), PARTS, flops_per_token(cfg), evaluate,
                     data_iterator=iterator, trainable=state.trainable(specs))


OBJECTIVE = loop.Objective("pretrain", validate, task)
