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

from llmjax.models import lora, transformer
from llmjax.sharding import tree_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: transformer.Params
    opt_state: optax.OptState
    extra: dict = flax.struct.field(default_factory=dict)  # an objective's scalars that resume with it (PPO's KL coef)
    bad_steps: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))  # non-finite in a row


def trainable(specs) -> dict | None:
    """True at every leaf the step trains, where a layout freezes some (llmjax.models.lora); None: all train."""
    mask = jax.tree.map(lambda s: s.trainable, specs, is_leaf=transformer.is_spec)
    return None if all(jax.tree.leaves(mask)) else mask


def split(params, mask) -> tuple:
    """(the trainable leaves, the frozen ones), each with None where the other has its leaf."""
    if mask is None:
        return params, None
    return (jax.tree.map(lambda m, p: p if m else None, mask, params),
            jax.tree.map(lambda m, p: None if m else p, mask, params))


def join(mask, train, frozen):
    return train if mask is None else jax.tree.map(lambda m, t, f: t if m else f, mask, train, frozen)


def _fresh(tx: optax.GradientTransformation, params, extra: dict, mask) -> TrainState:
    extra = {k: jnp.asarray(v, jnp.float32) for k, v in extra.items()}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(split(params, mask)[0]),
                      extra=extra, bad_steps=jnp.zeros((), jnp.int32))


def kept(state: TrainState, mask=None) -> TrainState:
    """What a checkpoint holds: the state without its frozen parameters (re-read from the base run on resume);
    all of it without a mask."""
    return state if mask is None else state.replace(params=split(state.params, mask)[0])


def resumed(saved: TrainState, fresh: TrainState, mask) -> TrainState:
    """A restored checkpoint (see kept) with the frozen parameters of a fresh start."""
    return saved.replace(params=join(mask, saved.params, split(fresh.params, mask)[1]))


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
    mask = trainable(specs)
    shapes = jax.eval_shape(lambda key: _fresh(tx, transformer.init_tree(specs, key, cfg.model.param_dtype), extra,
                                               mask), jax.random.key(0))
    param_sh = tree_shardings(specs, cfg.rules, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, split(param_sh, mask)[0],
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                      extra=jax.tree.map(lambda _: replicated, shapes.extra), bad_steps=replicated)


def _init(specs, cfg, mesh: Mesh, tx: optax.GradientTransformation, extra: dict):
    def start(given, key):
        fresh = transformer.init_tree(specs, key, cfg.model.param_dtype)
        return _fresh(tx, merge(fresh, lora.attach(fresh, given)), extra, trainable(specs))

    return jax.jit(start, out_shardings=shardings(specs, cfg, mesh, tx, extra))


def abstract(specs, cfg, mesh: Mesh, tx: optax.GradientTransformation, extra: dict | None = None) -> TrainState:
    """Shapes, dtypes and shardings without allocating: the target for restoring a checkpoint."""
    return jax.eval_shape(_init(specs, cfg, mesh, tx, extra or {}), {}, jax.random.key(0))


def create(specs, cfg, mesh: Mesh, tx: optax.GradientTransformation, given=None,
           extra: dict | None = None) -> TrainState:
    """Step 0 with a fresh optimizer state: parameters from `given` (read from other runs, see merge) where it
    has them, freshly initialised (cfg.seed) elsewhere."""
    return _init(specs, cfg, mesh, tx, extra or {})(given or {}, jax.random.key(cfg.seed))
