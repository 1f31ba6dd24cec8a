"""The paged KV cache continuous batching decodes through: one pool of fixed-size pages per layer, shared by all
rows, and a page table per row.

Row b's token at sequence slot i lives in page table_BI[b, i // Z], at offset i % Z, so a row holds only the pages
its tokens fill and rows of different lengths share one batch: each row's new tokens go after its own length. A
row's new tokens are its real ones (segment id > 0) followed by padding (0), which is neither written nor counted:
an idle row passes only padding and stays as it was, and a bucketed prompt's padding never reaches a page.

A layer attends over its row's pages gathered in order (key slot = position in the row; slots past the row's
length get segment 0, which no real token has) followed by the new tokens themselves, so the mask
(llmjax.models.attention.visible) compares the same slots as without a cache, sliding windows included. The layers
only read the pools; every layer's new keys and values are written once, after the last layer (`advance`), so the
scan over layers carries out only the new tokens' keys and values, not a copy of every layer's pool.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Cache(NamedTuple):
    k_LJZKH: jax.Array
    v_LJZKH: jax.Array
    segment_JZ: jax.Array  # each cached token's segment id, which the mask compares
    table_BI: jax.Array  # each row's pages, in sequence order (entries past its length: any page, never seen)
    lengths_B: jax.Array  # tokens each row holds


class Pages(NamedTuple):
    """What the layers need of a paged cache: where each row's keys are."""

    table_BI: jax.Array


def init(cfg, pages: int, page_size: int, batch: int, max_pages: int) -> Cache:
    """An empty pool of `pages` pages of `page_size` tokens (cfg = cfg.model), and `batch` empty rows that can
    each hold `max_pages` of them."""
    shape = (cfg.n_layers, pages, page_size, cfg.n_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.compute_dtype)
    return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(shape[1:3], jnp.int32),
                 jnp.zeros((batch, max_pages), jnp.int32), jnp.zeros(batch, jnp.int32))


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def read(pool_JZ: jax.Array, table_BI: jax.Array) -> jax.Array:
    """Each row's pages in order, [B, I * Z, ...]: slot s of a row is its sequence slot s."""
    return pool_JZ[table_BI].reshape(table_BI.shape[0], -1, *pool_JZ.shape[2:])


def keys_values(pool_JZKH: jax.Array, new_BTKH: jax.Array, pages: Pages) -> jax.Array:
    """What a layer attends over: each row's cached slots, then its new tokens ([B, I * Z + T, K, H])."""
    return jnp.concatenate([read(pool_JZKH, pages.table_BI), new_BTKH], axis=1)


def slots(cache: Cache, segment_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(the keys' segment ids, the queries' slots, the keys' slots) of `keys_values`' keys: a padding query sees
    at least itself, a real one nothing past its row's length but the new tokens."""
    T = segment_ids_BT.shape[1]
    q_index_BT = cache.lengths_B[:, None] + jnp.arange(T)
    cached_BS = read(cache.segment_JZ, cache.table_BI)
    slot_BS = jnp.broadcast_to(jnp.arange(cached_BS.shape[1]), cached_BS.shape)
    cached_BS = jnp.where(slot_BS < cache.lengths_B[:, None], cached_BS, 0)
    return (jnp.concatenate([cached_BS, segment_ids_BT], axis=1), q_index_BT,
            jnp.concatenate([slot_BS, q_index_BT], axis=1))


def write(pool_JZ: jax.Array, new_BT: jax.Array, cache: Cache, segment_ids_BT: jax.Array) -> jax.Array:
    """The real tokens of new_BT (any trailing axes) into the pool at their rows' next slots."""
    J, Z = pool_JZ.shape[:2]
    slot_BT = cache.lengths_B[:, None] + jnp.arange(segment_ids_BT.shape[1])
    page_BT = jnp.take_along_axis(cache.table_BI, slot_BT // Z, axis=1, mode="clip")
    inside_BT = (segment_ids_BT > 0) & (slot_BT < cache.table_BI.shape[1] * Z)
    at_BT = jnp.where(inside_BT, page_BT * Z + slot_BT % Z, J * Z)  # past the pool: dropped
    flat = pool_JZ.reshape(J * Z, *pool_JZ.shape[2:]).at[at_BT].set(new_BT, mode="drop")
    return flat.reshape(pool_JZ.shape)


def advance(cache: Cache, k_LBTKH: jax.Array, v_LBTKH: jax.Array, segment_ids_BT: jax.Array) -> Cache:
    """The cache once every layer's new keys and values are written: each row longer by its real tokens."""
    write_layers = jax.vmap(write, (0, 0, None, None))
    return Cache(write_layers(cache.k_LJZKH, k_LBTKH, cache, segment_ids_BT),
                 write_layers(cache.v_LJZKH, v_LBTKH, cache, segment_ids_BT),
                 write(cache.segment_JZ, segment_ids_BT, cache, segment_ids_BT), cache.table_BI,
                 cache.lengths_B + jnp.sum(segment_ids_BT > 0, axis=1, dtype=jnp.int32))
