"""Train state and its sharded creation: parameters are initialised directly onto the mesh by a jitted
init with out_shardings, so no host ever holds the full model."""

from collections.abc import Callable
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax.models import heads, transformer
from llmjax.sharding import tree_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: transformer.Params
    opt_state: optax.OptState
    extra: dict = flax.struct.field(default_factory=dict)  # a trainer's scalars that resume with it (PPO's KL coef)


def param_specs(cfg) -> transformer.Params:
    """What a run trains: a language model; for a reward model a trunk with a scalar head; for PPO a policy and
    a value model or a value head on the policy's trunk (GRPO: the policy alone)."""
    if cfg.trainer == "reward":
        return heads.specs(cfg.model)
    if cfg.trainer != "ppo":
        return transformer.specs(cfg.model)
    out = {"policy": transformer.specs(cfg.model)}
    if cfg.ppo.algorithm == "ppo" and cfg.ppo.value == "separate":
        out["value"] = heads.specs(cfg.model)
    elif cfg.ppo.algorithm == "ppo":
        out["value_head"] = heads.specs(cfg.model)["head"]
    return out


def _fresh(cfg, tx: optax.GradientTransformation, params) -> TrainState:
    extra = {"kl_coef": jnp.asarray(cfg.ppo.kl_coef, jnp.float32)} if cfg.trainer == "ppo" else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra=extra)


def _create(cfg, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    return _fresh(cfg, tx, transformer.init_tree(param_specs(cfg), key, cfg.model.param_dtype))


def shardings(cfg, mesh: Mesh, tx: optax.GradientTransformation) -> TrainState:
    """Where every leaf of the state lives: parameters (and their Adam moments) by the rules table,
    scalars replicated."""
    shapes = jax.eval_shape(partial(_create, cfg, tx), jax.random.key(0))
    param_sh = tree_shardings(param_specs(cfg), cfg.rules, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, param_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                      extra=jax.tree.map(lambda _: replicated, shapes.extra))


def _init(cfg, mesh: Mesh, tx: optax.GradientTransformation):
    return jax.jit(partial(_create, cfg, tx), out_shardings=shardings(cfg, mesh, tx))


def abstract(cfg, mesh: Mesh, tx: optax.GradientTransformation) -> TrainState:
    """Shapes, dtypes and shardings without allocating: the target for restoring a checkpoint."""
    return jax.eval_shape(_init(cfg, mesh, tx), jax.random.key(0))


def create(cfg, mesh: Mesh, tx: optax.GradientTransformation) -> TrainState:
    return _init(cfg, mesh, tx)(jax.random.key(cfg.seed))


def from_params(cfg, mesh: Mesh, tx: optax.GradientTransformation, params: transformer.Params) -> TrainState:
    """Step 0 with given parameters (fine-tuning from other runs) and a fresh optimizer state. Entries missing
    from `params` are freshly initialised (a reward model's head over a language model's parameters, which
    become its trunk; a PPO value head)."""
    def merge(fresh, given):
        if not isinstance(fresh, dict) or not isinstance(given, dict):
            return given
        return {k: merge(v, given[k]) if k in given else v for k, v in fresh.items()}

    def start(p, key):
        specs = param_specs(cfg)
        if "trunk" in specs and "trunk" not in p:
            p = {"trunk": p}
        return _fresh(cfg, tx, merge(transformer.init_tree(specs, key, cfg.model.param_dtype), p))

    return jax.jit(start, out_shardings=shardings(cfg, mesh, tx))(params, jax.random.key(cfg.seed))


def gradient_step(loss: Callable, tx: optax.GradientTransformation, lr: optax.Schedule) -> Callable:
    """step(state, batch, *frozen) -> (state, metrics) taking one optimizer step on
    loss(params, batch, *frozen) -> (scalar, aux)."""
    def step(state: TrainState, batch, *frozen) -> tuple[TrainState, dict]:
        (value, aux), g = jax.value_and_grad(loss, has_aux=True)(state.params, batch, *frozen)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        metrics = {"loss": value, **aux, "grad_norm": optax.global_norm(g), "lr": lr(state.step)}
        return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, extra=state.extra), metrics

    return step
