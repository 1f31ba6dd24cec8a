"""LoRA (Hu et al., 2021): a chosen projection W becomes W + (alpha / r) A B with A (in x r) and B (r x out) trained
and W frozen, so a fine-tune trains r (in + out) numbers per matrix instead of in x out.

The adapters live in the parameter tree beside the weight they adapt: a targeted leaf such as `layers.wq` becomes
{"base": W, "lora_a": A, "lora_b": B, "lora_scale": alpha / r}, which `layers.dense` computes as x W + s (x A) B.
Every leaf of an adapted language model that is not an adapter is frozen (`ParamSpec.trainable`), so the step
differentiates and the optimizer keeps state for the adapters (and any head) only, and checkpoints hold only
those, the base being re-read from the run's init_from. B starts at zero: step 0 is exactly the base model, and
`strip` (the adapters switched off) is the frozen reference DPO and PPO compare against, with no second copy.
"""

import math

import jax
import jax.numpy as jnp

from llmjax.errors import LlmjaxError
from llmjax.models import transformer
from llmjax.models.transformer import Params, ParamSpec, is_spec, normal, zeros

TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "w_fc", "w_proj")
INPUT_DIMS = {"wo": 2}  # leading dimensions (after the layer axis) that a projection contracts; 1 elsewhere


def targets(cfg) -> tuple[str, ...]:
    """The projections cfg.lora.targets names ("" = none: full fine-tuning; "all" = every one the model has)."""
    names = tuple(filter(None, (t.strip() for t in cfg.lora.targets.split(","))))
    if names == ("all",):
        return tuple(t for t in TARGETS if t in _projections(cfg.model))
    return names


def _projections(model) -> set[str]:
    return set(transformer.specs(model)["layers"]) & set(TARGETS)


def check(cfg) -> None:
    """One line for a target that names no weight of this model, or a rank no weight has room for."""
    chosen, present = targets(cfg), _projections(cfg.model)
    unknown = [t for t in chosen if t not in present]
    if unknown:
        raise LlmjaxError(f"lora.targets names {unknown}, which this model does not have; choose from "
                          f"{sorted(present)} or 'all'")
    if not chosen:
        return
    layers = transformer.specs(cfg.model)["layers"]
    shapes = {t: layers[t].shape[1:] for t in chosen}  # (input dims..., output dims...) of one layer's weight
    smallest = min(min(math.prod(s[:INPUT_DIMS.get(t, 1)]), math.prod(s[INPUT_DIMS.get(t, 1):]))
                   for t, s in shapes.items())
    if not 1 <= cfg.lora.rank <= smallest:
        raise LlmjaxError(f"lora.rank={cfg.lora.rank}: a rank needs 1 <= r <= {smallest}, the smallest dimension "
                          "of the adapted weights (r = min(in, out) is already full rank)")
    if cfg.lora.alpha <= 0:
        raise LlmjaxError(f"lora.alpha={cfg.lora.alpha}: the adapters' scale is alpha / rank, so alpha must be > 0")
    if not 0 <= cfg.lora.dropout < 1:
        raise LlmjaxError(f"lora.dropout={cfg.lora.dropout}: the chance of dropping an adapter input must lie in "
                          "[0, 1)")
    if cfg.lora.init not in ("kaiming", "gaussian"):
        raise LlmjaxError(f"lora.init={cfg.lora.init!r} is not one of ('kaiming', 'gaussian')")


def param_count(cfg) -> int:
    """The adapters' parameters in one language model: r (in + out) per adapted matrix per layer."""
    layers = transformer.specs(cfg.model)["layers"]
    return sum(layers[t].shape[0] * cfg.lora.rank * sum(map(math.prod, (s[:INPUT_DIMS.get(t, 1)],
                                                                          s[INPUT_DIMS.get(t, 1):])))
               for t in targets(cfg) for s in [layers[t].shape[1:]])


def _frozen(tree):
    return jax.tree.map(lambda s: s._replace(trainable=False), tree, is_leaf=is_spec)


