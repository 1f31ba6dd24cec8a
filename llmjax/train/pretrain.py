"""Next-token training: pretraining, and SFT (the same objective; the loss mask hides prompts).

Parameters: a language model. It starts fresh, or from the language model of the run in cfg.init_from (a
pretraining, SFT or DPO run, or a PPO run's policy); a reward run holds no language model and is refused.
"""

from functools import partial

import jax

from llmjax import losses
from llmjax.data import mixture, synthetic
from llmjax.evaluate import make_evaluator
from llmjax.models import moe, transformer
from llmjax.sharding import Constrain
from llmjax.train.common import Batch, Context, Definition, Objective, lm_flops, tokens


def loss_fn(params: transformer.Params, batch: Batch, cfg, constrain: Constrain,
            normalizer: jax.Array | None = None) -> tuple[jax.Array, dict]:
    out = transformer.forward(params, batch["inputs"], batch["positions"], batch["segment_ids"], cfg.model, constrain)
    loss, aux = losses.cross_entropy(out.logits_BTV, batch["targets"], batch["loss_mask"], cfg.loss.z_loss, normalizer)
    router_loss, router = moe.loss(out.moe, cfg.model)
    return loss + router_loss, aux | router


def validate(cfg, sizes: dict[str, int]) -> None:
    """Beyond the common checks (init_from is read, and refused, before anything compiles): a long-range task's
    documents fit a row whole (synthetic.check_rows)."""
    view = mixture.synthetic_view(cfg)
    if view is not None:
        synthetic.check_rows(view)


def define(ctx: Context) -> Definition:
    cfg = ctx.cfg
    iterator, batches = mixture.batches(cfg, ctx.sharding)
    evaluate = make_evaluator(cfg, ctx.mesh, ctx.constrain, n=cfg.eval_prompts) if cfg.eval_every else None
    start = ctx.read(cfg.init_from, "lm", "pretraining/SFT") if cfg.init_from else lambda: None
    return Definition(loss=partial(loss_fn, cfg=cfg, constrain=ctx.constrain), source=lambda _, i: batches(i),
                      weight=tokens, start=start, evaluate=evaluate, data_iterator=iterator)


OBJECTIVE = Objective("pretrain", define, validate, layout=lambda cfg: transformer.specs(cfg.model),
                      flops_per_token=lm_flops, parts={"lm": ()}, sequences=lambda cfg: 1)
