"""Train state and its sharded creation: parameters are initialised directly onto the mesh by a jitted
init with out_shardings, so no host ever holds the full model.

What the parameters are (a language model, a trunk with a head, a policy with a value model) is the objective's
`specs`; these functions take it as given and never ask which objective is running.
"""

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
    extra: dict = flax.struct.field(default_factory=dict)  # an objective's scalars that resume with it (PPO's KL coef)
    bad_steps: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))  # non-finite in a row


def _fresh(tx: optax.GradientTransformation, params, extra: dict) -> TrainState:
    extra = {k: jnp.asarray(v, jnp.float32) for k, v in extra.items()}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra=extra,
                      bad_steps=jnp.zeros((), jnp.int32))


def merge(fresh, given):
    """`fresh` with every subtree that `given` holds put in its place: parameters read from another run over a
    fresh initialisation of what that run does not have (a new head)."""
    if not isinstance(fresh, dict) or not isinstance(given, dict):
        return given
    unknown = set(given) - set(fresh)
    if unknown:
        raise ValueError(f"parameters {sorted(unknown)} have no place in this layout ({sorted(fresh)})")
    return {k: merge(v, given[k]) if k in given else v for k, v in fresh.items()}


def shardings(specs, cfg, mesh: Mesh, tx: optax.GradientTransformation, extra: dict) -> TrainState:
    """Where every leaf of the state lives: parameters (and their Adam moments) by the rules table,
    scalars replicated."""
    shapes = jax.eval_shape(lambda key: _fresh(tx, transformer.init_tree(specs, key, cfg.model.param_dtype), extra),
                            jax.random.key(0))
    param_sh = tree_shardings(specs, cfg.rules, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, param_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                      extra=jax.tree.map(lambda _: replicated, shapes.extra), bad_steps=replicated)


def _init(specs, cfg, mesh: Mesh, tx: optax.GradientTransformation, extra: dict):
    def start(given, key):
        return _fresh(tx, merge(transformer.init_tree(specs, key, cfg.model.param_dtype), given), extra)

    return jax.jit(start, out_shardings=shardings(specs, cfg, mesh, tx, extra))


def abstract(specs, cfg, mesh: Mesh, tx: optax.GradientTransformation, extra: dict | None = None) -> TrainState:
    """Shapes, dtypes and shardings without allocating: the target for restoring a checkpoint."""
    return jax.eval_shape(_init(specs, cfg, mesh, tx, extra or {}), {}, jax.random.key(0))


def create(specs, cfg, mesh: Mesh, tx: optax.GradientTransformation, given=None,
           extra: dict | None = None) -> TrainState:
    """Step 0 with a fresh optimizer state: parameters from `given` (read from other runs, see merge) where it
    has them, freshly initialised (cfg.seed) elsewhere."""
    return _init(specs, cfg, mesh, tx, extra or {})(given or {}, jax.random.key(cfg.seed))
