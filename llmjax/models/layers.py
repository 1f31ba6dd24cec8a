"""Transformer building blocks as pure functions of arrays (shape suffixes: the alphabet in llmjax/__init__.py)."""

import math

import jax
import jax.numpy as jnp


def flatten_dots() -> bool:
    """Whether `dense` flattens x's leading axes into one 2-D matmul: on XLA:CPU, which runs 2-D dots near its
    matmul peak (the small model's train step is ~1.2x slower with [B, T] kept as two free axes). Elsewhere the
    free axes stay: flattening [B, T] where B is split over fsdp and T over context (more than one row a device)
    is no tiled sharding, and GSPMD would gather each row's whole sequence first (experiments/long_context)."""
    return jax.default_backend() == "cpu"


def dense(x: jax.Array, w: jax.Array | dict, k: int = 1) -> jax.Array:
    """Contracts the last k axes of x with the first k of w (as one 2-D matmul where `flatten_dots`).
    A LoRA-adapted w (llmjax.models.lora) adds s (x A) B, never forming A B. (x A) B is a dot with a unit batch
    dimension, which `remat=dots` does not save: the backward recomputes it from x A (r numbers a token) rather
    than storing a second copy of the projection's output."""
    if isinstance(w, dict):
        if "lora_key" in w:  # LoRA dropout on the adapter's input (training steps only; llmjax.models.lora.keyed)
            keep = 1 - w["lora_dropout"].astype(jnp.float32)
            kept = jax.random.bernoulli(w["lora_key"], keep, x.shape)
            x_in = jnp.where(kept, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))
        else:
            x_in = x
        xa = dense(x_in, w["lora_a"], k)
        b = w["lora_b"]
        low = jax.lax.dot_general(xa.reshape(1, -1, b.shape[0]), b.reshape(1, b.shape[0], -1),
                                  (((2,), (1,)), ((0,), (0,))))
        low = low.reshape(*xa.shape[:-1], *b.shape[1:]) * w["lora_scale"].astype(x.dtype)
        return dense(x, w["base"], k) + low
    if not flatten_dots():
        return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - k, x.ndim)), tuple(range(k))), ((), ())))
    lead, out = x.shape[:-k], w.shape[k:]
    y = x.reshape(math.prod(lead), -1) @ w.reshape(math.prod(w.shape[:k]), -1)
    return y.reshape(*lead, *out)


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    x = x_BTD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (y * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)


def layer_norm(x_BTD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, eps: float) -> jax.Array:
    x = x_BTD.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(x_BTD.dtype)


def rope_frequencies(head_dim: int, theta: float, kind: str = "default", factor: float = 1.0, *,
                     original_max_len: int = 8192, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     beta_fast: float = 32.0, beta_slow: float = 1.0, seq_len: jax.Array | None = None) -> jax.Array:
    """Inverse frequencies, stretched by `factor` so a model reaches past the length it was trained at; each `kind`
    is transformers' `rope_type` of that name. `seq_len` (max position + 1 of the batch) is read by dynamic only."""
    freq_h = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if kind == "default" or factor == 1 and kind != "dynamic":  # dynamic at factor 1 still grows the base
        return freq_h
    if kind == "linear":  # Chen et al. 2023, position interpolation: position m is read as m / factor
        return freq_h / factor
    if kind == "dynamic":
        return _dynamic_ntk(head_dim, theta, factor, original_max_len, seq_len)
    if kind == "yarn":
        return _yarn(freq_h, theta, factor, original_max_len, beta_fast, beta_slow)
    if kind == "llama3":
        return _llama3(freq_h, factor, original_max_len, low_freq_factor, high_freq_factor)
    raise ValueError(f"rope type {kind!r} is unknown (llmjax.models.presets.ROPE_TYPES)")


def rope_attention_factor(kind: str, factor: float, attn_factor: float = 0.0) -> float:
    """What YaRN multiplies cos and sin by (so attention logits by its square): `attn_factor`, or the paper's
    0.1 ln(factor) + 1 when 0: YaRN's attention temperature (Peng et al. 2023), which keeps the softmax as sharp
    at long lengths as at trained ones; 1 for every other kind."""
    if kind != "yarn":
        return 1.0
    return attn_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


