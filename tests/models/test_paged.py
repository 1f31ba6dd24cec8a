"""The paged KV cache: rows of different lengths in scattered pages, fed a few tokens a call, equal no cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from llmjax.models import paged, transformer


@pytest.mark.parametrize("overrides", [{}, {"model.sliding_window": 3},
                                       {"model.sliding_window": 3, "model.layer_types": "sliding,full"}])
def test_rows_of_different_lengths_in_scattered_pages_equal_no_cache(overrides):
    """Row 0 holds 13 tokens, row 1 holds 7, in pages of 4 taken out of order from one pool; each call brings up
    to 3 tokens a row (row 1's last call is padded, and it then idles on padding), and every real token's logits
    equal its sequence's without a cache, windows included."""
    cfg = tiny_config(**overrides).model
    params = transformer.init(cfg, jax.random.key(0))
    lengths = [13, 7]
    tokens = [jax.random.randint(jax.random.key(1 + b), (n,), 1, cfg.vocab_size) for b, n in enumerate(lengths)]
    want = [transformer.forward(params, t[None], jnp.arange(len(t))[None], jnp.ones((1, len(t)), jnp.int32),
                                cfg).logits_BTV[0] for t in tokens]
    cache = paged.init(cfg, pages=8, page_size=4, batch=2, max_pages=4)
    cache = cache._replace(table_BI=jnp.array([[5, 0, 7, 2], [3, 6, 0, 0]], jnp.int32))  # row 1 needs 2 pages
    step = jax.jit(lambda cache, t, p, s: transformer.forward(params, t, p, s, cfg, cache=cache))
    for start in range(0, 13, 3):
        tokens_BT, segment_BT = np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32)
        for b, t in enumerate(tokens):
            real = t[start:start + 3]
            tokens_BT[b, :len(real)], segment_BT[b, :len(real)] = real, 1
        out = step(cache, tokens_BT, cache.lengths_B[:, None] + jnp.arange(3), segment_BT)
        for b, n in enumerate(segment_BT.sum(1)):
            np.testing.assert_allclose(out.logits_BTV[b, :n], want[b][start:start + n], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.cache.lengths_B, np.minimum(lengths, start + 3))
        cache = out.cache


def test_padding_is_neither_written_nor_counted():
    """An idle row (all padding) and a bucketed prompt's padding leave the pool's other slots as they were."""
    cfg = tiny_config().model
    params = transformer.init(cfg, jax.random.key(0))
    cache = paged.init(cfg, pages=4, page_size=4, batch=2, max_pages=2)
    cache = cache._replace(table_BI=jnp.array([[2, 1], [0, 3]], jnp.int32))
    tokens_BT = jnp.array([[7, 8, 9, 0, 0, 0], [0, 0, 0, 0, 0, 0]], jnp.int32)
    out = transformer.forward(params, tokens_BT, jnp.broadcast_to(jnp.arange(6), (2, 6)), (tokens_BT > 0) * 1, cfg,
                              cache=cache).cache
    np.testing.assert_array_equal(out.lengths_B, [3, 0])
    written = np.zeros((4, 4), bool)
    written[2, :3] = True  # row 0's page 2, slots 0..2
    np.testing.assert_array_equal(out.segment_JZ, written * 1)
    assert (np.abs(np.asarray(out.k_LJZKH)).sum(axis=(0, 3, 4)) > 0).tolist() == written.tolist()


def test_the_keys_side_of_the_mask():
    """Row 0 holds 2 tokens and brings 2 (one real), row 1 holds none and brings padding: the keys are each row's
    pages (segment 0 past its length) then its new tokens; a key's slot is its position in the row."""
    cache = paged.Cache(None, None, jnp.array([[1, 1], [1, 1]], jnp.int32), jnp.array([[0, 1], [1, 1]], jnp.int32),
                        jnp.array([2, 0], jnp.int32))
    kv_segment_BS, q_index_BT, kv_index_BS = paged.slots(cache, jnp.array([[1, 0], [0, 0]], jnp.int32))
    np.testing.assert_array_equal(kv_segment_BS, [[1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(q_index_BT, [[2, 3], [0, 1]])
    np.testing.assert_array_equal(kv_index_BS, [[0, 1, 2, 3, 2, 3], [0, 1, 2, 3, 0, 1]])
    assert paged.pages_for(9, 4) == 3 and paged.pages_for(8, 4) == 2
