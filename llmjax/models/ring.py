"""Context parallelism: attention exact across a sequence split over the mesh axes that `rules["seq"]` names.

Activations are sharded along the sequence everywhere else for free (every other layer works per token); only
attention mixes positions, so only it changes, as a `shard_map` kernel here. Two strategies:
  ring       each device keeps its queries while key/value chunks travel the ring (`ppermute`), one local
             attention per step merged exactly by online softmax; the backward pass sends the chunks round
             again and their gradients with them, so a device holds O(T / n) of the sequence at any time
  allgather  the key/value chunks gathered whole, then one local attention (simpler; O(T) keys per device)
The mask comes from explicit slot indices and segment ids, so any order of the sequence is exact. With causal
masks, contiguous chunks leave device 0 idle on all but one step; `balance` puts the sequence in zigzag order
(device i holds chunks i and 2n-1-i of 2n), which gives every device the same unmasked work at every step.

`local(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS, window) -> (o_BTNH, lse_BNT)`
is any attention with that contract (a fully masked query gives o = 0, lse = -inf), e.g.
llmjax.models.attention's `reference` or `blockwise`.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llmjax.errors import LlmjaxError
from llmjax.models import attention as attention_lib
from llmjax.sharding import Constrain, attention_specs, spec

Local = Callable[..., tuple[jax.Array, jax.Array]]
STRATEGIES = ("ring", "allgather")


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def seq_axes(constrain: Constrain) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the sequence; () without a mesh."""
    if constrain.mesh is None:
        return ()
    return _names(spec(("batch", "seq"), constrain.rules, constrain.mesh)[1])


def _size(constrain: Constrain, axes: tuple[str, ...]) -> int:
    return math.prod(constrain.mesh.shape[a] for a in axes)


def _check_length(T: int, parts: int, axes: tuple[str, ...], constrain: Constrain, why: str) -> None:
    if T % parts:
        sizes = " x ".join(f"mesh.{a}={constrain.mesh.shape[a]}" for a in axes)
        raise LlmjaxError(f"seq_len={T} is not divisible by {why}{sizes}; use a seq_len that is a multiple of "
                          f"{parts}")


def _zigzag(n: int) -> np.ndarray:
    """Chunk order of 2n chunks: device i holds chunks i and 2n-1-i."""
    return np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)


def _reorder(x_BT: jax.Array, order: np.ndarray) -> jax.Array:
    """The sequence's chunks in `order`, as static slices (a gather along a split axis would be replicated)."""
    size = x_BT.shape[1] // len(order)
    return jnp.concatenate([x_BT[:, i * size:(i + 1) * size] for i in order.tolist()], axis=1)


def pad(x_BT: jax.Array, constrain: Constrain) -> jax.Array:
    """A [B, T, ...] array zero-padded on the right to whole zigzag chunks (two per device on the context axes), so
    that rows of any width can be split: padded tokens have segment id 0, which no real token sees."""
    axes = seq_axes(constrain)
    extra = -x_BT.shape[1] % (2 * _size(constrain, axes)) if axes else 0
    return jnp.pad(x_BT, [(0, 0), (0, extra)] + [(0, 0)] * (x_BT.ndim - 2)) if extra else x_BT


def balance(x_BT: jax.Array, constrain: Constrain) -> jax.Array:
    """A [B, T, ...] array's sequence in zigzag order over the context axes (identity without them): apply it once
    to the token-level inputs (tokens, positions, segment ids, slot indices) so each device's causal work is even."""
    axes = seq_axes(constrain)
    if not axes:
        return x_BT
    n = _size(constrain, axes)
    _check_length(x_BT.shape[1], 2 * n, axes, constrain, "2 x ")
    return _reorder(x_BT, _zigzag(n))


def unbalance(x_BT: jax.Array, constrain: Constrain) -> jax.Array:
    """`balance` undone: the sequence back in its natural order."""
    axes = seq_axes(constrain)
    if not axes:
        return x_BT
    n = _size(constrain, axes)
    _check_length(x_BT.shape[1], 2 * n, axes, constrain, "2 x ")
    return _reorder(x_BT, np.argsort(_zigzag(n)))


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_segment_BT: jax.Array,
              kv_segment_BS: jax.Array, q_index_BT: jax.Array, kv_index_BS: jax.Array, window: jax.Array | int,
              constrain: Constrain, local: Local, strategy: str = "ring") -> jax.Array:
    """o_BTNH of `local` attention over global arrays whose sequence is split over the context axes, exact
    whatever the split; `local` alone when nothing splits it. `window` may be traced (a scanned layer's own)."""
    if strategy not in STRATEGIES:
        raise LlmjaxError(f"model.context_parallel={strategy!r} is not one of {STRATEGIES}; "
                          "set --config.model.context_parallel")
    q_BTNH, *masks = attention_lib.tied(q_BTNH, q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS)
    args = (q_BTNH, k_BSKH, v_BSKH, *masks)
    axes = seq_axes(constrain)
    if not axes:
        return local(*args, window)[0]
    _check_length(q_BTNH.shape[1], _size(constrain, axes), axes, constrain, "")
    mesh = constrain.mesh
    q_spec, kv_spec, int_spec = attention_specs(q_BTNH, k_BSKH, constrain.rules, mesh)
    kernel = functools.partial(_ring_attention if strategy == "ring" else _allgather, local, axes)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, *[int_spec] * 4, PartitionSpec()),
                         out_specs=q_spec)(*args, jnp.asarray(window, jnp.int32))


