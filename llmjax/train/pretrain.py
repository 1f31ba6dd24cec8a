"""Next-token training: the pretraining step, and SFT's (the same step; the loss mask hides prompts)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from llmjax import losses, metrics, optim
from llmjax.data import pipeline, synthetic
from llmjax.evaluate import make_evaluator
from llmjax.models import transformer
from llmjax.sharding import Constrain, batch_sharding, make_constrain, make_mesh
from llmjax.train import loop
from llmjax.train.state import TrainState

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids, loss_mask: all [B, T]


def loss_fn(params: transformer.Params, batch: Batch, cfg, constrain: Constrain,
            normalizer: jax.Array | None = None) -> tuple[jax.Array, dict]:
    logits_BTV, _ = transformer.forward(params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                        cfg.model, constrain)
    return losses.cross_entropy(logits_BTV, batch["targets"], batch["loss_mask"], cfg.loss.z_loss, normalizer)


def grads(params, batch: Batch, cfg, constrain: Constrain) -> tuple[jax.Array, dict, transformer.Params]:
    """Loss and gradients of the whole batch, over cfg.optim.grad_accum sequential microbatches.

    Every microbatch divides by the whole batch's token count, so the summed result equals one big batch.
    Rows are split as [B/k, k] (microbatch j = rows j, j+k, ...) so each device keeps its own rows.
    """
    k = cfg.optim.grad_accum
    n_tokens = jnp.sum(batch["loss_mask"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(mb: Batch):
        (loss, aux), g = grad_fn(params, mb, cfg, constrain, n_tokens)
        return loss, aux, g

    if k == 1:
        return one(batch)
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro)))
    total, _ = jax.lax.scan(lambda acc, mb: (jax.tree.map(jnp.add, acc, one(mb)), None), zeros, micro)
    return total


def make_step(cfg, tx: optax.GradientTransformation, lr: optax.Schedule,
              constrain: Constrain) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        loss, aux, g = grads(state.params, batch, cfg, constrain)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(g), "lr": lr(state.step),
                   "tokens": jnp.sum(batch["loss_mask"])}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, extra=state.extra), metrics

    return step


def flops_per_token(cfg) -> float:
    """Training FLOPs per token of cfg's model at cfg's sequence length (the convention in llmjax.metrics)."""
    m = cfg.model
    return metrics.flops_per_token(transformer.matmul_param_count(m), m.n_layers, cfg.seq_len, m.n_heads * m.head_dim)


def task(cfg) -> loop.Task:
    mesh = make_mesh(cfg.mesh)
    tx = optim.make(cfg, transformer.specs(cfg.model))
    sharding = batch_sharding(mesh, cfg.rules)
    constrain = make_constrain(mesh, cfg.rules)
    step = make_step(cfg, tx, optim.schedule(cfg), constrain)
    evaluate = make_evaluator(cfg, mesh, constrain, n=cfg.eval_prompts) if cfg.eval_every else None
    if cfg.data.source == "synthetic":
        iterator, batches = None, synthetic.batches(cfg, sharding)
    else:
        iterator, batches = pipeline.batches(cfg, sharding)
    return loop.Task(mesh, tx, step, batches, sharding, flops_per_token(cfg), evaluate, data_iterator=iterator)


def train(cfg, workdir: str) -> TrainState:
    return loop.run(cfg, workdir, task(cfg))
