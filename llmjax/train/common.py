"""What objectives share: the record an objective declares (`Objective`, and the `Definition` it gives for a run),
the one function that builds the loop's Task from them (`build`), and the helpers several objectives use.

An objective is a file of llmjax/train that defines its loss and data and ends in an `Objective` record; the
registry lists it. Everything else (optimizer, activation constraint, shardings, the trainable mask of LoRA, the
step, the start and abstract states) is built here, the same way for every objective, so no objective repeats it
and `llmjax.estimate` compiles the very step a run would take.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from llmjax import metrics, optim, runs
from llmjax.models import lora, transformer
from llmjax.sharding import Constrain, batch_sharding, make_constrain, tree_shardings
from llmjax.train import loop, state
from llmjax.train.step import make_step, make_update

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids, loss_mask: all [B, T]
Source = Callable[[state.TrainState, int], tuple[dict, dict]]  # (state, step) -> (batch, its metrics)


class Context(NamedTuple):
    """What `build` hands an objective's `define`: the run, its mesh, the activation constraint and the batch
    sharding. `abstract` (llmjax.estimate) reads no other run: `read` returns the parameters' shapes."""

    cfg: object
    workdir: str
    mesh: Mesh
    constrain: Constrain
    sharding: NamedSharding
    abstract: bool = False

    def read(self, run: str, part: str = "lm", reader: str = "this run", model=None) -> Callable[[], dict]:
        """`part` of another run's parameters when called (checked now: one line before anything compiles, if
        the run lacks it or holds another `model`, default this run's, or reads another tokenizer)."""
        cfg, model = self.cfg, model or self.cfg.model
        if self.abstract:
            specs = runs.PARTS[part][1](model)
            shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(model.param_dtype),
                                                                     sharding=sh),
                                  specs, tree_shardings(specs, cfg.rules, self.mesh), is_leaf=transformer.is_spec)
            return lambda: shapes
        runs.check_part(run, part, model, cfg.data.tokenizer, reader)
        return lambda: runs.load_params(run, self.mesh, part, reader=reader)


class Definition(NamedTuple):
    """What an objective gives for one run, by keyword: its loss over a batch, the batches, and what else the
    step or the loop needs of it."""

    loss: Callable  # loss(params, batch, *frozen) -> (loss, aux): a mean over the units `weight` counts
    source: Source
    weight: Callable[[dict], jax.Array] | None = None  # the units of a (micro)batch; None: rows weigh alike
    start: Callable[[], dict | None] = lambda: None  # parameters read from other runs, over a fresh init
    frozen: tuple = ()  # step arguments that never change (a frozen reference or teacher)
    evaluate: Callable[[dict], dict[str, float]] | None = None  # params -> held-out metrics
    extra: dict = {}  # scalars that live in the train state (PPO's adaptive KL coefficient)
    data_iterator: object = None  # a grain iterator behind `source`, saved with the checkpoints
    schedule: Callable | None = None  # (update, lr) -> step, where a batch is more than one update (PPO's epochs)


class Objective(NamedTuple):
    """A training objective as the registry and shared code know it: everything they ask of it."""

    name: str  # cfg.trainer
    define: Callable[[Context], Definition]
    validate: Callable[[object, dict[str, int]], None]  # (cfg, resolved mesh sizes) -> None, or LlmjaxError
    layout: Callable[[object], dict]  # cfg -> the parameter specs, before LoRA
    flops_per_token: Callable[[object], float]  # cfg -> model FLOPs per input token of a step
    parts: dict[str, tuple[str, ...]]  # what its parameters hold, for runs that start from it
    meaning: Callable[[object], tuple[str, ...]] = lambda cfg: ()  # its keys that change what parameters mean
    prompts: bool = False  # its data are prompt records: evaluation answers them and has no text to score
    reference: Callable[[object], bool] = lambda cfg: False  # the step holds a frozen language model
    sequences: Callable[[object], int] | None = None  # forwards per batch row, where a step is one pass over it
    at_eos: Callable[[object], bool] = lambda cfg: False  # its scorer reads a score at an eos fed as input


def build(objective: Objective, cfg, workdir: str, mesh: Mesh, abstract: bool = False) -> loop.Task:
    """The loop's Task for `objective` on `mesh`: its definition, with the optimizer, the LoRA mask, the step and
    the start and abstract states made the same way for every objective."""
    ctx = Context(cfg, workdir, mesh, make_constrain(mesh, cfg.rules), batch_sharding(mesh, cfg.rules), abstract)
    d = objective.define(ctx)
    specs = lora.apply(objective.layout(cfg), cfg)
    mask, tx, lr = state.trainable(specs), optim.make(cfg, specs), optim.schedule(cfg)
    if d.schedule is None:
        step = make_step(d.loss, tx, lr, cfg.optim.grad_accum, d.weight, mask, cfg.seed)
    else:
        step = d.schedule(make_update(d.loss, tx, cfg.optim.grad_accum, d.weight, mask), lr)
    return loop.Task(step, d.source, ctx.sharding, lambda: state.create(specs, cfg, mesh, tx, d.start(), d.extra),
                     state.abstract(specs, cfg, mesh, tx, d.extra), objective.parts, objective.flops_per_token(cfg),
                     d.evaluate, d.frozen, d.data_iterator, mask, objective.name)


def lm_flops(cfg, forward: bool = False) -> float:
    """Training FLOPs per token of cfg's language model at cfg's sequence length (the convention in llmjax.metrics),
    or its forward pass's (a third). With LoRA the frozen weights get no weight gradient (2 of their 6 FLOPs per
    parameter), while the adapters cost the full 6."""
    m = cfg.model
    n = transformer.matmul_param_count(m)
    full = metrics.flops_per_token(n, m.n_layers, cfg.seq_len, m.n_heads * m.head_dim)
    if forward:
        return full / 3
    return full - 2 * n + 6 * lora.param_count(cfg) if lora.targets(cfg) else full


def tokens(batch: Batch) -> jax.Array:
    """What a next-token loss averages over: the tokens it scores (the weight of a microbatch)."""
    return jnp.sum(batch["loss_mask"] > 0)
