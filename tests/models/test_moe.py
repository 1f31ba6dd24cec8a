"""The mixture-of-experts MLP against float64 NumPy: routing, both dispatches, the auxiliary losses, and the
sharded kernel against one device."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from llmjax import config, optim, sharding
from llmjax.data import synthetic
from llmjax.models import layers, moe, transformer
from llmjax.train import common, pretrain, state, step

E, D, F = 4, 16, 8


def moe_config(**overrides):
    """tiny_config on the moe-tiny model."""
    cfg = tiny_config()
    cfg.model = config.model_config("moe-tiny")
    for key, value in overrides.items():
        config.override(cfg, key, value)
    return cfg


def model(**overrides):
    """moe-tiny's model with E experts and `overrides` of its keys."""
    return moe_config(**{"model.moe_experts": E, **{f"model.{k}": v for k, v in overrides.items()}}).model


def weights(key, experts=E, shared=0):
    ks = jax.random.split(key, 7)
    w = {"moe_router": jax.random.normal(ks[0], (D, experts)),
         "moe_gate": jax.random.normal(ks[1], (experts, D, F)) / 4,
         "moe_up": jax.random.normal(ks[2], (experts, D, F)) / 4,
         "moe_down": jax.random.normal(ks[3], (experts, F, D)) / 3}
    if shared:
        w |= {"shared_gate": jax.random.normal(ks[4], (D, shared)) / 4,
              "shared_up": jax.random.normal(ks[5], (D, shared)) / 4,
              "shared_down": jax.random.normal(ks[6], (shared, D)) / 3, "shared_router": jnp.ones(D) / 8}
    return w


def swiglu64(x, gate, up, down):
    h = x @ gate
    return (h / (1 + np.exp(-h)) * (x @ up)) @ down


