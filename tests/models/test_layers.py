import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.models import layers

RNG = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def test_rms_norm_matches_numpy():
    x, scale, eps = randn(2, 3, 8, scale=0.3), randn(8), 0.1  # eps comparable to the variance: its place matters
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps) * scale
    np.testing.assert_allclose(layers.rms_norm(jnp.asarray(x), jnp.asarray(scale), eps), want, rtol=1e-5, atol=1e-6)
    assert layers.rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(scale), eps).dtype == jnp.bfloat16


def test_layer_norm_matches_numpy():
    x, scale, bias, eps = randn(2, 3, 8, scale=0.3) + 1.0, randn(8), randn(8), 0.1
    x64 = x.astype(np.float64)
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    want = (x64 - mean) / np.sqrt(var + eps) * scale + bias
    got = layers.layer_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), eps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rope_is_relative_and_identity_at_zero():
    H = 16
    freq = layers.rope_frequencies(H, 10_000.0)
    q, k = jnp.asarray(randn(1, 1, 1, H)), jnp.asarray(randn(1, 1, 1, H))

    @jax.jit
    def rotated_dot(m, n):
        return jnp.sum(layers.rope(q, m[None, None], freq) * layers.rope(k, n[None, None], freq))

    def dot(m, n):
        return float(rotated_dot(jnp.int32(m), jnp.int32(n)))

    np.testing.assert_allclose(layers.rope(q, jnp.array([[0]]), freq), q)
    for offset in (0, 3, -7):
        np.testing.assert_allclose([dot(m + offset, m) for m in (0, 5, 100)], dot(offset, 0), rtol=1e-4, atol=1e-5)
    assert abs(dot(3, 0) - dot(0, 0)) > 1e-3  # positions do rotate
    rotated = layers.rope(q, jnp.array([[9]]), freq)
    np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q), rtol=1e-5)


def test_rope_frequencies_unscaled():
    theta, d = 10_000.0, 16
    want = theta ** (-np.arange(0, d, 2) / d)
    np.testing.assert_allclose(layers.rope_frequencies(d, theta), want, rtol=1e-6)


def test_rope_frequencies_llama31_scaling():
    theta, d = 500_000.0, 128
    base = theta ** (-np.arange(0, d, 2) / d)
    got = np.asarray(layers.rope_frequencies(d, theta, 8.0, 1.0, 4.0, 8192))
    wavelen = 2 * np.pi / base
    high, low = wavelen < 2048, wavelen > 8192
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_allclose(got[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(got[low], base[low] / 8, rtol=1e-6)
    assert np.all(got[mid] < base[mid]) and np.all(got[mid] > base[mid] / 8)


def numpy_attention(q, k, v, segments):
    B, T, N, H = q.shape
    G = N // k.shape[2]
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    mask = (segments[:, :, None] == segments[:, None, :]) & np.tril(np.ones((T, T), bool))
    out = np.zeros(q.shape)
    for n in range(N):
        s = np.einsum("bth,bsh->bts", q[:, :, n], k[:, :, n // G]) / np.sqrt(H)
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, n] = np.einsum("bts,bsh->bth", p / p.sum(-1, keepdims=True), v[:, :, n // G])
    return out


@pytest.mark.parametrize("causal_block", [0, 2, 4])  # one block; 3 blocks; uneven blocks (4 + 2)
def test_attention_gqa_causal_segments(causal_block):
    B, T, N, K, H = 2, 6, 4, 2, 8
    q, k, v = randn(B, T, N, H), randn(B, T, K, H), randn(B, T, K, H)
    segments = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0]], np.int32)
    index = np.broadcast_to(np.arange(T), (B, T))

    @jax.jit
    def attend(q, k, v, segments, index):
        return layers.attention(q, k, v, layers.attention_mask(segments, segments, index, index), causal_block)

    got = attend(q, k, v, segments, index)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, segments), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k, x_shape, w_shape, eq", [
    (1, (2, 3, 4), (4, 5), "btd,df->btf"),
    (2, (2, 3, 4, 5), (4, 5, 6), "btnh,nhd->btd"),
])
def test_dense_is_einsum(k, x_shape, w_shape, eq):
    x, w = randn(*x_shape), randn(*w_shape)
    np.testing.assert_allclose(layers.dense(jnp.asarray(x), jnp.asarray(w), k=k), np.einsum(eq, x, w), rtol=1e-5,
                               atol=1e-5)
