"""Scalar heads: a row's score is read at its last masked-in position, and the head is a linear map of the hidden
states computed in float32, as in NumPy."""

import jax.numpy as jnp
import numpy as np

from llmjax.models import heads


def test_last_index_and_at_last_read_each_rows_last_masked_in_position():
    mask_BT = np.array([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0.5, 0, 2, 0]])
    want = np.array([2, 0, 4, 3])  # any nonzero weight counts
    np.testing.assert_array_equal(heads.last_index(jnp.asarray(mask_BT)), want)
    values_BT = np.arange(20, dtype=np.float32).reshape(4, 5) * 0.5
    np.testing.assert_array_equal(heads.at_last(jnp.asarray(values_BT), jnp.asarray(mask_BT)),
                                  values_BT[np.arange(4), want])


def test_apply_is_a_float32_linear_map():
    rng = np.random.default_rng(0)
    h_BTD = rng.normal(size=(2, 3, 8)).astype(np.float32)
    head = {"w": rng.normal(size=8).astype(np.float32), "b": np.float32(0.25)}
    want = np.einsum("btd,d->bt", h_BTD.astype(np.float64), head["w"].astype(np.float64)) + 0.25
    got = heads.apply({k: jnp.asarray(v) for k, v in head.items()}, jnp.asarray(h_BTD))
    assert got.dtype == jnp.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    bf16 = heads.apply({"w": jnp.asarray(head["w"], jnp.bfloat16), "b": jnp.float32(0.25)},
                       jnp.asarray(h_BTD, jnp.bfloat16))  # a bfloat16 model's scores are still float32
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, want, rtol=0.05, atol=0.05)
