"""Reward modelling: a trunk with a scalar head learns to score preferred responses higher (Bradley-Terry).

Starts from the language model of an SFT or pretraining run (cfg.init_from) as its trunk, with a fresh head (or
from another reward run, head and all). Each prompt comes with K responses
ranked best first (K = 2: a chosen and a rejected one); its C(K,2) pairs each weigh 1/C(K,2), so every prompt
counts once however long its list (InstructGPT). The score is read from the hidden state at the response's last
token, or (reward.read=eos) at the eos that ends it, fed as an input.

A judge trained only on near misses learns shortcuts that a policy then exploits (on sort: "the digits ascend"), so
the synthetic pairs' wrong answers come in kinds (reward.negatives, tasks.NEGATIVES), and the policy's own best
and worst answers (reward.onpolicy, written by llmjax.rejection_sample --pairs_out) can be mixed in. Evaluation
reports the held-out pair accuracy of every kind, so a researcher sees which wrong answers the model tells apart.
"""

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import losses, runs
from llmjax.config import check_ranges
from llmjax.data import preference, sources, tasks
from llmjax.data.synthetic import HELD_OUT
from llmjax.errors import LlmjaxError
from llmjax.models import heads, moe
from llmjax.sharding import Constrain
from llmjax.train.common import Context, Definition, Objective, lm_flops

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Mixture:
    """What the pairs are made of (cfg.reward): the kinds of wrong answer synthetic pairs draw uniformly, and a
    files: source of on-policy pairs that replaces that fraction of the training rows. A reward config without
    these keys (one written before them) keeps near-miss pairs alone."""

    negatives: str = "corrupt"
    onpolicy: str = ""
    onpolicy_fraction: float = 0.0

    @classmethod
    def of(cls, cfg) -> "Mixture":
        return cls(**{f.name: cfg.reward[f.name] for f in dataclasses.fields(cls) if f.name in cfg.reward})


def loss_fn(params, batch: dict, cfg, constrain: Constrain) -> tuple[jax.Array, dict]:
    """Bradley-Terry over every ranked pair (i better than j), margin reward.margin per rank apart, plus the
    trunk's MoE router losses."""
    rows = batch["responses"]
    r_BC, stats = heads.scores(params, rows, cfg.model, constrain)
    valid_BC = jnp.any(rows["loss_mask"] > 0, axis=-1).astype(jnp.float32)
    n_B = jnp.sum(valid_BC, axis=-1)
    pairs = list(itertools.combinations(range(r_BC.shape[1]), 2))
    better, worse = (np.array(idx) for idx in zip(*pairs, strict=True))
    weight_BQ = valid_BC[:, better] * valid_BC[:, worse] / jnp.maximum(n_B * (n_B - 1) / 2, 1)[:, None]
    margin_Q = cfg.reward.margin * (worse - better)
    loss, aux = losses.bradley_terry(r_BC[:, better].ravel(), r_BC[:, worse].ravel(),
                                     jnp.broadcast_to(margin_Q, weight_BQ.shape).ravel(), weight_BQ.ravel())
    count = jnp.maximum(jnp.sum(valid_BC), 1)
    mean = jnp.sum(r_BC * valid_BC) / count
    std = jnp.sqrt(jnp.sum(jnp.square(r_BC - mean) * valid_BC) / count)
    router_loss, router = moe.loss(stats, cfg.model)
    return loss + router_loss, aux | router | {"reward_mean": mean, "reward_std": std,
                                               "reward_best": jnp.mean(r_BC[:, 0])}


def pairs(batch: dict) -> jax.Array:
    """What the loss averages over: prompts with at least two responses (each prompt's pairs weigh 1 in all)."""
    return jnp.sum(jnp.sum(jnp.any(batch["responses"]["loss_mask"] > 0, axis=-1), axis=-1) >= 2)


def validate(cfg, sizes: dict[str, int]) -> None:
    if cfg.data.format != "chat":
        raise LlmjaxError(f"data.format={cfg.data.format!r}: a reward model reads prompts and responses through the "
                          "chat template; set --config.data.format=chat")
    if cfg.loss.z_loss:
        raise LlmjaxError("loss.z_loss applies to next-token training only; set --config.loss.z_loss=0")
    if "reward" not in cfg or cfg.reward.read not in ("last", "eos") or cfg.reward.responses < 2:
        raise LlmjaxError("a reward run needs reward.read in ('last', 'eos') and reward.responses >= 2 (responses "
                          "ranked per prompt); start from configs/reward.py")
    ranges = {"reward.margin": ("[0, inf)", "how much more a response one rank better must score; below 0 a worse "
                                            "response may outscore a better one"),
              "reward.onpolicy_fraction": ("[0, 1]", "the share of training rows drawn from reward.onpolicy")}
    check_ranges(cfg, {key: r for key, r in ranges.items() if key.split(".")[1] in cfg.reward})
    mixture = Mixture.of(cfg)
    tasks.check_negatives("reward.negatives", mixture.negatives)
    path = mixture.onpolicy.removeprefix("files:")
    if mixture.onpolicy and (path == mixture.onpolicy or not os.path.exists(os.path.expanduser(path))):
        raise LlmjaxError(f"reward.onpolicy={mixture.onpolicy!r} is not files:PATH of an existing file or folder; "
                          "write them with `python -m llmjax.rejection_sample --pairs_out=P.jsonl`, pass files:P.jsonl")


