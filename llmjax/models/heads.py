"""Scalar heads on the trunk's final hidden states: a reward model's score, a value function's estimates.

A head model's parameters are {"trunk": a language model's parameters, "head": {"w", "b"}}, so a reward model
starts from an SFT or pretraining run's parameters with a fresh head, and its trunk stays a language model.
"""

import math

import jax
import jax.numpy as jnp

from llmjax.models import transformer
from llmjax.models.transformer import Params, ParamSpec
from llmjax.sharding import Constrain, no_constrain


def specs(cfg) -> Params:
    """A trunk (cfg = cfg.model) with a linear scalar head; the head starts small, like a fresh layer of width
    d_model."""
    d = cfg.d_model
    return {"trunk": transformer.specs(cfg),
            "head": {"w": ParamSpec((d,), ("embed",), transformer.normal(1 / math.sqrt(d + 1))),
                     "b": ParamSpec((), (), transformer.zeros)}}


def values(params: Params, rows: dict[str, jax.Array], cfg,
           constrain: Constrain = no_constrain) -> tuple[jax.Array, dict]:
    """The head's scalar at every position, float32 values_BT, and the trunk's MoE statistics (the trunk's logits
    are never used, so XLA drops the unembedding)."""
    out = transformer.forward(params["trunk"], rows["inputs"], rows["positions"], rows["segment_ids"], cfg,
                              constrain)
    return apply(params["head"], out.h_BTD), out.moe


def apply(head: Params, h_BTD: jax.Array) -> jax.Array:
    """A head {"w", "b"} on hidden states: float32 values_BT."""
    return jnp.einsum("btd,d->bt", h_BTD.astype(jnp.float32), head["w"].astype(jnp.float32)) + head["b"]


def last_index(mask_BT: jax.Array) -> jax.Array:
    """Each row's last position where mask_BT is nonzero (T - 1 for an empty row, which callers weigh 0)."""
    T = mask_BT.shape[-1]
    return T - 1 - jnp.argmax(jnp.flip(mask_BT > 0, axis=-1), axis=-1)


def at_last(values_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """values_B read at each row's last masked-in position: a sequence's score from the state that has seen
    all of it."""
    return jnp.take_along_axis(values_BT, last_index(mask_BT)[:, None], axis=-1)[:, 0]


def scores(params: Params, rows: dict[str, jax.Array], cfg,
           constrain: Constrain = no_constrain) -> tuple[jax.Array, dict]:
    """A reward model's score of every sequence of rows [B, C, T] (or [B, T]): scores_BC (scores_B), read where
    each row's loss mask ends, and the trunk's MoE statistics."""
    lead = rows["inputs"].shape[:-1]
    flat = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), rows)
    values_BT, stats = values(params, flat, cfg, constrain)
    return at_last(values_BT, flat["loss_mask"]).reshape(lead), stats
