import math

import jax
import numpy as np
import optax
import pytest
from helpers import tiny_config

from llmjax import optim
from llmjax.models import transformer

LR = 3e-3  # base config: optim.lr=3e-3, min_lr_ratio=0.1
GPT2_STYLE = {"model.norm": "layer", "model.pos": "learned", "model.mlp": "gelu", "model.bias": "all",
              "model.tie_embeddings": True}


@pytest.mark.parametrize("kind, quarter, end", [
    ("cosine", 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 0.1),
    ("linear", 1 - 0.9 / 4, 0.1),
    ("constant", 1.0, 1.0),
])
def test_schedule(kind, quarter, end):
    cfg = tiny_config(steps=42, **{"optim.warmup_steps": 2, "optim.schedule": kind})  # 40 decay steps
    lr = optim.schedule(cfg)
    np.testing.assert_allclose([lr(0), lr(1), lr(2), lr(12), lr(42)], [0, LR / 2, LR, LR * quarter, LR * end],
                               rtol=1e-5)


def test_wsd_equals_its_formula():
    """Warmup-stable-decay: linear warmup over W steps, lr until the last D = decay_fraction * steps, then linear
    to lr * min_lr_ratio at the last step (MiniCPM, Hu et al. 2024)."""
    steps, w, ratio = 50, 5, 0.1
    cfg = tiny_config(steps=steps, **{"optim.warmup_steps": w, "optim.schedule": "wsd", "optim.decay_fraction": 0.2,
                                      "optim.min_lr_ratio": ratio})
    d = 10
    expected = [LR * t / w if t < w else LR if t < steps - d else LR * (1 - (1 - ratio) * (t - (steps - d)) / d)
                for t in range(steps + 1)]
    np.testing.assert_allclose([optim.schedule(cfg)(t) for t in range(steps + 1)], expected, rtol=1e-5, atol=1e-9)


def test_decay_mask_matrices_only():
    llama = optim.decay_mask(transformer.specs(tiny_config().model))
    assert llama["embed"] and llama["unembed"] and llama["layers"]["wq"] and llama["layers"]["w_gate"]
    assert not llama["layers"]["attn_norm"]["scale"] and not llama["final_norm"]["scale"]  # [layers, D], [D]


def test_decay_mask_excludes_biases():
    gpt2 = optim.decay_mask(transformer.specs(tiny_config(**GPT2_STYLE).model))
    assert gpt2["layers"]["w_fc"] and gpt2["layers"]["w_proj"]
    biases = {k: v for k, v in gpt2["layers"].items() if k.startswith("b")}
    assert biases == dict.fromkeys(["bq", "bk", "bv", "bo", "b_fc", "b_proj"], False)
    assert not gpt2["layers"]["mlp_norm"]["bias"] and not gpt2["final_norm"]["bias"]


@pytest.fixture(scope="module")
def one_update():
    """(grads, params) -> (new params, opt_state) after one AdamW step at the full learning rate, jitted once."""
    cfg = tiny_config(**{"optim.warmup_steps": 0, "optim.schedule": "constant"})
    tx = optim.make(cfg, transformer.specs(cfg.model))

    @jax.jit
    def update(grads, params):
        updates, opt_state = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), opt_state

    return cfg, update


def full(value):
    specs = transformer.specs(tiny_config().model)
    return jax.tree.map(lambda s: np.full(s.shape, value, np.float32), specs, is_leaf=transformer.is_spec)


def norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in jax.tree.leaves(tree))))


def test_weight_decay_skips_norms(one_update):
    cfg, update = one_update
    new, _ = update(full(0.0), full(2.0))
    np.testing.assert_allclose(new["layers"]["attn_norm"]["scale"], 2.0)
    np.testing.assert_allclose(new["final_norm"]["scale"], 2.0)
    np.testing.assert_allclose(new["layers"]["wq"], 2.0 * (1 - LR * cfg.optim.weight_decay), rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # global norms ~328 and ~0.33; clip_norm is 1
def test_clipping_caps_global_norm(one_update, scale):
    """Adam's first moment after one step is (1 - b1) * the clipped gradient."""
    cfg, update = one_update
    grads = full(scale)
    _, opt_state = update(grads, full(0.0))
    seen = norm(optax.tree_utils.tree_get(opt_state, "mu")) / (1 - cfg.optim.b1)
    np.testing.assert_allclose(seen, min(norm(grads), cfg.optim.clip_norm), rtol=1e-5)
