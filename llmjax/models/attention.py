"""Memory-efficient attention in pure JAX: flash attention's online softmax, forward and backward, on any backend.

`blockwise` never materialises the T x S score matrix: the forward keeps a running max, sum and output per query
(float32) while it walks key blocks; the backward recomputes each block's probabilities from the saved
log-sum-exp, so memory grows as T * block, not T * S. It returns the log-sum-exp beside the output, and both are
differentiable, so ring attention (context parallelism) can merge partial results from other devices' chunks.
`reference` materialises the scores: the definition the blockwise one is tested against.

One mask for everything: query (slot index qi, segment qs) sees key (ki, ks) iff qs == ks and ki <= qi and
(window <= 0 or qi - ki < window). Slot indices are explicit arrays, not assumed to be aranges, so permuted
(zigzag) or offset chunks work. Grouped-query attention: query head n reads kv head n // (N // K).
"""

import functools
import math

import jax
import jax.numpy as jnp


def visible(q_segment_BT: jax.Array, kv_segment_BS: jax.Array, q_index_BT: jax.Array, kv_index_BS: jax.Array,
            window: jax.Array | int = 0) -> jax.Array:
    """The mask (True: the query sees the key) of the module docstring, as B x T x S."""
    qi_BT1, ki_B1S = q_index_BT[:, :, None], kv_index_BS[:, None, :]
    return ((q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]) & (ki_B1S <= qi_BT1)
            & ((window <= 0) | (qi_BT1 - ki_B1S < window)))


