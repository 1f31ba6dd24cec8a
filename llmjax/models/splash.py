"""Splash attention: the Pallas TPU kernel of jax.experimental.pallas.ops.tpu.splash_attention, for
`model.attention="splash"`.

The kernel's masks are static (built in NumPy at trace time, so it skips fully masked blocks without looking):
causal over slots 0 .. T-1, as self-attention without a cache or context parallelism has them, and for a window W
a LocalMask whose left reach is W - 1 (key j visible iff i - (W - 1) <= j <= i, i.e. i - j < W). Segment ids are
its dynamic part. A scanned layer's window is traced, so there is one kernel per distinct window of the model and
`lax.switch` picks this layer's. The kernel does not scale the scores: q is divided by sqrt(H) first.

Off TPU the kernel runs interpreted (slow; for tests); the registry refuses it there. Lengths are padded to a
multiple of the block: padded keys lie after every real query, so causality hides them.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

from llmjax.sharding import Constrain, attention_specs, no_constrain

LANES = 128  # the kernel's key blocks are whole multiples of the TPU's vector lanes


def attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, q_segment_BT: jax.Array,
              kv_segment_BT: jax.Array, window: jax.Array | int, windows: Sequence[int], block: int = 512,
              constrain: Constrain = no_constrain) -> jax.Array:
    """Self-attention of T tokens in slots 0 .. T-1 (output in q's dtype): `window` (0 = none; may be traced) is
    one of `windows`; `block` (a multiple of 128) is clipped to T rounded up to 128. On a mesh each device runs the
    kernel on its own rows and heads (`shard_map`): XLA cannot split a Pallas call, and would otherwise gather whole
    arrays onto every device."""
    local = functools.partial(_local, windows=tuple(sorted(set(windows))), block=block)
    if constrain.mesh is None:
        return local(q_BTNH, k_BTKH, v_BTKH, q_segment_BT, kv_segment_BT, window)
    mesh = constrain.mesh
    q_spec, kv_spec, int_spec = attention_specs(q_BTNH, k_BTKH, constrain.rules, mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, int_spec, int_spec, PartitionSpec()),
                         out_specs=q_spec, check_vma=False,  # the Pallas call does not say how its output varies
                         )(q_BTNH, k_BTKH, v_BTKH, q_segment_BT, kv_segment_BT, jnp.asarray(window, jnp.int32))


def _local(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, q_segment_BT: jax.Array,
           kv_segment_BT: jax.Array, window: jax.Array | int, windows: tuple[int, ...], block: int) -> jax.Array:
    """The kernel on one device's arrays: padded to whole blocks, vmapped over the rows, the window's kernel picked
    by `lax.switch`."""
    B, T, N, H = q_BTNH.shape
    block = min(block, -(-T // LANES) * LANES)
    Tp = -(-T // block) * block
    pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q_BNTH = jnp.transpose(pad(q_BTNH * (1 / math.sqrt(H))), (0, 2, 1, 3))  # the kernel does not scale
    k_BKTH, v_BKTH = (jnp.transpose(pad(x), (0, 2, 1, 3)) for x in (k_BTKH, v_BTKH))
    segments = kernel_lib.SegmentIds(pad(q_segment_BT.astype(jnp.int32)), pad(kv_segment_BT.astype(jnp.int32)))
    interpret = jax.default_backend() != "tpu"
    branches = [jax.vmap(_kernel(N, Tp, w if 0 < w < Tp else 0, block, interpret)) for w in windows]
    index = jnp.argmax(jnp.asarray(windows) == window)
    o_BNTH = jax.lax.switch(index, branches, q_BNTH, k_BKTH, v_BKTH, segments)
    return jnp.transpose(o_BNTH[:, :, :T], (0, 2, 1, 3)).astype(q_BTNH.dtype)


def _kernel(N: int, T: int, window: int, block: int, interpret: bool) -> kernel_lib.SplashAttentionKernel:
    """The kernel for N heads over T slots: causal, or local when window > 0, with every block size `block`
    (the backward's too, which grads need)."""
    mask = mask_lib.LocalMask((T, T), (window - 1, 0), offset=0) if window else mask_lib.CausalMask((T, T))
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * N), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)
