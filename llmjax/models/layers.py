"""Transformer building blocks as pure functions of arrays (shape suffixes: the alphabet in llmjax/__init__.py)."""

import math

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array | dict, k: int = 1) -> jax.Array:
    """Contracts the last k axes of x with the first k of w as one 2-D matmul. XLA:CPU runs 2-D dots near
    its matmul peak, while batched einsums make it transpose activations in the backward pass (~2x slower).
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


def rope_frequencies(head_dim: int, theta: float, scaling: float = 1.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0, original_max_len: int = 8192) -> jax.Array:
    """Inverse frequencies, with Llama 3.1's scaling: long wavelengths slowed by `scaling`, short ones
    kept, a smooth blend between (the Llama 3 paper's long-context recipe)."""
    freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling == 1.0:
        return freq
    wavelen = 2 * jnp.pi / freq
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freq / scaling + smooth * freq
    return jnp.where(wavelen < original_max_len / high_freq_factor, freq,
                     jnp.where(wavelen > original_max_len / low_freq_factor, freq / scaling, blended))


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, freq_h: jax.Array) -> jax.Array:
    """Rotary embedding, rotate-half convention (first and second halves of each head are pairs)."""
    angle_BTh = positions_BT[..., None].astype(jnp.float32) * freq_h
    sin, cos = jnp.sin(angle_BTh)[:, :, None], jnp.cos(angle_BTh)[:, :, None]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def attention_mask(q_segment_BT: jax.Array, kv_segment_BS: jax.Array, q_index_BT: jax.Array,
                   kv_index_BS: jax.Array) -> jax.Array:
    """Causal within a document: a query sees keys at or before it that belong to the same segment."""
    same = q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]
    causal = q_index_BT[:, :, None] >= kv_index_BS[:, None, :]
    return (same & causal)[:, None]  # B1TS, broadcast over heads


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