def reference(x_BTD, w, top_k, renormalize, shared_gate=False):
    """Per token in float64: softmax router, the top_k experts, each applied and weighed by its gate."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    out = np.zeros(x_BTD.shape)
    for index in np.ndindex(*x_BTD.shape[:2]):
        x = np.asarray(x_BTD[index], np.float64)
        logits = x @ w["moe_router"]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        chosen = np.argsort(-p, kind="stable")[:top_k]
        gates = p[chosen] / (p[chosen].sum() if renormalize else 1)
        out[index] = sum(g * swiglu64(x, w["moe_gate"][e], w["moe_up"][e], w["moe_down"][e])
                         for e, g in zip(chosen, gates, strict=True))
        if "shared_gate" in w:
            s = swiglu64(x, w["shared_gate"], w["shared_up"], w["shared_down"])
            out[index] += s / (1 + np.exp(-x @ w["shared_router"])) if shared_gate else s
    return out


def inputs(B=2, T=6, seed=1):
    x = jax.random.normal(jax.random.key(seed), (B, T, D))
    return x, jnp.ones((B, T), bool)


def test_one_expert_top1_is_the_dense_mlp():
    w = weights(jax.random.key(0), experts=1)
    x, valid = inputs()
    for dispatch in ("dropless", "capacity"):
        cfg = model(moe_experts=1, moe_top_k=1, moe_dispatch=dispatch)
        y, stats = jax.jit(lambda x, w, cfg=cfg: moe.apply(x, w, valid, cfg, sharding.no_constrain))(x, w)
        dense = layers.swiglu(x, w["moe_gate"][0], w["moe_up"][0], w["moe_down"][0])
        np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)
        assert float(stats["balance"]) == pytest.approx(1.0) and float(stats["dropped"]) == 0


@pytest.mark.parametrize("renormalize, top_k, dispatch, shared", [
    (True, 2, "dropless", 0), (False, 2, "dropless", 0), (True, 3, "capacity", 0), (False, 2, "dropless", 8)])
def test_experts_equal_a_per_token_loop(renormalize, top_k, dispatch, shared):
    """Capacity with factor E / top_k has a slot for every token, so it drops nothing."""
    w = weights(jax.random.key(2), shared=shared)
    x, valid = inputs()
    cfg = model(moe_top_k=top_k, moe_renormalize=renormalize, moe_dispatch=dispatch, moe_capacity_factor=E / top_k,
                moe_shared_d_ff=shared, moe_shared_gate=bool(shared))
    y, stats = jax.jit(lambda x, w: moe.apply(x, w, valid, cfg, sharding.no_constrain))(x, w)
    np.testing.assert_allclose(y, reference(np.asarray(x), w, top_k, renormalize, bool(shared)), rtol=2e-5, atol=2e-5)
    assert float(stats["dropped"]) == 0


def test_dropless_equals_capacity_with_room_for_every_token():
    w = weights(jax.random.key(3))
    x, valid = inputs(B=3, T=10)
    run = lambda cfg: jax.jit(lambda x, w: moe.apply(x, w, valid, cfg, sharding.no_constrain)[0])(x, w)  # noqa: E731
    np.testing.assert_allclose(run(model(moe_dispatch="capacity", moe_capacity_factor=2.0)),
                               run(model(moe_dispatch="dropless")), rtol=1e-5, atol=1e-6)


def test_capacity_drops_the_overflow_first_choices_first():
    """A hand-built routing with 2 slots per expert: token 0's second choice (expert 0) queues behind every first
    choice (tokens 1 and 2), so it is the copy dropped, though token 0 comes first; the padding token takes no
    slot."""
    experts_BTX = jnp.array([[[1, 0], [0, 2], [0, 1], [0, 1]]])
    gates_BTX = jnp.array([[[0.75, 0.25]] * 4])
    valid_BT = jnp.array([[True, True, True, False]])
    w = weights(jax.random.key(4))
    x, _ = inputs(B=1, T=4)
    cfg = model(moe_dispatch="capacity", moe_capacity_factor=1.0)  # U = 1.0 * 4 tokens * 2 choices / 4 experts
    y, dropped = jax.jit(partial(moe.capacity, cfg=cfg))(x, experts_BTX, gates_BTX, valid_BT, w)
    expert = lambda e, t: swiglu64(np.asarray(x[0, t], np.float64), *(np.asarray(w[k][e], np.float64)  # noqa: E731
                                                                      for k in moe.EXPERT_AXES))
    want = [0.75 * expert(1, 0), 0.75 * expert(0, 1) + 0.25 * expert(2, 1), 0.75 * expert(0, 2) + 0.25 * expert(1, 2),
            np.zeros(D)]
    np.testing.assert_allclose(y[0], np.stack(want), rtol=1e-5, atol=1e-6)
    assert float(dropped) == pytest.approx(1 / 6)


def test_router_losses_equal_float64_formulas_and_reach_the_router():
    w = weights(jax.random.key(5))
    x, _ = inputs(B=2, T=8)
    valid = jnp.arange(16).reshape(2, 8) < 13  # three padding tokens, left out of the statistics
    cfg = model(moe_top_k=2)
    _, _, stats = jax.jit(partial(moe.route, cfg=cfg))(x, w["moe_router"], valid)
    logits = np.asarray(x, np.float64).reshape(16, D)[:13] @ np.asarray(w["moe_router"], np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    f = np.bincount(top.ravel(), minlength=E) / top.size
    assert float(stats["balance"]) == pytest.approx(E * np.sum(f * p.mean(0)), rel=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    assert float(stats["z"]) == pytest.approx(np.mean(lse ** 2), rel=1e-5)
    np.testing.assert_allclose(stats["load"], f, rtol=1e-6)
    aux = lambda router: moe.loss(jax.tree.map(lambda a: a[None], moe.route(x, router, valid, cfg)[2])  # noqa: E731
                                  | {"dropped": jnp.zeros(1)}, cfg)[0]
    assert float(jax.jit(aux)(w["moe_router"])) == pytest.approx(
        cfg.moe_balance_coef * E * np.sum(f * p.mean(0)) + cfg.moe_z_coef * np.mean(lse ** 2), rel=1e-5)
    for dispatch in ("dropless", "capacity"):  # the output's gradient reaches the router through the gates too
        out = lambda router, d=dispatch: jnp.sum(moe.apply(x, w | {"moe_router": router}, valid,  # noqa: E731
                                                           model(moe_dispatch=d), sharding.no_constrain)[0] ** 2)
        assert float(jnp.abs(jax.jit(jax.grad(out))(w["moe_router"])).max()) > 1e-4
    assert float(jnp.abs(jax.jit(jax.grad(aux))(w["moe_router"])).max()) > 1e-6


def loss_and_grads(cfg, devices):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    specs = transformer.specs(cfg.model)
    params = state.create(specs, cfg, mesh, optim.make(cfg, specs)).params
    batch = synthetic.batches(cfg, sharding.batch_sharding(mesh, cfg.rules))(0)
    loss_fn = partial(pretrain.loss_fn, cfg=cfg, constrain=sharding.make_constrain(mesh, cfg.rules))
    return jax.device_get(jax.jit(step.grads(loss_fn, 1, common.tokens))(params, batch))


def test_sharded_equals_single_device():
    """Experts on 2 devices x fsdp 2 x tensor 2: the loss (with its router losses), every metric and every
    gradient equal one device's, for a dense layer followed by an MoE layer with a gated shared expert."""
    overrides = {"model.moe_every": 2, "model.moe_shared_d_ff": 32, "model.moe_shared_gate": True}
    single = loss_and_grads(moe_config(**overrides, **{"mesh.fsdp": 1}), jax.devices()[:1])
    sharded = loss_and_grads(moe_config(**overrides, **{"mesh.expert": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
                             jax.devices())
    assert float(single[1]["moe_balance"]) > 1
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-5), sharded[1], single[1])
    jax.tree.map(partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-6), sharded[2], single[2])
