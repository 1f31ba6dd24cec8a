"""The KV cache as a ring: a windowed model fed a few tokens a call through W + T - 1 slots equals no cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from llmjax.models import kvcache, transformer


def test_a_ring_of_window_plus_chunk_slots_equals_no_cache():
    """Window 4 on every layer, 3 tokens a call into 4 + 3 - 1 = 6 slots: the ring wraps three times over 21
    tokens, and every call's logits equal the whole sequence's without a cache."""
    cfg = tiny_config(**{"model.sliding_window": 4}).model
    params = transformer.init(cfg, jax.random.key(0))
    tokens_BT = jax.random.randint(jax.random.key(1), (2, 21), 1, cfg.vocab_size)
    positions_BT = jnp.broadcast_to(jnp.arange(21), (2, 21))
    want_BTV = transformer.forward(params, tokens_BT, positions_BT, jnp.ones_like(tokens_BT), cfg).logits_BTV
    assert kvcache.ring_slots(cfg, 21, 3) == 6
    cache = kvcache.init(cfg, 2, 6)
    step = jax.jit(lambda cache, t, p: transformer.forward(params, t, p, jnp.ones_like(t), cfg, cache=cache))
    for start in range(0, 21, 3):
        out = step(cache, tokens_BT[:, start:start + 3], positions_BT[:, start:start + 3])
        np.testing.assert_allclose(out.logits_BTV, want_BTV[:, start:start + 3], rtol=1e-5, atol=1e-5)
        cache = out.cache


def test_only_every_layer_windowed_shrinks_the_cache():
    assert kvcache.ring_slots(tiny_config().model, 100, 8) == 100
    mixed = tiny_config(**{"model.sliding_window": 4, "model.layer_types": "sliding,full"}).model
    assert kvcache.ring_slots(mixed, 100, 8) == 100  # the full layers keep everything
    assert kvcache.ring_slots(tiny_config(**{"model.sliding_window": 4}).model, 100, 8) == 11


def test_more_tokens_than_slots_is_refused():
    with pytest.raises(ValueError, match="5 tokens in one call do not fit a cache of 4 slots"):
        kvcache.write(jnp.zeros((1, 4)), jnp.ones((1, 5)), jnp.int32(0))