def onpolicy(cfg, split: str) -> sources.Records | None:
    """reward.onpolicy's preference records of `split` (data.validation of them held out), any problem refused in
    one line naming the key; None for a validation split that holds none (the evaluation leaves them out)."""
    source = cfg.reward.onpolicy
    try:
        return sources.load(source, cfg.data.data_dir, split, kind="preference", validation=cfg.data.validation)
    except sources.NoSplit as e:
        if split == "validation":
            logger.warning("reward.onpolicy=%r holds no held-out pairs, so evaluation leaves them out; raise "
                           "--config.data.validation to measure them", source)
            return None
        raise LlmjaxError(f"reward.onpolicy={source!r} has no train records ({e}); lower --config.data.validation"
                          ) from None
    except (OSError, ValueError) as e:
        raise LlmjaxError(f"reward.onpolicy={source!r}: {str(e).splitlines()[0]}") from None


def training(cfg, k: int) -> preference.Ranked:
    """The training rows: data.source's (synthetic pairs with wrong answers of reward.negatives' kinds), each one
    replaced by an on-policy pair with probability reward.onpolicy_fraction."""
    mixture = Mixture.of(cfg)
    ranked = preference.source(cfg, k=k, negatives=mixture.negatives.split(","))
    if not mixture.onpolicy:
        return ranked
    records = preference.from_records(onpolicy(cfg, "train"), cfg.seed, cfg.batch_size)
    return preference.mix(ranked, records, mixture.onpolicy_fraction, cfg.seed)


def held_out(cfg, k: int) -> dict[str, tuple[preference.Ranked, float, int]]:
    """The evaluation's held-out rows by kind: name -> (rows, share of the training rows, batches). Synthetic pairs
    of every kind of wrong answer, trained on or not (share 0: a run on near misses alone still shows which other
    wrong answers it tells apart), else data.source's validation records ("source"); and reward.onpolicy's
    validation records ("onpolicy"; at share 0 evaluated, not trained on). Each kind reads eval_prompts rows (the
    on-policy ones, all their records at most), so that the mean weighted by share is the training mixture's."""
    mixture, n = Mixture.of(cfg), max(1, cfg.eval_prompts // cfg.batch_size)
    records = onpolicy(cfg, "validation") if mixture.onpolicy else None
    rest = 1.0 if records is None else 1.0 - mixture.onpolicy_fraction
    if cfg.data.source == "synthetic":
        trained = mixture.negatives.split(",")
        share = {kind: rest / len(trained) if kind in trained else 0.0 for kind in tasks.NEGATIVES}
        out = {kind: (preference.source(cfg, "validation", HELD_OUT, k, (kind,)), share[kind], n) for kind in share}
    else:
        out = {"source": (preference.source(cfg, "validation", HELD_OUT, k), rest, n)}
    if records is not None:
        out["onpolicy"] = (preference.from_records(records, cfg.seed + HELD_OUT, cfg.batch_size),
                           mixture.onpolicy_fraction, min(n, -(-len(records) // cfg.batch_size)))
    return out


def reads_scorer(ctx: Context, run: str, reader: str) -> Callable[[], dict]:
    """A reward model from another run when called: the whole of a reward run's, else a language model's
    trunk (the head starts fresh). Checked now, read later."""
    if "scorer" in runs.run_parts(run):
        return ctx.read(run, "scorer", reader)
    lm = ctx.read(run, "lm", reader)
    return lambda: {"trunk": lm()}


def define(ctx: Context) -> Definition:
    cfg, sharding = ctx.cfg, ctx.sharding
    k, eos = cfg.reward.responses, cfg.reward.read == "eos"
    get = preference.batches(cfg, sharding, training(cfg, k), layout="ranked", k=k, eos_input=eos)
    loss = partial(loss_fn, cfg=cfg, constrain=ctx.constrain)
    evaluate = None
    if cfg.eval_every:
        kinds = {}
        for name, (ranked, share, n) in held_out(cfg, k).items():
            get_eval = preference.batches(cfg, sharding, ranked, layout="ranked", k=k, eos_input=eos)
            kinds[name] = ([get_eval(i) for i in range(n)], share)
        metrics_fn = jax.jit(loss)

        def evaluate(params) -> dict[str, float]:
            """The training mixture's metrics (each kind's weighted by its share), and each kind's accuracy."""
            means = {}
            for name, (batches, _) in kinds.items():
                rows = jax.device_get([metrics_fn(params, b) for b in batches])
                means[name] = {m: float(np.mean([loss if m == "loss" else aux[m] for loss, aux in rows]))
                               for m in ("loss", *rows[0][1])}
            mixed = {m: sum(share * means[name][m] for name, (_, share) in kinds.items())
                     for m in next(iter(means.values()))}  # the shares sum to 1
            return mixed | {f"accuracy/{name}": metrics["accuracy"] for name, metrics in means.items()}

    start = reads_scorer(ctx, cfg.init_from, "a reward model") if cfg.init_from else lambda: None
    return Definition(loss=loss, source=lambda _, i: (get(i), {}), weight=pairs, start=start, evaluate=evaluate)


OBJECTIVE = Objective("reward", define, validate, layout=lambda cfg: heads.specs(cfg.model), flops_per_token=lm_flops,
                      parts={"scorer": ()}, at_eos=lambda cfg: cfg.reward.read == "eos")