def _uniform(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _adapted(w: ParamSpec, name: str, cfg) -> dict:
    r, k = cfg.lora.rank, INPUT_DIMS.get(name, 1)
    fan_in = math.prod(w.shape[1:1 + k])
    # PEFT's defaults: kaiming_uniform(a=sqrt(5)) bounds A by 1/sqrt(fan_in); "gaussian" draws A with std 1/r.
    init_a = _uniform(1 / math.sqrt(fan_in)) if cfg.lora.init == "kaiming" else normal(1 / r)
    out = {"base": w._replace(trainable=False),
           "lora_a": ParamSpec((w.shape[0], *w.shape[1:1 + k], r), (w.axes[0], *w.axes[1:1 + k], None), init_a),
           "lora_b": ParamSpec((w.shape[0], r, *w.shape[1 + k:]), (w.axes[0], None, *w.axes[1 + k:]), zeros),
           "lora_scale": _constant(w, cfg.lora.alpha / r)}
    if cfg.lora.dropout:
        out["lora_dropout"] = _constant(w, cfg.lora.dropout)
    return out


def _constant(w: ParamSpec, value: float) -> ParamSpec:
    """A frozen per-layer number that the scanned layer reads (the scale, the dropout rate)."""
    return ParamSpec(w.shape[:1], w.axes[:1], lambda key, shape, dtype: jnp.full(shape, value, dtype), False)


def apply(layout: dict, cfg) -> dict:
    """The layout with every language model in it (a trunk, a policy, a value model) adapted by cfg.lora, its
    other leaves frozen; heads stay trainable. Without targets, the layout as it is."""
    chosen = targets(cfg)
    if not chosen:
        return layout
    if is_lm(layout):
        out = _frozen(layout)
        out["layers"] = {k: _adapted(v, k, cfg) if k in chosen else v for k, v in out["layers"].items()}
        return out
    return {k: apply(v, cfg) if isinstance(v, dict) else v for k, v in layout.items()}


def trainable(layout: dict) -> dict:
    """True at every leaf the step trains."""
    return jax.tree.map(lambda s: s.trainable, layout, is_leaf=is_spec)


def is_adapted(w) -> bool:
    return isinstance(w, dict) and "lora_a" in w


def attach(fresh: Params, given: Params) -> Params:
    """`given` (plain weights read from another run) placed as the bases of `fresh`'s adapted leaves."""
    if is_adapted(fresh) and not is_adapted(given):
        return fresh | {"base": given}
    if not isinstance(given, dict):
        return given
    return {k: attach(fresh[k], given[k]) if k in given and k in fresh else given[k] for k in given}


def is_lm(tree) -> bool:
    return isinstance(tree, dict) and "layers" in tree and "embed" in tree


def restore(saved: Params, base: Params, cfg) -> Params:
    """A LoRA run's parameters from what its checkpoint holds (the adapters and heads, None elsewhere) and the
    base model it points to: every adapted language model in `saved` gets `base`'s weights."""
    if is_lm(saved):
        scale = jnp.float32(cfg.lora.alpha / cfg.lora.rank)
        layers = {k: {"base": w, "lora_a": saved["layers"][k]["lora_a"], "lora_b": saved["layers"][k]["lora_b"],
                      "lora_scale": jnp.full(w.shape[:1], scale, w.dtype)} if is_adapted(saved["layers"][k]) else w
                  for k, w in base["layers"].items()}
        return base | {"layers": layers}
    return {k: restore(v, base, cfg) for k, v in saved.items()} if isinstance(saved, dict) else saved


def keyed(params: Params, key: jax.Array | None) -> Params:
    """The parameters with a dropout key per layer beside every adapter that has a dropout rate: what a training
    step's loss sees (evaluation and sampling never get keys, so never drop)."""
    if key is None:
        return params
    count = iter(range(1 << 30))

    def walk(tree):
        if is_adapted(tree) and "lora_dropout" in tree:
            layers = tree["lora_dropout"].shape[0]
            return tree | {"lora_key": jax.random.split(jax.random.fold_in(key, next(count)), layers)}
        return {k: walk(v) for k, v in sorted(tree.items())} if isinstance(tree, dict) else tree

    return walk(params)


def strip(params: Params) -> Params:
    """The adapters switched off: the base model, the reference LoRA's DPO and PPO use (the same arrays)."""
    if is_adapted(params):
        return params["base"]
    return {k: strip(v) for k, v in params.items()} if isinstance(params, dict) else params


def merge(params: Params) -> Params:
    """The adapters folded into their weights: W + s A B, a plain model (float32 sums, then the weight's dtype)."""
    if is_adapted(params):
        a, b, w = params["lora_a"], params["lora_b"], params["base"]
        L, r = a.shape[0], a.shape[-1]
        delta_LIO = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r).astype(jnp.float32),
                               b.reshape(L, r, -1).astype(jnp.float32))
        delta_LIO = delta_LIO * params["lora_scale"].astype(jnp.float32)[:, None, None]
        return (w.astype(jnp.float32) + delta_LIO.reshape(w.shape)).astype(w.dtype)
    return {k: merge(v) for k, v in params.items()} if isinstance(params, dict) else params