def _allgather(local, axes, q, k, v, q_segment, kv_segment, q_index, kv_index, window):
    k, v, kv_segment, kv_index = (jax.lax.all_gather(a, axes, axis=1, tiled=True)
                                  for a in (k, v, kv_segment, kv_index))
    return local(q, k, v, q_segment, kv_segment, q_index, kv_index, window)[0]


def _shift(axes, *xs):
    """Each array to the next device of the ring."""
    n = jax.lax.axis_size(axes)
    return tuple(jax.lax.ppermute(x, axes, [(i, (i + 1) % n) for i in range(n)]) for x in xs)


def _share(lse_BNT: jax.Array, total_BNT: jax.Array) -> jax.Array:
    """exp(lse - total), a step's share of the softmax, as o's [B, T, N, 1] factor (0 where every key is masked)."""
    seen = jnp.isfinite(total_BNT)
    w_BNT = jnp.where(seen, jnp.exp(lse_BNT - jnp.where(seen, total_BNT, 0.0)), 0.0)
    return w_BNT.transpose(0, 2, 1)[..., None]


def _forward(local, axes, q, k, v, q_segment, kv_segment, q_index, kv_index, window):
    """(o, lse) over the whole ring: a local attention per visiting chunk, merged by online softmax."""
    o, lse = local(q, k, v, q_segment, kv_segment, q_index, kv_index, window)
    o = o.astype(jnp.float32)
    for _ in range(jax.lax.axis_size(axes) - 1):
        k, v, kv_segment, kv_index = _shift(axes, k, v, kv_segment, kv_index)
        o_i, lse_i = local(q, k, v, q_segment, kv_segment, q_index, kv_index, window)
        total = jnp.logaddexp(lse, lse_i)
        o = _share(lse, total) * o + _share(lse_i, total) * o_i.astype(jnp.float32)
        lse = total
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring_attention(local, axes, q, k, v, q_segment, kv_segment, q_index, kv_index, window):
    return _forward(local, axes, q, k, v, q_segment, kv_segment, q_index, kv_index, window)[0]


def _ring_fwd(local, axes, *args):
    o, lse = _forward(local, axes, *args)
    return o, (args, o, lse)


def _ring_bwd(local, axes, res, do):
    """The chunks go round again; each step's local attention is differentiated with the cotangents that the merge
    hands it (o = sum_i w_i o_i, w_i = exp(lse_i - lse): do_i = w_i do, dlse_i = w_i <do, o_i - o>), and each
    chunk's key/value gradients travel with it, one more hop bringing them home."""
    (q, k, v, q_segment, kv_segment, q_index, kv_index, window), o, lse = res
    do32, o32 = do.astype(jnp.float32), o.astype(jnp.float32)
    dq, dk, dv = (jnp.zeros(a.shape, jnp.float32) for a in (q, k, v))
    for step in range(jax.lax.axis_size(axes)):
        if step:
            k, v, kv_segment, kv_index, dk, dv = _shift(axes, k, v, kv_segment, kv_index, dk, dv)
        (o_i, lse_i), vjp = jax.vjp(lambda *a: local(*a, window), q, k, v, q_segment, kv_segment, q_index, kv_index)
        w = _share(lse_i, lse)
        dlse_i = jnp.sum(w * do32 * (o_i.astype(jnp.float32) - o32), axis=-1).transpose(0, 2, 1)
        dq_i, dk_i, dv_i, *_ = vjp(((w * do32).astype(o_i.dtype), dlse_i.astype(lse_i.dtype)))
        dq, dk, dv = dq + dq_i, dk + dk_i, dv + dv_i
    dk, dv = _shift(axes, dk, dv)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None


_ring_attention.defvjp(_ring_fwd, _ring_bwd)
