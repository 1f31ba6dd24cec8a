"""DPO and its relatives: the policy learns from preference pairs, kept near a frozen reference.

The policy starts from an SFT checkpoint (cfg.init_from) and the reference is the same checkpoint. Reference
log-probs come either live (the reference is a frozen argument of every step) or precomputed once in a pass
over the run's batches and stored in the workdir, so the reference need not stay in memory or be run again.
"""

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llmjax import losses
from llmjax.config import check_ranges
from llmjax.data import mixture, preference
from llmjax.errors import LlmjaxError
from llmjax.evaluate import make_evaluator
from llmjax.losses import DPO_LOSSES
from llmjax.models import lora, moe, transformer
from llmjax.sharding import Constrain, process_rows
from llmjax.train.common import Batch, Context, Definition, Objective, lm_flops


def _per_sequence(batch: dict, values: Callable[[Batch], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(chosen_B, rejected_B) sums of per-token values, from two rows per pair or one packed row whose
    segment 1 is the chosen sequence and segment 2 the rejected one."""
    if "packed" in batch:
        rows = batch["packed"]
        v_BT = values(rows)
        return tuple(jnp.sum(v_BT * (rows["segment_ids"] == s), axis=-1) for s in (1, 2))
    return tuple(jnp.sum(values(batch[k]), axis=-1) for k in ("chosen", "rejected"))


def pair_logps(params, batch: dict, cfg, constrain: Constrain) -> tuple[jax.Array, jax.Array, dict]:
    """Sequence log-probs (sums over response tokens) of the chosen and rejected answers, and the MoE statistics
    of the forwards that computed them."""
    stats = []

    def logp_BT(rows: Batch) -> jax.Array:
        out = transformer.forward(params, rows["inputs"], rows["positions"], rows["segment_ids"], cfg.model,
                                  constrain)
        stats.append(out.moe)
        return losses.sequence_logprobs(out.logits_BTV, rows["targets"], rows["loss_mask"])

    return *_per_sequence(batch, logp_BT), moe.merge(*stats)


def loss_fn(params, batch: dict, cfg, constrain: Constrain, reference=None) -> tuple[jax.Array, dict]:
    policy_chosen, policy_rejected, stats = pair_logps(params, batch, cfg, constrain)
    if reference is None:
        ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
    else:
        ref_chosen, ref_rejected = jax.lax.stop_gradient(pair_logps(reference, batch, cfg, constrain)[:2])
    chosen_len, rejected_len = _per_sequence(batch, lambda rows: rows["loss_mask"])
    d = cfg.dpo
    loss, aux = losses.dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, kind=d.loss, beta=d.beta,
                           label_smoothing=d.label_smoothing, chosen_len_B=chosen_len,
                           rejected_len_B=rejected_len, simpo_gamma=d.simpo_gamma, nll_weight=d.nll_weight)
    router_loss, router = moe.loss(stats, cfg.model)
    return loss + router_loss, aux | router | {"logp_chosen": jnp.mean(policy_chosen),
                                               "logp_rejected": jnp.mean(policy_rejected)}


def precompute_reference(cfg, workdir: str, reference: Callable[[], dict], get: Callable[[int], dict], sharding,
                         constrain: Constrain, abstract: bool = False) -> Callable[[int], dict]:
    """The batches with the reference's log-probs attached as ref_chosen / ref_rejected: those of every batch of
    the run, computed once into workdir/reference_logps.npz at the first call (inside the loop, which holds the
    workdir: building a task writes nothing), the reference read (`reference()`) for that pass alone. `abstract`
    (the estimate, which reads no run): zeros of their shape."""
    path = os.path.join(workdir, "reference_logps.npz")
    rows = process_rows(sharding, (cfg.batch_size, cfg.seq_len))
    stored = {}
    if abstract:
        stored.update({k: np.zeros((cfg.steps, cfg.batch_size), np.float32) for k in ("ref_chosen", "ref_rejected")})

    def load() -> dict[str, np.ndarray]:
        if not os.path.exists(path):
            fn, params = jax.jit(lambda ref, b: pair_logps(ref, b, cfg, constrain)[:2]), reference()
            logps = [multihost_utils.process_allgather(fn(params, get(s)), tiled=True) for s in range(cfg.steps)]
            del params
            if jax.process_index() == 0:
                os.makedirs(workdir, exist_ok=True)
                np.savez(path + ".tmp.npz", ref_chosen=np.stack([c for c, _ in logps]),
                         ref_rejected=np.stack([r for _, r in logps]))
                os.replace(path + ".tmp.npz", path)  # never a half-written file under the real name
            multihost_utils.sync_global_devices("reference_logps")
        return dict(np.load(path))

    def with_reference(step: int) -> dict:
        if not stored:
            stored.update(load())
        return get(step) | {k: jax.make_array_from_process_local_data(sharding, v[step][rows.start:rows.stop],
                                                                      (cfg.batch_size,)) for k, v in stored.items()}

    return with_reference


RANGES = {
    "dpo.beta": ("(0, inf)", "the strength of the pull to the reference, in every DPO loss; IPO divides by it"),
    "dpo.label_smoothing": ("[0, 0.5)", "the chance that a pair's labels are flipped; at 0.5 no preference is left"),
    "dpo.nll_weight": ("[0, inf)", "the weight of the chosen response's NLL; below 0 it unlearns the chosen"),
}


def validate(cfg, sizes: dict[str, int]) -> None:
    if "dpo" not in cfg:
        raise LlmjaxError("a dpo run needs the dpo section; start from configs/dpo.py")
    check_ranges(cfg, RANGES)
    if cfg.dpo.loss not in DPO_LOSSES or cfg.dpo.reference not in ("live", "precomputed"):
        raise LlmjaxError(f"dpo.loss={cfg.dpo.loss!r} / dpo.reference={cfg.dpo.reference!r}: choose a loss from "
                          f"{DPO_LOSSES} and a reference from ('live', 'precomputed')")
    if cfg.dpo.label_smoothing and cfg.dpo.loss not in ("sigmoid", "cdpo"):
        raise LlmjaxError(f"dpo.label_smoothing={cfg.dpo.label_smoothing} applies to dpo.loss=sigmoid only, not "
                          f"{cfg.dpo.loss!r}; set --config.dpo.label_smoothing=0")
    if not cfg.init_from:
        raise LlmjaxError("DPO starts from an SFT run: set --config.init_from=WORKDIR")
    if cfg.loss.z_loss:
        raise LlmjaxError("loss.z_loss applies to next-token training only; set --config.loss.z_loss=0")
    if cfg.eval_every and mixture.synthetic_view(cfg) is None:
        raise LlmjaxError(f"DPO evaluates on the synthetic tasks' held-out prompts, not data.source="
                          f"{cfg.data.source!r}; set --config.eval_every=0")


def flops_per_token(cfg) -> float:
    """Policy forward and backward on chosen and rejected tokens, plus the live reference's forward."""
    return lm_flops(cfg) + (lm_flops(cfg, forward=True) if cfg.dpo.reference == "live" else 0)


def define(ctx: Context) -> Definition:
    cfg, mesh = ctx.cfg, ctx.mesh
    adapted = bool(lora.targets(cfg))
    live = cfg.dpo.reference == "live"
    get = preference.batches(cfg, ctx.sharding, preference.source(cfg), layout="packed" if cfg.dpo.packed else "pairs")
    given = ctx.read(cfg.init_from, "lm", "DPO")
    frozen = (given(),) if live and not adapted else ()
    batches = get
    if not live:
        batches = precompute_reference(cfg, ctx.workdir, given, get, ctx.sharding, ctx.constrain, ctx.abstract)

    def loss(params, batch, reference=None):
        if adapted and live:  # LoRA's reference: the same base with the adapters off
            reference = lora.strip(params)
        return loss_fn(params, batch, cfg, ctx.constrain, reference)

    evaluate = make_evaluator(cfg, mesh, ctx.constrain, n=cfg.eval_prompts) if cfg.eval_every else None
    return Definition(loss=loss, source=lambda _, i: (batches(i), {}), start=lambda: frozen[0] if frozen else given(),
                      frozen=frozen, evaluate=evaluate)


OBJECTIVE = Objective("dpo", define, validate, layout=lambda cfg: transformer.specs(cfg.model),
                      flops_per_token=flops_per_token, parts={"lm": ()},
                      reference=lambda cfg: cfg.dpo.reference == "live",
                      sequences=lambda cfg: 1 if cfg.dpo.packed else 2)
