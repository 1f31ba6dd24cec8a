import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llmjax import sharding
from llmjax.models import attention, layers

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
    got = np.asarray(layers.rope_frequencies(d, theta, "llama3", 8.0, original_max_len=8192))
    wavelen = 2 * np.pi / base
    high, low = wavelen < 2048, wavelen > 8192
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_allclose(got[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(got[low], base[low] / 8, rtol=1e-6)
    assert np.all(got[mid] < base[mid]) and np.all(got[mid] > base[mid] / 8)


# The RoPE scalings written from their papers in float64, apart from llmjax's code: position interpolation (Chen et
# al. 2023), dynamic NTK (bloc97, emozilla; as the YaRN paper states it) and YaRN (Peng et al. 2023).

def numpy_rope(x, positions, freq, scale=1.0):
    """Rotate-half RoPE in float64 at (possibly fractional) positions."""
    angle = positions[..., None].astype(np.float64) * freq
    cos, sin = scale * np.cos(angle)[:, :, None], scale * np.sin(angle)[:, :, None]
    x1, x2 = np.split(x.astype(np.float64), 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_linear_scaling_reads_position_m_as_m_over_factor():
    theta, d, s = 10_000.0, 16, 4.0
    x, positions = randn(2, 5, 3, d), np.array([[0, 1, 7, 100, 1000], [3, 5, 9, 4000, 16000]])
    got = layers.rope(jnp.asarray(x), jnp.asarray(positions), layers.rope_frequencies(d, theta, "linear", s))
    want = numpy_rope(x, positions / s, theta ** (-np.arange(0, d, 2) / d))
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_dynamic_ntk_grows_the_base_with_the_length_seen_past_the_original():
    """theta' = theta (s L / L0 - (s - 1))^(d / (d - 2)) for L > L0, theta below; L is a traced value."""
    theta, d, s, L0 = 10_000.0, 16, 4.0, 64
    freq = jax.jit(lambda L: layers.rope_frequencies(d, theta, "dynamic", s, original_max_len=L0, seq_len=L))
    for L in (1, 40, 64, 65, 100, 256, 1000):
        base = theta * ((s * L / L0) - (s - 1)) ** (d / (d - 2)) if L > L0 else theta
        want = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        np.testing.assert_allclose(freq(jnp.int32(L)), want, rtol=2e-5)
    # the lowest frequency is divided by exactly s L / L0 - (s - 1): at L = L0 s, by s^2 - s + 1
    lowest = theta ** (-(d - 2) / d)
    np.testing.assert_allclose(freq(jnp.int32(L0 * 4))[-1], lowest / 13, rtol=2e-5)


def yarn_numpy(d, theta, s, L0, beta_fast, beta_slow):
    """NTK-by-parts: dimension i turns r_i = L0 / lambda_i times over the original length; kept where r_i >
    beta_fast, interpolated (theta_i / s) where r_i < beta_slow, and blended on a linear ramp in i between the
    dimensions where r = beta_fast and r = beta_slow, those bounds rounded outward (floor, ceil)."""
    freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    # r_i = L0 theta^(-2i/d) / (2 pi) = beta  <=>  i = d ln(L0 / (2 pi beta)) / (2 ln theta)
    low, high = (d * np.log(L0 / (2 * np.pi * beta)) / (2 * np.log(theta)) for beta in (beta_fast, beta_slow))
    low, high = max(np.floor(low), 0), min(np.ceil(high), d - 1)
    gamma = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)  # 0: kept, 1: interpolated
    return (1 - gamma) * freq + gamma * freq / s, freq


@pytest.mark.parametrize("theta, d, s, L0, beta_fast, beta_slow", [
    (1_000_000.0, 128, 4.0, 32768, 32.0, 1.0),  # Qwen2.5's YaRN
    (100.0, 16, 4.0, 16, 8.0, 0.5),  # the qwen2_yarn fixture's
    (10_000.0, 64, 16.0, 4096, 32.0, 1.0),
])
def test_yarn_blends_kept_and_interpolated_frequencies(theta, d, s, L0, beta_fast, beta_slow):
    got = np.asarray(layers.rope_frequencies(d, theta, "yarn", s, original_max_len=L0, beta_fast=beta_fast,
                                             beta_slow=beta_slow))
    want, freq = yarn_numpy(d, theta, s, L0, beta_fast, beta_slow)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    turns = L0 * freq / (2 * np.pi)
    np.testing.assert_allclose(got[turns > beta_fast], freq[turns > beta_fast], rtol=1e-6)
    np.testing.assert_allclose(got[turns < beta_slow], freq[turns < beta_slow] / s, rtol=1e-6)
    assert (turns < beta_slow).any() and (~np.isclose(want, freq) & ~np.isclose(want, freq / s)).any()  # blended


def test_yarn_attention_factor_scales_cos_and_sin():
    """sqrt(1/t) = 0.1 ln(s) + 1 (YaRN's temperature) unless given; every other scaling leaves the norm alone."""
    assert layers.rope_attention_factor("yarn", 4.0) == pytest.approx(0.1 * np.log(4.0) + 1)
    assert layers.rope_attention_factor("yarn", 4.0, 1.5) == 1.5
    assert layers.rope_attention_factor("yarn", 1.0) == layers.rope_attention_factor("linear", 4.0) == 1.0
    x, positions, freq = randn(1, 3, 2, 16), np.array([[0, 5, 50]]), 10_000.0 ** (-np.arange(0, 16, 2) / 16)
    got = layers.rope(jnp.asarray(x), jnp.asarray(positions), jnp.asarray(freq, jnp.float32), 1.25)
    np.testing.assert_allclose(got, numpy_rope(x, positions, freq, 1.25), atol=2e-5)


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
        return layers.attention(q, k, v, attention.visible(segments, segments, index, index)[:, None], causal_block)

    got = attend(q, k, v, segments, index)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, segments), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k, x_shape, w_shape, eq", [
    (1, (2, 3, 4), (4, 5), "btd,df->btf"),
    (2, (2, 3, 4, 5), (4, 5, 6), "btnh,nhd->btd"),
])
@pytest.mark.parametrize("flat", [True, False])
def test_dense_is_einsum(k, x_shape, w_shape, eq, flat, monkeypatch):
    monkeypatch.setattr(layers, "flatten_dots", lambda: flat)
    x, w = randn(*x_shape), randn(*w_shape)
    np.testing.assert_allclose(layers.dense(jnp.asarray(x), jnp.asarray(w), k=k), np.einsum(eq, x, w), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("flat", [True, False])
def test_dense_gathers_a_split_sequence_only_when_it_flattens(flat, monkeypatch):
    """Rows over fsdp=2 and their sequence over context=4, four rows a device: [B, T] flattened is no tiled
    sharding, so XLA gathers each row's whole sequence first (as on CPU); kept as free axes (elsewhere), nothing
    moves."""
    monkeypatch.setattr(layers, "flatten_dots", lambda: flat)
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, context=4, tensor=1))
    x = jax.device_put(jnp.ones((8, 64, 16)), NamedSharding(mesh, PartitionSpec("fsdp", "context")))
    w = jax.device_put(jnp.ones((16, 32)), NamedSharding(mesh, PartitionSpec()))
    hlo = jax.jit(lambda x, w: layers.dense(x, w), out_shardings=x.sharding).lower(x, w).compile().as_text()
    assert ("all-gather" in hlo) == flat
