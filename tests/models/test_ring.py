"""Context parallelism on 4 (and 8) fake devices equals one device's attention, output and gradients, for causal,
packed and windowed masks, in natural and zigzag order; zigzag order evens the causal work of the ring's steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config, sharding
from llmjax.errors import LlmjaxError
from llmjax.models import attention, ring

B, T, N, K, H = 2, 64, 4, 2, 8
RULES = config.base().rules
reference = attention.reference
blockwise = functools.partial(attention.blockwise, block_q=4, block_k=4)  # chunks of 8 (zigzag) or 16: skips blocks


def mesh(**sizes) -> sharding.Constrain:
    devices = jax.devices()[:int(np.prod(list(sizes.values())))]
    return sharding.make_constrain(sharding.make_mesh(dict(fsdp=1) | sizes, devices), RULES)


def segments(case: str) -> np.ndarray:
    """Segment ids: one document a row, or several whose boundaries (5, 20, 29, 41; 17, 40) cross chunk edges."""
    if case == "causal":
        return np.ones((B, T), np.int32)
    cuts = [(5, 20, 29, 41), (17, 40)]
    return np.stack([np.searchsorted(np.asarray(c), np.arange(T), side="right") for c in cuts]).astype(np.int32)


def inputs(case: str):
    q, k, v, do = (jax.random.normal(jax.random.key(i), s, jnp.float32)
                   for i, s in enumerate([(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)]))
    index = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return (q, k, v), (segments(case), index), do


def loss_and_grads(attend, qkv, ints, do, window):
    """The loss sum(o * do) and its gradients w.r.t. q, k, v, jitted with the window traced."""
    def loss(q, k, v, window):
        segment, index = ints
        return jnp.sum(attend(q, k, v, segment, index, window) * do)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*qkv, window)


def single(qkv, ints, do, window):
    return loss_and_grads(lambda q, k, v, s, i, w: reference(q, k, v, s, s, i, i, w)[0], qkv, ints, do, window)


def sharded(qkv, ints, do, window, constrain, strategy, balanced, local=reference):
    def attend(q, k, v, segment, index, window):
        order = (lambda x: ring.balance(x, constrain)) if balanced else (lambda x: x)
        q, k, v, segment, index = map(order, (q, k, v, segment, index))
        o = ring.attention(q, k, v, segment, segment, index, index, window, constrain, local, strategy)
        return ring.unbalance(o, constrain) if balanced else o
    return loss_and_grads(attend, qkv, ints, do, window)


def assert_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("strategy", ring.STRATEGIES)
@pytest.mark.parametrize("balanced", [False, True], ids=["contiguous", "zigzag"])
@pytest.mark.parametrize("case, window", [("causal", 0), ("packed", 0), ("packed", 12)],
                         ids=["causal", "packed", "window"])
def test_context_parallel_equals_one_device(strategy, balanced, case, window):
    qkv, ints, do = inputs(case)
    assert_close(sharded(qkv, ints, do, window, mesh(context=4), strategy, balanced), single(qkv, ints, do, window))


@pytest.mark.parametrize("strategy", ring.STRATEGIES)
@pytest.mark.parametrize("sizes", [dict(context=4), dict(context=4, tensor=2), dict(fsdp=2, context=4)],
                         ids=["context", "heads", "batch"])
def test_blockwise_context_parallel_equals_one_device(strategy, sizes):
    """Flash attention as the local function, which skips the masked key blocks of each visiting chunk; with the
    heads (tensor) or the rows (fsdp) split as well."""
    qkv, ints, do = inputs("packed")
    assert_close(sharded(qkv, ints, do, 12, mesh(**sizes), strategy, True, blockwise), single(qkv, ints, do, 12))


def test_without_a_context_axis_is_local():
    (q, k, v), (segment, index), _ = inputs("packed")
    want = reference(q, k, v, segment, segment, index, index)[0]
    for constrain in (sharding.no_constrain, mesh(context=1)):
        assert ring.balance(segment, constrain) is segment
        np.testing.assert_array_equal(
            ring.attention(q, k, v, segment, segment, index, index, 0, constrain, reference), want)


def test_balance_is_zigzag_and_unbalance_undoes_it():
    constrain = mesh(context=4)
    x = jnp.arange(2 * T * 3).reshape(2, T, 3)
    chunks = ring.balance(x, constrain).reshape(2, 4, 2, T // 8, 3)  # [row, device, its two chunks, ...]
    for i in range(4):
        np.testing.assert_array_equal(chunks[:, i, 0], x[:, i * 8:(i + 1) * 8])
        np.testing.assert_array_equal(chunks[:, i, 1], x[:, (7 - i) * 8:(8 - i) * 8])
    np.testing.assert_array_equal(ring.unbalance(ring.balance(x, constrain), constrain), x)


def visible_blocks(index_T: np.ndarray, n: int, block: int) -> np.ndarray:
    """[device, ring step]: the (query block, key block) pairs a block-skipping causal attention computes (those
    whose least key index is at most the greatest query index) when device d holds the d-th of n chunks of
    index_T and sees, at step s, the chunk of device d - s."""
    chunks = index_T.reshape(n, -1, block)  # [device, block, slot]
    first_key, last_query = chunks.min(-1), chunks.max(-1)
    return np.array([[np.sum(first_key[(d - s) % n][None, :] <= last_query[d][:, None]) for s in range(n)]
                     for d in range(n)])


def test_zigzag_balances_causal_work():
    n, index = 4, np.arange(T)[None]
    zigzag = visible_blocks(np.asarray(ring.balance(index, mesh(context=n)))[0], n, T // (4 * n))
    contiguous = visible_blocks(index[0], n, T // (4 * n))
    assert np.all(zigzag.min(0) == zigzag.max(0))  # every step, every device alike
    assert contiguous.min(0)[1:].max() == 0  # from step 1 on, some device idles
    totals = contiguous.sum(1)
    assert totals.max() / totals.min() > n and zigzag.sum(1).max() == zigzag.sum(1).min()


@pytest.mark.parametrize("call, message", [
    (lambda q, s, c: ring.attention(q, q, q, s, s, s, s, 0, c, reference, "rings"),
     r"model.context_parallel='rings' is not one of \('ring', 'allgather'\)"),
    (lambda q, s, c: ring.attention(q[:, :62], q[:, :62], q[:, :62], s[:, :62], s[:, :62], s[:, :62], s[:, :62], 0,
                                    c, reference), r"seq_len=62 is not divisible by mesh.context=4"),
    (lambda q, s, c: ring.balance(s[:, :36], c), r"seq_len=36 is not divisible by 2 x mesh.context=4"),
])
def test_refuses(call, message):
    (q, _, _), (segment, _), _ = inputs("causal")
    with pytest.raises(LlmjaxError, match=message):
        call(q, segment, mesh(context=4))
