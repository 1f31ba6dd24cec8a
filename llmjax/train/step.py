"""The one update every objective takes: gradient accumulation, the optimizer step, a non-finite guard and the
standard metrics. An objective supplies only its loss.

`loss_fn(params, batch, *frozen) -> (loss, aux)` is a mean over some units (tokens, pairs, prompts);
`weight(batch)` counts those units, so that k microbatches, each weighed by its share of the units, sum to
exactly the loss and gradients of the whole batch. The guard is ours rather than `optax.apply_if_finite`: that
one looks at gradients only, and after its error budget it applies the non-finite update; here a step whose loss
or gradients are not finite leaves parameters and optimizer state as they were, and the loop stops the run
after `optim.max_nonfinite` such steps in a row.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from llmjax.models import lora
from llmjax.train.state import TrainState, join, split

LossFn = Callable[..., tuple[jax.Array, dict]]


def microbatches(batch, k: int):
    """[k, B/k, ...] leaves: microbatch j holds rows j, j+k, ... so that each device keeps its own rows."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def grads(loss_fn: LossFn, k: int = 1, weight: Callable | None = None) -> Callable:
    """fn(params, batch, *frozen) -> (loss, aux, grads) of the whole batch, over k sequential microbatches."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(params, batch, *frozen):
        (loss, aux), g = grad_fn(params, batch, *frozen)
        return loss, aux, g

    if k == 1:
        return one

    def accumulated(params, batch, *frozen):
        micro = microbatches(batch, k)
        w_M = jnp.ones(k) if weight is None else jax.vmap(weight)(micro).astype(jnp.float32)
        share_M = w_M / jnp.maximum(jnp.sum(w_M), 1e-9)

        def add(total, xs):
            mb, share = xs
            return jax.tree.map(lambda t, x: t + share * x, total, one(params, mb, *frozen)), None

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(one, params, jax.tree.map(lambda x: x[0], micro), *frozen))
        return jax.lax.scan(add, zeros, (micro, share_M))[0]

    return accumulated


def make_update(loss_fn: LossFn, tx: optax.GradientTransformation, k: int = 1, weight: Callable | None = None,
                mask=None) -> Callable:
    """update(params, opt_state, batch, *frozen, key=None) -> (params, opt_state, metrics): one optimizer step, or
    none where the loss or gradients are not finite (metrics["nonfinite"] = 1). PPO calls it per minibatch. With
    `mask` (llmjax.train.state.trainable), only its True leaves are differentiated and optimised (LoRA's
    adapters); the rest pass through untouched. `key` drives LoRA dropout (the same for every microbatch)."""

    grad_fn = grads(lambda train, batch, fixed, key, *frozen: loss_fn(lora.keyed(join(mask, train, fixed), key),
                                                                      batch, *frozen), k, weight)

    def update(params, opt_state, batch, *frozen, key: jax.Array | None = None):
        train, fixed = split(params, mask)
        loss, aux, g = grad_fn(train, batch, fixed, key, *frozen)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)]))
        updates, new_opt_state = tx.update(g, opt_state, train)
        new_train = optax.apply_updates(train, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(g),
                   "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return join(mask, jax.tree.map(keep, new_train, train), fixed), jax.tree.map(keep, new_opt_state, opt_state), \
            metrics

    return update


def advance(state: TrainState, params, opt_state, nonfinite: jax.Array, lr: optax.Schedule, **extra) -> tuple:
    """The next state, and the metrics every step reports: a run of non-finite steps is counted in the state
    (`bad_steps`, for the loop's stop) and each step's count in the metrics."""
    bad = jnp.where(nonfinite > 0, state.bad_steps + 1, 0)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, extra=state.extra | extra,
                     bad_steps=bad)
    return new, {"lr": lr(state.step), "bad_steps": bad}


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation, lr: optax.Schedule, k: int = 1,
              weight: Callable | None = None, mask=None, seed: int = 0) -> Callable[..., tuple[TrainState, dict]]:
    """step(state, batch, *frozen) -> (state, metrics): one update of loss_fn over cfg.optim.grad_accum = k
    microbatches (of the `mask`ed leaves, see make_update), its dropout key drawn from `seed` and the step."""
    update = make_update(loss_fn, tx, k, weight, mask)

    def step(state: TrainState, batch, *frozen) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        params, opt_state, metrics = update(state.params, state.opt_state, batch, *frozen, key=key)
        new, standard = advance(state, params, opt_state, metrics["nonfinite"], lr)
        return new, metrics | standard

    return step
