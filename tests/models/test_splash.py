"""Splash attention (the Pallas TPU kernel, interpreted on CPU) equals the materialised reference, output and
gradients, for causal, packed and windowed masks with grouped-query heads; a model with `attention="splash"` equals
one with "xla", windowed layers and a mesh included; the registry refuses it where it cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from llmjax import config, sharding
from llmjax.errors import LlmjaxError
from llmjax.models import attention, splash, transformer
from llmjax.train import registry

B, N, K, H = 2, 4, 2, 16
BLOCK = 128  # the kernel's smallest: two blocks a row at T=256, so some are skipped and some partly masked
WINDOWS = (0, 40)


def packed(T: int) -> np.ndarray:
    """Two documents a row, the second row ending in padding (segment 0)."""
    return np.stack([np.repeat([1, 2], [100, T - 100]), np.repeat([3, 0], [T - 56, 56])]).astype(np.int32)


CASES = {  # (T, segment ids, window)
    "causal": (256, None, 0),
    "packed": (256, packed(256), 0),
    "window": (256, packed(256), 40),
    "ragged": (200, packed(200), 40),  # not a multiple of the block: padded to 256
}


def loss_and_grads(attend, T: int, segment_BT: np.ndarray | None, window: int):
    """sum(o * do) and its gradients w.r.t. q, k, v, jitted with the window traced."""
    q, k, v, do = (jax.random.normal(jax.random.key(i), s, jnp.float32)
                   for i, s in enumerate([(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)]))
    segment_BT = jnp.ones((B, T), jnp.int32) if segment_BT is None else jnp.asarray(segment_BT)

    def loss(q, k, v, window):
        return jnp.sum(attend(q, k, v, segment_BT, window) * do)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v, window)


def reference(q, k, v, segment_BT, window):
    index_BT = jnp.broadcast_to(jnp.arange(q.shape[1]), segment_BT.shape)
    return attention.reference(q, k, v, segment_BT, segment_BT, index_BT, index_BT, window)[0]


@pytest.mark.parametrize("name", CASES)
def test_splash_matches_reference(name):
    T, segment_BT, window = CASES[name]
    attend = lambda q, k, v, s, w: splash.attention(q, k, v, s, s, w, WINDOWS, BLOCK)  # noqa: E731
    got, want = loss_and_grads(attend, T, segment_BT, window), loss_and_grads(reference, T, segment_BT, window)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-5)  # the loss: a sum of 2e4 terms


def logits(model: dict, constrain: sharding.Constrain = sharding.no_constrain) -> np.ndarray:
    """The tiny model's logits over two rows of 128 tokens (two packed documents and padding), at `model`'s
    overrides."""
    cfg = tiny_config(**{f"model.{k}": v for k, v in model.items()}).model
    params = transformer.init(cfg, jax.random.key(0))
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 128), 0, cfg.vocab_size)
    segment_BT = jnp.asarray(np.stack([np.repeat([1, 2], [70, 58]), np.repeat([1, 0], [100, 28])]), jnp.int32)
    positions_BT = jnp.asarray(np.stack([np.r_[np.arange(70), np.arange(58)], np.arange(128)]), jnp.int32)
    fwd = jax.jit(lambda p: transformer.forward(p, tokens_BT, positions_BT, segment_BT, cfg, constrain)[0])
    return np.asarray(fwd(params))[np.asarray(segment_BT) > 0]  # padding's logits are no loss's business


WINDOWED = {"sliding_window": 24, "layer_types": "sliding,full"}  # one kernel per window, picked per scanned layer


@pytest.mark.parametrize("model", [{}, WINDOWED], ids=["full", "windowed"])
def test_model_with_splash_equals_xla(model):
    np.testing.assert_allclose(logits(model | {"attention": "splash"}), logits(model), rtol=1e-4, atol=1e-4)


def test_model_with_splash_on_a_mesh():
    """Rows split over fsdp and heads over tensor: each device runs the kernel on its own share (shard_map)."""
    mesh = sharding.make_mesh(dict(fsdp=2, tensor=2), jax.devices()[:4])
    constrain = sharding.make_constrain(mesh, config.base().rules)
    np.testing.assert_allclose(logits(WINDOWED | {"attention": "splash"}, constrain), logits(WINDOWED), rtol=1e-4,
                               atol=1e-4)


def test_refused_off_a_tpu():
    with pytest.raises(LlmjaxError, match="model.attention='splash' runs on a TPU and this backend is cpu"):
        registry.validate(tiny_config(**{"model.attention": "splash"}), 8)


@pytest.mark.parametrize("overrides, error", [
    ({"model.attn_block": 64}, "model.attn_block=64: splash attention's blocks are multiples of 128"),
    ({"mesh.context": 2, "mesh.fsdp": 4}, "model.attention='splash' attends over whole sequences.*attention=blockwise"),
])
def test_refused_where_the_kernel_cannot_run(monkeypatch, overrides, error):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # past the backend's refusal
    with pytest.raises(LlmjaxError, match=error):
        registry.validate(tiny_config(**{"model.attention": "splash", **overrides}), 8)
