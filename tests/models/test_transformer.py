from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from llmjax import config, losses
from llmjax.models import transformer

GPT2_STYLE = {"model.norm": "layer", "model.pos": "learned", "model.mlp": "gelu", "model.bias": "all",
              "model.tie_embeddings": True}
VARIANTS = {"llama": {}, "gpt2": GPT2_STYLE}
T, N_A = 32, 12  # rows of T tokens: document A (N_A tokens) packed after document B (T - N_A tokens)


def test_init_shapes_without_allocating():
    cfg = config.model_config("llama3-8b")
    params = jax.eval_shape(lambda: transformer.init(cfg, jax.random.key(0)))
    want = jax.tree.map(lambda s: s.shape, transformer.specs(cfg), is_leaf=transformer.is_spec)
    assert jax.tree.map(lambda a: a.shape, params, is_leaf=lambda a: isinstance(a, jax.ShapeDtypeStruct)) == want
    layers = params["layers"]
    assert layers["wq"].shape == (32, 4096, 32, 128) and layers["wk"].shape == (32, 4096, 8, 128)
    assert layers["w_gate"].shape == (32, 4096, 14336) and layers["w_down"].shape == (32, 14336, 4096)
    assert params["embed"].shape == (128256, 4096) and params["unembed"].shape == (4096, 128256)
    assert params["final_norm"]["scale"].shape == (4096,) and layers["attn_norm"]["scale"].shape == (32, 4096)


def init(cfg):
    return jax.jit(partial(transformer.init, cfg))(jax.random.key(0, impl="rbg"))  # rbg: compiles faster


@pytest.fixture(scope="module")
def models():
    """Per variant: float32 params and a jitted forward -> logits, compiled once for [3, T] batches."""
    out = {}
    for name, overrides in VARIANTS.items():
        cfg = tiny_config(**overrides).model
        out[name] = init(cfg), jax.jit(lambda p, t, pos, seg, cfg=cfg: transformer.forward(p, t, pos, seg, cfg)[0])
    return out


def rows(*rows):
    """Stacks (tokens, positions, segment_ids) triples into int32 batch arrays."""
    return [jnp.asarray(np.stack(a), jnp.int32) for a in zip(*rows, strict=True)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_documents_do_not_see_each_other(models, variant):
    params, fwd = models[variant]
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 262, N_A), rng.integers(0, 262, T - N_A)
    restart = np.concatenate([np.arange(T - N_A), np.arange(N_A)])
    logits = fwd(params, *rows(
        (np.concatenate([a, b]), np.arange(T), np.repeat([1, 0], [N_A, T - N_A])),  # A alone, then padding
        (np.concatenate([b, a]), restart, np.repeat([1, 2], [T - N_A, N_A])),  # B then A, own segments
        (np.concatenate([b, a]), restart, np.ones(T)),  # B then A in one segment: A attends to B
    ))
    alone, packed, unmasked = logits[0, :N_A], logits[1, T - N_A:], logits[2, T - N_A:]
    np.testing.assert_allclose(packed, alone, atol=1e-5)
    assert np.abs(unmasked - alone).max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(models, variant):
    params, fwd = models[variant]
    tokens = np.random.default_rng(2).integers(0, 262, T)
    changed = [tokens.copy(), tokens.copy()]
    changed[0][10] = (tokens[10] + 1) % 262
    changed[1][T - 1] = (tokens[T - 1] + 1) % 262
    logits = fwd(params, *rows(*((t, np.arange(T), np.ones(T)) for t in (tokens, *changed))))
    np.testing.assert_allclose(logits[1, :10], logits[0, :10], atol=1e-6)
    np.testing.assert_allclose(logits[2, :-1], logits[0, :-1], atol=1e-6)
    assert np.abs(logits[1, 10] - logits[0, 10]).max() > 1e-3
    assert np.abs(logits[2, -1] - logits[0, -1]).max() > 1e-3


def test_bfloat16(models):
    cfg = tiny_config(**{"model.param_dtype": "bfloat16", "model.compute_dtype": "bfloat16"}).model
    shapes = jax.eval_shape(partial(transformer.init, cfg), jax.random.key(0))
    assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    params_f32, fwd_f32 = models["llama"]
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params_f32)  # what init gives: f32 draws rounded
    batch = rows(*((np.random.default_rng(i).integers(0, 262, T), np.arange(T), np.ones(T)) for i in range(3)))
    logits = jax.jit(lambda p, *b: transformer.forward(p, *b, cfg)[0])(params, *batch)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    want = fwd_f32(jax.tree.map(lambda a: a.astype(jnp.float32), params), *batch)
    np.testing.assert_allclose(logits, want, atol=0.02 * float(jnp.abs(want).max()))


def test_remat_policies_same_gradients(models):
    params, _ = models["llama"]
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 262, (2, 17)), jnp.int32)
    positions = jnp.asarray(np.tile(np.r_[np.arange(6), np.arange(10)], (2, 1)), jnp.int32)
    segments = jnp.asarray(np.tile(np.repeat([1, 2], [6, 10]), (2, 1)), jnp.int32)

    def grad_fn(remat):
        cfg = tiny_config(**{"model.remat": remat}).model

        def loss(p):
            logits = transformer.forward(p, tokens[:, :-1], positions, segments, cfg).logits_BTV
            return losses.cross_entropy(logits, tokens[:, 1:], jnp.ones_like(positions))[0]

        assert ("remat" in str(jax.make_jaxpr(jax.grad(loss))(params))) == (remat != "none")
        return jax.grad(loss)

    fns = [grad_fn(r) for r in ("none", "full", "dots", "all_dots")]
    want, *others = jax.jit(lambda p: [f(p) for f in fns])(params)  # one compilation for all four
    for got in others:
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, want)


@pytest.mark.parametrize("layer_types, reach", [("", 2 * 3), ("sliding,full", T - 1)])
def test_sliding_window_reach(layer_types, reach):
    """A window of 4 on each of 2 layers lets a token see 2 x 3 positions back and no further; a full layer
    after a windowed one sees everything."""
    cfg = tiny_config(**{"model.sliding_window": 4, "model.layer_types": layer_types}).model
    fwd = jax.jit(lambda p, t, pos, seg: transformer.forward(p, t, pos, seg, cfg)[0])
    tokens = np.random.default_rng(4).integers(0, 262, T)
    changed = tokens.copy()
    changed[0] = (tokens[0] + 1) % 262
    logits = fwd(init(cfg), *rows(*((t, np.arange(T), np.ones(T)) for t in (tokens, changed))))
    moved = np.abs(logits[1] - logits[0]).max(-1) > 1e-4
    assert moved[:reach + 1].all() and not moved[reach + 1:].any(), moved
