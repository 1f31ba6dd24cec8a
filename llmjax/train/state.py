"""Train state and its sharded creation: parameters are initialised directly onto the mesh by a jitted
init with out_shardings, so no host ever holds the full model."""

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax.models import transformer
from llmjax.sharding import tree_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: transformer.Params
    opt_state: optax.OptState


def _create(model_cfg, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    params = transformer.init(model_cfg, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def shardings(cfg, mesh: Mesh, tx: optax.GradientTransformation) -> TrainState:
    """Where every leaf of the state lives: parameters (and their Adam moments) by the rules table,
    scalars replicated."""
    shapes = jax.eval_shape(partial(_create, cfg.model, tx), jax.random.key(0))
    param_sh = tree_shardings(transformer.specs(cfg.model), cfg.rules, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, param_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh)


def _init(cfg, mesh: Mesh, tx: optax.GradientTransformation):
    return jax.jit(partial(_create, cfg.model, tx), out_shardings=shardings(cfg, mesh, tx))


def abstract(cfg, mesh: Mesh, tx: optax.GradientTransformation) -> TrainState:
    """Shapes, dtypes and shardings without allocating: the target for restoring a checkpoint."""
    return jax.eval_shape(_init(cfg, mesh, tx), jax.random.key(0))


def create(cfg, mesh: Mesh, tx: optax.GradientTransformation) -> TrainState:
    return _init(cfg, mesh, tx)(jax.random.key(cfg.seed))


def from_params(cfg, mesh: Mesh, tx: optax.GradientTransformation, params: transformer.Params) -> TrainState:
    """Step 0 with given parameters (fine-tuning from another run) and a fresh optimizer state."""
    fresh = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                    out_shardings=shardings(cfg, mesh, tx))
    return fresh(params)