def reference(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_segment_BT: jax.Array,
              kv_segment_BS: jax.Array, q_index_BT: jax.Array, kv_index_BS: jax.Array,
              window: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """Plain softmax attention over the materialised float32 scores: (output in q's dtype, lse_BNT). A query that
    sees no key gives o = 0 and lse = -inf, and zero gradients (no NaN)."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.astype(jnp.float32).reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH.astype(jnp.float32)) / math.sqrt(H)
    mask_B11TS = visible(q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS, window)[:, None, None]
    s_BKGTS = jnp.where(mask_B11TS, s_BKGTS, -jnp.inf)
    m_BKGT = jax.lax.stop_gradient(jnp.max(s_BKGTS, axis=-1))  # the softmax is shift-invariant
    m_BKGT = jnp.where(jnp.isfinite(m_BKGT), m_BKGT, 0.0)
    p_BKGTS = jnp.exp(s_BKGTS - m_BKGT[..., None])
    o_BTKGH, lse_BKGT = _normalise(m_BKGT, jnp.sum(p_BKGTS, axis=-1),
                                   jnp.einsum("bkgts,bskh->bkgth", p_BKGTS, v_BSKH.astype(jnp.float32)))
    return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype), lse_BKGT.reshape(B, N, T)


def blockwise(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_segment_BT: jax.Array,
              kv_segment_BS: jax.Array, q_index_BT: jax.Array, kv_index_BS: jax.Array,
              window: jax.Array | int = 0, block_q: int = 512, block_k: int = 512) -> tuple[jax.Array, jax.Array]:
    """Flash attention: equals `reference` (output, lse_BNT and their gradients) in O(T * block) memory.

    `window` may be traced (a scanned layer's own window). Key blocks that no query of a query block can see
    (by the blocks' index and segment ranges) are skipped with `lax.cond`; under `vmap` of a batched predicate
    the cond becomes a select, which still gives the same numbers. Lengths that are not a multiple of the
    block are padded here (padded keys get a segment no query has) and sliced off.
    """
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    block_q, block_k = min(block_q, T), min(block_k, S)
    Tp, Sp = -(-T // block_q) * block_q, -(-S // block_k) * block_k
    no_segment = jnp.min(q_segment_BT) - 1
    o_BTNH, lse_BNT = _flash(
        _pad(q_BTNH, Tp, 0), _pad(k_BSKH, Sp, 0), _pad(v_BSKH, Sp, 0),
        _pad(q_segment_BT.astype(jnp.int32), Tp), _pad(kv_segment_BS.astype(jnp.int32), Sp, no_segment),
        _pad(q_index_BT.astype(jnp.int32), Tp), _pad(kv_index_BS.astype(jnp.int32), Sp),
        jnp.asarray(window, jnp.int32), block_q, block_k)
    return o_BTNH[:, :T], lse_BNT[:, :, :T]


def _pad(x: jax.Array, size: int, value: jax.Array | int | None = None) -> jax.Array:
    """Pads axis 1 to `size`: with `value`, or by repeating the last entry (which keeps a block's index range)."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, size - x.shape[1])
    return jnp.pad(x, widths, mode="edge") if value is None else jnp.pad(x, widths, constant_values=value)


def _normalise(m: jax.Array, l: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:  # noqa: E741
    """Output (B T K G H) and lse (B K G T) from the running max m, sum l and accumulator acc (B K G T H); a row
    with l = 0 saw nothing: o = 0, lse = -inf, with the log and division kept off 0 so gradients stay finite."""
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
    return jnp.transpose(acc / l_safe[..., None], (0, 3, 1, 2, 4)), lse


def _needed(q_segment_BT: jax.Array, kv_segment_BS: jax.Array, q_index_BT: jax.Array, kv_index_BS: jax.Array,
            window: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """Which (query block, key block) pairs may hold a visible pair, from each block's index and segment ranges:
    the rest is the causal upper triangle, out of the window, or other documents."""
    def ranges(x_BT: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
        x = x_BT.reshape(x_BT.shape[0], -1, block)
        return jnp.min(x, axis=(0, 2)), jnp.max(x, axis=(0, 2))

    (qi_lo, qi_hi), (qs_lo, qs_hi) = ranges(q_index_BT, block_q), ranges(q_segment_BT, block_q)
    (ki_lo, ki_hi), (ks_lo, ks_hi) = ranges(kv_index_BS, block_k), ranges(kv_segment_BS, block_k)
    return ((ki_lo[None] <= qi_hi[:, None]) & ((window <= 0) | (qi_lo[:, None] - ki_hi[None] < window))
            & (ks_lo[None] <= qs_hi[:, None]) & (qs_lo[:, None] <= ks_hi[None]))


def tied(x: jax.Array, *masks: jax.Array) -> tuple[jax.Array, ...]:
    """(x, *masks), the mask's inputs made to look as if they depended on `x`: otherwise XLA hoists every block's
    mask out of a loop over layers (the slot indices are the same in every layer) and stores them all, T x S."""
    return jax.lax.optimization_barrier((x, *masks))


def _zeros(shape: tuple[int, ...], *like: jax.Array) -> jax.Array:
    """Float32 zeros that vary over every mesh axis one of `like` varies over (inside `shard_map`), as the carry of
    a loop whose body reads them must."""
    return sum((jnp.zeros_like(x, jnp.float32, shape=()) for x in like), jnp.zeros(shape, jnp.float32))


def _block(x: jax.Array, i: jax.Array, size: int, axis: int = 1) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis)


def _scores(q_BTKGH: jax.Array, k_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Scaled float32 scores (B K G T S), -inf where masked."""
    s = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    return jnp.where(mask_BTS[:, None, None], s / math.sqrt(q_BTKGH.shape[-1]), -jnp.inf)


def _forward(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_segment_BT: jax.Array,
             kv_segment_BS: jax.Array, q_index_BT: jax.Array, kv_index_BS: jax.Array, window: jax.Array,
             block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    """Per query block, an online softmax over the key blocks it may see."""
    q_BTNH, q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS = tied(q_BTNH, q_segment_BT, kv_segment_BS,
                                                                         q_index_BT, kv_index_BS)
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    needed = _needed(q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS, window, block_q, block_k)

    def query_block(_, i):
        q, qs, qi = (_block(x, i, block_q) for x in (q_BTKGH, q_segment_BT, q_index_BT))

        def key_block(j, carry):
            def update(carry):
                m, l, acc = carry  # noqa: E741
                k, v, ks, ki = (_block(x, j, block_k) for x in (k_BSKH, v_BSKH, kv_segment_BS, kv_index_BS))
                s = _scores(q, k, visible(qs, ks, qi, ki, window))
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(s - m_safe[..., None])
                correction = jnp.exp(m - m_safe)  # rescales what was summed under the old max
                pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
                return m_new, correction * l + jnp.sum(p, axis=-1), correction[..., None] * acc + pv

            return jax.lax.cond(needed[i, j], update, lambda c: c, carry)

        acc0 = _zeros((B, K, G, block_q, H), q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, q_index_BT,
                      kv_index_BS, window)
        m, l, acc = jax.lax.fori_loop(0, needed.shape[1], key_block,  # noqa: E741
                                      (acc0[..., 0] - jnp.inf, acc0[..., 0], acc0))
        o, lse = _normalise(m, l, acc)
        return None, (o.reshape(B, block_q, N, H).astype(q_BTNH.dtype), lse.reshape(B, N, block_q))

    _, (o_blocks, lse_blocks) = jax.lax.scan(query_block, None, jnp.arange(needed.shape[0]))  # block axis first
    return (jnp.moveaxis(o_blocks, 0, 1).reshape(B, T, N, H),
            jnp.moveaxis(lse_blocks, 0, 2).reshape(B, N, T))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _flash(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_segment_BT: jax.Array,
           kv_segment_BS: jax.Array, q_index_BT: jax.Array, kv_index_BS: jax.Array, window: jax.Array,
           block_q: int, block_k: int) -> tuple[jax.Array, jax.Array]:
    return _forward(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS, window, block_q,
                    block_k)


def _flash_fwd(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_segment_BT: jax.Array,
               kv_segment_BS: jax.Array, q_index_BT: jax.Array, kv_index_BS: jax.Array, window: jax.Array,
               block_q: int, block_k: int) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    o_BTNH, lse_BNT = _forward(q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS,
                               window, block_q, block_k)
    residuals = (q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS, window, o_BTNH,
                 lse_BNT)
    return (o_BTNH, lse_BNT), residuals


def _flash_bwd(block_q: int, block_k: int, residuals: tuple[jax.Array, ...],
               cotangents: tuple[jax.Array, jax.Array]) -> tuple[jax.Array | None, ...]:
    """Per key block, over the query blocks that may see it: P = exp(s - lse) and
    dS = P * (dP - rowsum(dO * O) + dlse), since d lse_i / d s_ij = p_ij; dq accumulates across key blocks."""
    q_BTNH, k_BSKH, v_BSKH, q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS, window, o_BTNH, lse_BNT = residuals
    do_BTNH, dlse_BNT = cotangents
    do_BTNH, q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS = tied(do_BTNH, q_segment_BT, kv_segment_BS,
                                                                          q_index_BT, kv_index_BS)
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1:3]
    G = N // K
    q_BTKGH, do_BTKGH = q_BTNH.reshape(B, T, K, G, H), do_BTNH.reshape(B, T, K, G, H)
    lse_BKGT = lse_BNT.reshape(B, K, G, T)
    delta_BNT = jnp.einsum("btnh,btnh->bnt", do_BTNH.astype(jnp.float32), o_BTNH.astype(jnp.float32)) - dlse_BNT
    delta_BKGT = delta_BNT.reshape(B, K, G, T)
    needed = _needed(q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS, window, block_q, block_k)
    scale = 1 / math.sqrt(H)

    def key_block(dq_BTKGH, j):
        k, v, ks, ki = (_block(x, j, block_k) for x in (k_BSKH, v_BSKH, kv_segment_BS, kv_index_BS))

        def query_block(i, carry):
            def update(carry):
                dq_all, dk, dv = carry
                q, do, qs, qi = (_block(x, i, block_q) for x in (q_BTKGH, do_BTKGH, q_segment_BT, q_index_BT))
                lse, delta = _block(lse_BKGT, i, block_q, 3), _block(delta_BKGT, i, block_q, 3)
                lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # -inf: the row sees nothing, its scores are all -inf
                p = jnp.exp(_scores(q, k, visible(qs, ks, qi, ki, window)) - lse[..., None])  # 0 where masked
                dv = dv + jnp.einsum("bkgts,btkgh->bskh", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
                dp = jnp.einsum("btkgh,bskh->bkgts", do, v, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
                dk = dk + jnp.einsum("bkgts,btkgh->bskh", ds, q, preferred_element_type=jnp.float32)
                dq = jnp.einsum("bkgts,bskh->btkgh", ds, k, preferred_element_type=jnp.float32)
                dq_all = jax.lax.dynamic_update_slice_in_dim(dq_all, _block(dq_all, i, block_q) + dq, i * block_q, 1)
                return dq_all, dk, dv

            return jax.lax.cond(needed[i, j], update, lambda c: c, carry)

        zeros = jnp.zeros_like(dq_BTKGH, shape=(B, block_k, K, H))
        dq_BTKGH, dk, dv = jax.lax.fori_loop(0, needed.shape[0], query_block, (dq_BTKGH, zeros, zeros))
        return dq_BTKGH, (dk, dv)

    dq0 = _zeros(q_BTKGH.shape, *residuals, do_BTNH, dlse_BNT)
    dq_BTKGH, (dk_blocks, dv_blocks) = jax.lax.scan(key_block, dq0, jnp.arange(needed.shape[1]))  # block axis first
    dk_BSKH = jnp.moveaxis(dk_blocks, 0, 1).reshape(B, S, K, H).astype(k_BSKH.dtype)
    dv_BSKH = jnp.moveaxis(dv_blocks, 0, 1).reshape(B, S, K, H).astype(v_BSKH.dtype)
    return (dq_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype), dk_BSKH, dv_BSKH, None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