def _llama3(freq_h: jax.Array, factor: float, original_max_len: int, low_freq_factor: float,
            high_freq_factor: float) -> jax.Array:
    """Llama 3.1's scaling (the Llama 3 paper's long-context recipe): long wavelengths slowed by `factor`, short
    ones kept, a smooth blend between."""
    wavelen_h = 2 * jnp.pi / freq_h
    smooth_h = (original_max_len / wavelen_h - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended_h = (1 - smooth_h) * freq_h / factor + smooth_h * freq_h
    return jnp.where(wavelen_h < original_max_len / high_freq_factor, freq_h,
                     jnp.where(wavelen_h > original_max_len / low_freq_factor, freq_h / factor, blended_h))


def _dynamic_ntk(head_dim: int, theta: float, factor: float, original_max_len: int,
                 seq_len: jax.Array | None) -> jax.Array:
    """Dynamic NTK-aware scaling (bloc97 and emozilla 2023, as the YaRN paper writes it): up to the trained length
    the model is unchanged; past it the base grows with the length L seen, dividing the lowest frequency by
    factor * L / original - (factor - 1) while the highest barely moves: long wavelengths are interpolated to fit
    the length, short ones keep nearby positions apart."""
    length = jnp.maximum(jnp.asarray(original_max_len if seq_len is None else seq_len, jnp.float32),
                         original_max_len)
    base = theta * (factor * length / original_max_len - (factor - 1)) ** (head_dim / (head_dim - 2))
    return 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def _yarn(freq_h: jax.Array, theta: float, factor: float, original_max_len: int, beta_fast: float,
          beta_slow: float) -> jax.Array:
    """YaRN's "NTK-by-parts" interpolation (Peng et al. 2023): dimensions turning more than beta_fast times over the
    trained length keep their frequency (they never saw a wavelength longer than it, so need no interpolation),
    those turning fewer than beta_slow times are interpolated (divided by factor), with a linear ramp in the
    dimension index between the two correction dimensions, rounded outward, as the paper's code does."""
    d = 2 * freq_h.shape[0]

    def correction_dim(turns: float) -> float:  # the dimension index whose wavelength fits `turns` times
        return d * math.log(original_max_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(correction_dim(beta_fast)), 0), min(math.ceil(correction_dim(beta_slow)), d - 1)
    high = high + 0.001 if high == low else high  # a step, not a division by zero (as transformers)
    ramp_h = jnp.clip((jnp.arange(d // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    return freq_h / factor * ramp_h + freq_h * (1 - ramp_h)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, freq_h: jax.Array, scale: float = 1.0) -> jax.Array:
    """Rotary embedding, rotate-half convention (first and second halves of each head are pairs); `scale`
    multiplies cos and sin (YaRN's attention factor)."""
    angle_BTh = positions_BT[..., None].astype(jnp.float32) * freq_h
    sin, cos = jnp.sin(angle_BTh)[:, :, None], jnp.cos(angle_BTh)[:, :, None]
    if scale != 1.0:
        sin, cos = scale * sin, scale * cos
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_B1TS: jax.Array,
              causal_block: int = 0) -> jax.Array:
    """Grouped-query attention (N query heads share K key/value heads), scaled by 1/sqrt(H).

    With causal_block > 0 (self-attention, causal mask), queries go in blocks that each see only the keys up
    to the block's end, skipping the all-masked upper triangle: T=256 in blocks of 64 does 5/8 of the work.
    """
    T = q_BTNH.shape[1]
    if not causal_block or causal_block >= T:
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS)
    ends = [*range(causal_block, T, causal_block), T]
    return jnp.concatenate([
        jax.nn.dot_product_attention(q_BTNH[:, start:end], k_BSKH[:, :end], v_BSKH[:, :end],
                                     mask=mask_B1TS[:, :, start:end, :end])
        for start, end in zip([0, *ends[:-1]], ends, strict=True)], axis=1)


def swiglu(x_BTD: jax.Array, gate_DF: jax.Array, up_DF: jax.Array, down_FD: jax.Array) -> jax.Array:
    h_BTF = jax.nn.silu(dense(x_BTD, gate_DF)) * dense(x_BTD, up_DF)
    return dense(h_BTF, down_FD)


def gelu_mlp(x_BTD: jax.Array, fc_DF: jax.Array, fc_bias_F: jax.Array, proj_FD: jax.Array,
             proj_bias_D: jax.Array) -> jax.Array:
    return dense(jax.nn.gelu(dense(x_BTD, fc_DF) + fc_bias_F, approximate=True), proj_FD) + proj_bias_D
