"""`blockwise` (flash) attention equals the materialised `reference`, outputs, log-sum-exps and gradients, on every
mask ring attention and packed training give it, and its compiled backward holds no T x S matrix."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from llmjax.models import attention

RNG = np.random.default_rng(0)
BLOCK = 16  # small blocks: several per row, and lengths that are not a multiple of them


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def make_case(T: int, S: int, N: int = 4, K: int = 2, H: int = 8, B: int = 2, q_segment=None, kv_segment=None,
              q_index=None, kv_index=None, window: int = 0) -> dict:
    """q, k, v, the mask's arrays, and cotangents for o and lse; segments default to one document, indices to
    aranges ending together."""
    rows = lambda x, n: np.broadcast_to(np.asarray(np.arange(n) if x is None else x, np.int32), (B, n))  # noqa: E731
    return dict(q=randn(B, T, N, H), k=randn(B, S, K, H), v=randn(B, S, K, H),
                q_segment=rows(np.ones(T) if q_segment is None else q_segment, T),
                kv_segment=rows(np.ones(S) if kv_segment is None else kv_segment, S),
                q_index=rows(np.arange(S - T, S) if q_index is None else q_index, T),
                kv_index=rows(kv_index, S), window=window, cot_o=randn(B, T, N, H), cot_lse=randn(B, N, T))


def zigzag(T: int, chunks: int) -> np.ndarray:
    """Positions in ring attention's load-balanced order: chunk 0, chunk last, chunk 1, chunk last - 1, ..."""
    order = [c for pair in zip(range(chunks // 2), range(chunks - 1, chunks // 2 - 1, -1), strict=True) for c in pair]
    return np.concatenate([np.arange(c * T // chunks, (c + 1) * T // chunks) for c in order])


PACKED = np.stack([[1] * 30 + [2] * 20 + [3] * 22 + [0] * 8, [4] * 9 + [5] * 50 + [6] * 13 + [0] * 8])
CASES = {
    "causal": lambda: make_case(64, 64, N=4, K=4),
    "packed": lambda: make_case(80, 80, q_segment=PACKED, kv_segment=PACKED),
    "window": lambda: make_case(64, 64, window=10),
    "ragged": lambda: make_case(45, 45, window=20),  # not a multiple of the block
    "mqa": lambda: make_case(48, 48, N=4, K=1),
    "offset": lambda: make_case(24, 64),  # the last 24 of 64 positions, as a prefill over a cache gives
    "offset_window": lambda: make_case(24, 64, window=30),
    "zigzag": lambda: make_case(64, 64, q_index=zigzag(64, 8), kv_index=zigzag(64, 8)),
    "zigzag_window": lambda: make_case(64, 64, q_index=zigzag(64, 8), kv_index=zigzag(64, 8), window=12),
    # queries that see nothing: a document the keys lack, and positions before every key
    "unseen": lambda: make_case(40, 48, q_segment=[1] * 30 + [7] * 10, q_index=np.arange(-10, 30)),
}
STATIC_WINDOW = {"ragged", "offset_window"}  # the window a Python int; the other cases trace it under jit
MASK_ARGS = ("q_segment", "kv_segment", "q_index", "kv_index")


def args(case: dict, dtype=jnp.float32) -> tuple:
    return (*(jnp.asarray(case[name], dtype) for name in "qkv"), *(jnp.asarray(case[name]) for name in MASK_ARGS))


def numpy_attention(q, k, v, q_segment, kv_segment, q_index, kv_index, window):
    """The formula in float64, one query at a time."""
    B, T, N, H = q.shape
    o, lse = np.zeros((B, T, N, H)), np.full((B, N, T), -np.inf)
    for b, t, n in np.ndindex(B, T, N):
        kh = n // (N // k.shape[2])
        qi, ki = q_index[b, t], kv_index[b]
        seen = (kv_segment[b] == q_segment[b, t]) & (ki <= qi) & ((window <= 0) | (qi - ki < window))
        if seen.any():
            s = k[b, seen, kh].astype(np.float64) @ q[b, t, n].astype(np.float64) / np.sqrt(H)
            lse[b, n, t] = s.max() + np.log(np.exp(s - s.max()).sum())
            o[b, t, n] = np.exp(s - lse[b, n, t]) @ v[b, seen, kh]
    return o, lse


def loss_fn(fn, cot_o, cot_lse):
    """A loss of both outputs (ring attention differentiates through lse), skipping lse's -inf rows."""
    def loss(q, k, v, *mask_args):
        o, lse = fn(q, k, v, *mask_args)
        return jnp.sum(o.astype(jnp.float32) * cot_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * cot_lse, 0.0))
    return loss


def with_grads(fn, case: dict, traced_window: bool = True, dtype=jnp.float32):
    """(o, lse) and the gradients w.r.t. q, k, v of `loss_fn`, jitted, the window traced or a Python int."""
    loss = loss_fn(fn, case["cot_o"], case["cot_lse"])
    if traced_window:
        run = jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))
        return run(*args(case, dtype), jnp.int32(case["window"]))
    run = jax.jit(lambda *a: (fn(*a, case["window"]), jax.grad(loss, argnums=(0, 1, 2))(*a, case["window"])))
    return run(*args(case, dtype))


blockwise = functools.partial(attention.blockwise, block_q=BLOCK, block_k=BLOCK)


def test_reference_matches_numpy():
    case = CASES["unseen"]()
    case["window"] = 25
    o, lse = attention.reference(*args(case), case["window"])
    want_o, want_lse = numpy_attention(*(case[name] for name in ("q", "k", "v", *MASK_ARGS, "window")))
    assert np.isneginf(want_lse).any() and np.isfinite(want_lse).any()
    np.testing.assert_allclose(o, want_o, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)  # -inf exactly where the numpy one is


def test_reference_matches_dot_product_attention():
    case = CASES["packed"]()
    q, k, v, *mask_args = args(case)
    mask_BTS = attention.visible(*mask_args)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask_BTS[:, None])
    np.testing.assert_allclose(attention.reference(q, k, v, *mask_args)[0], want, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_blockwise_matches_reference(name):
    case = CASES[name]()
    (o, lse), grads = with_grads(blockwise, case, traced_window=name not in STATIC_WINDOW)
    (want_o, want_lse), want_grads = with_grads(attention.reference, case)
    np.testing.assert_allclose(o, want_o, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, atol=2e-5)
    if name == "unseen":  # those queries: o = 0, lse = -inf, and their q gradient 0
        unseen_BT = ~np.asarray(attention.visible(*args(case)[3:])).any(-1)
        o, lse, dq = np.asarray(o), np.asarray(lse), np.asarray(grads[0])
        assert unseen_BT.any()
        assert (o[unseen_BT] == 0).all() and np.isneginf(np.moveaxis(lse, 1, 2)[unseen_BT]).all()
        assert (dq[unseen_BT] == 0).all()


def test_bfloat16_is_close_to_float32_reference():
    case = CASES["packed"]()
    case["window"] = 24
    (o, lse), grads = with_grads(blockwise, case, dtype=jnp.bfloat16)
    (want_o, want_lse), want_grads = with_grads(attention.reference, case)
    assert o.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(o, np.float32), want_o, atol=5e-2)
    np.testing.assert_allclose(lse, want_lse, atol=5e-2)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.1, rtol=0.05)


def test_layers_scanned_and_vmapped_with_their_own_windows():
    """The model's use: a scan over layers, each with its window (0: global), and the same under vmap, whose
    batched window turns the block-skipping cond into a select."""
    L, case = 3, CASES["packed"]()
    windows = jnp.array([0, 9, 3], jnp.int32)
    q, k, v, *mask_args = args(case)
    q_L, k_L, v_L = (jnp.stack([x * (1 + layer) for layer in range(L)]) for x in (q, k, v))

    def scanned(fn):
        def loss(q_L, k_L, v_L):
            def layer(total, xs):
                o, lse = fn(*xs[:3], *mask_args, xs[3])
                return total + jnp.sum(jnp.sin(o)) + jnp.sum(lse), None
            return jax.lax.scan(layer, 0.0, (q_L, k_L, v_L, windows))[0]
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q_L, k_L, v_L)

    (value, grads), (want_value, want_grads) = scanned(blockwise), scanned(attention.reference)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads, strict=True):  # inputs scaled up to 3x: relative float32 rounding
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    vmapped = jax.jit(jax.vmap(lambda q, k, v, w: blockwise(q, k, v, *mask_args, w)))(q_L, k_L, v_L, windows)
    want = jax.vmap(lambda q, k, v, w: attention.reference(q, k, v, *mask_args, w))(q_L, k_L, v_L, windows)
    for got, ref in zip(vmapped, want, strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_shard_map_over_the_batch():
    """Inside shard_map (as ring attention calls it), with the window a replicated traced scalar: its loops' carries
    vary over the mesh axis as their inputs do."""
    case = make_case(48, 48, B=4, window=20)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.shard_map(blockwise, mesh=mesh, in_specs=(PartitionSpec("data"),) * 7 + (PartitionSpec(),),
                            out_specs=(PartitionSpec("data"), PartitionSpec("data")))
    (o, lse), grads = with_grads(sharded, case)
    (want_o, want_lse), want_grads = with_grads(attention.reference, case)
    for got, want in zip((o, lse, *grads), (want_o, want_lse, *want_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_skipped_blocks_are_those_without_a_visible_pair():
    """Block skipping does skip (the causal upper triangle, what lies outside the window), and never a block that
    holds a visible pair (zigzag order is where index ranges overlap most)."""
    for name in ("causal", "window", "zigzag_window"):
        case = CASES[name]()
        mask_args = args(case)[3:]
        needed = attention._needed(*mask_args, jnp.int32(case["window"]), BLOCK, BLOCK)
        mask_BTS = np.asarray(attention.visible(*mask_args, case["window"]))
        blocks = mask_BTS.reshape(2, 4, BLOCK, 4, BLOCK).any(axis=(0, 2, 4))
        assert (needed >= blocks).all()
        if name != "zigzag_window":  # aranges: the ranges are exact
            np.testing.assert_array_equal(needed, blocks)
            assert not needed.all()


def test_backward_memory_is_linear_in_length():
    """XLA's buffer assignment of the compiled gradient: the reference needs several T x T float32 matrices, the
    blockwise one a few T x block ones (a fraction of one T x T matrix)."""
    T, H = 2048, 16
    x, i = jax.ShapeDtypeStruct((1, T, 1, H), jnp.float32), jax.ShapeDtypeStruct((1, T), jnp.int32)

    def temp_bytes(fn):
        def loss(q, k, v, segment, index):
            o, lse = fn(q, k, v, segment, segment, index, index)
            return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, i, i).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = T * T * 4
    flash = temp_bytes(functools.partial(attention.blockwise, block_q=128, block_k=128))
    assert flash < scores / 8
    assert temp_bytes(attention.reference) > scores > 8 * flash
