"""The optimizer from cfg.optim: AdamW, linear warmup then cosine/linear/constant or warmup-stable-decay,
global-norm clipping.

Weight decay applies to matrices only. Read from the specs' logical axes: a matrix maps the model width
("embed") to another axis; norm scales and biases are vectors over one feature space, even when stored per
head (bq: heads x head_dim) or stacked per layer.
"""

import jax
import optax

from llmjax.models.transformer import is_spec


def wsd_decay_steps(cfg) -> int:
    """The steps warmup-stable-decay decays over: optim.decay_fraction of the run, at least one."""
    return max(1, round(cfg.optim.decay_fraction * cfg.steps))


def schedule(cfg) -> optax.Schedule:
    """Linear warmup to optim.lr, then cosine or linear decay to lr * min_lr_ratio at the last step, constant,
    or warmup-stable-decay (wsd: Hu et al. 2024, MiniCPM): lr held until the last decay_fraction of the run, then
    a linear decay to lr * min_lr_ratio, so a run can be continued from before its decay, or annealed."""
    o = cfg.optim
    decay_steps = max(cfg.steps - o.warmup_steps, 1)
    warmup = optax.linear_schedule(0.0, o.lr, o.warmup_steps)
    if o.schedule == "wsd":
        stable = max(cfg.steps - o.warmup_steps - wsd_decay_steps(cfg), 0)
        decay = optax.linear_schedule(o.lr, o.lr * o.min_lr_ratio, wsd_decay_steps(cfg))
        return optax.join_schedules([warmup, optax.constant_schedule(o.lr), decay],
                                    [o.warmup_steps, o.warmup_steps + stable])
    after = {
        "cosine": optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.min_lr_ratio),
        "linear": optax.linear_schedule(o.lr, o.lr * o.min_lr_ratio, decay_steps),
        "constant": optax.constant_schedule(o.lr),
    }[o.schedule]
    return optax.join_schedules([warmup, after], [o.warmup_steps])


def decay_mask(param_specs):
    """True on matrices, None on frozen leaves (which the optimizer never sees: llmjax.models.lora). A LoRA
    adapter's rank axis is unnamed, so both its matrices decay, as every matrix does."""
    def decays(s):
        matrix = ("embed" in s.axes or None in s.axes) and sum(a != "layers" for a in s.axes) >= 2
        return matrix if s.trainable else None

    return jax.tree.map(decays, param_specs, is_leaf=is_spec)


def make(cfg, param_specs) -> optax.GradientTransformation:
    o = cfg.optim
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=decay_mask(param_specs)),
    )
