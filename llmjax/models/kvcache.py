"""The KV cache generation decodes through: every layer's keys and values in a ring of S slots.

The sequence's slot i is kept in ring slot i mod S. With S at least the sequence's length nothing wraps and the
ring is the plain left-to-right cache. A model whose every layer has a sliding window W needs only W + T - 1
slots when at most T tokens come a call (`ring_slots`): what the window has left behind is overwritten before
anyone could look at it again. A slot's segment id 0 means empty or padding, which no query attends to.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llmjax.models import presets


class Cache(NamedTuple):
    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    segment_ids_BS: jax.Array
    index: jax.Array  # sequence slots filled so far


def init(cfg, batch: int, slots: int) -> Cache:
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.compute_dtype)
    return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, slots), jnp.int32),
                 jnp.zeros((), jnp.int32))


def ring_slots(cfg, length: int, chunk: int) -> int:
    """The slots a sequence of `length` needs when it comes at most `chunk` tokens a call: all of it, unless every
    layer has a sliding window, which bounds it by the longest window + chunk - 1."""
    windows = presets.windows(cfg)
    return min(length, max(windows) + chunk - 1) if min(windows) > 0 else length


def write(ring_BS: jax.Array, new_BT: jax.Array, index: jax.Array) -> jax.Array:
    """new_BT into the ring (axis 1) at the sequence's slots index .. index + T - 1."""
    S, T = ring_BS.shape[1], new_BT.shape[1]
    if T > S:
        raise ValueError(f"{T} tokens in one call do not fit a cache of {S} slots; pass at most {S} a call")
    if T == 1:  # decoding: a slice, which a cache split over devices updates in place
        return jax.lax.dynamic_update_slice_in_dim(ring_BS, new_BT, index % S, axis=1)
    return ring_BS.at[:, (index + jnp.arange(T)) % S].set(new_BT)


def keys(cache: Cache, segment_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(segment ids, sequence slots) of the ring's keys once T new tokens are written: the mask's key side. A ring
    slot holds the latest sequence slot congruent to it (negative: none yet)."""
    kv_segment_BS = write(cache.segment_ids_BS, segment_ids_BT, cache.index)
    S, last = kv_segment_BS.shape[1], cache.index + segment_ids_BT.shape[1] - 1
    ring_S = jnp.arange(S)
    return kv_segment_BS, jnp.broadcast_to(ring_S + S * ((last - ring_S) // S), kv_segment_BS.shape)
