"""The one update: k microbatches equal one batch for every objective, and a non-finite step changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import reward_config, saved_run, tiny_config

from llmjax import config, sharding
from llmjax.train import registry
from llmjax.train.state import TrainState
from llmjax.train.step import grads, make_step

TWO_DEVICES = dict(data=1, fsdp=2, tensor=1)
# Statistics that are not means over the loss's units: over microbatches they are averaged, not recomputed.
NONLINEAR = {"reward_std", "explained_variance"}


def objective_config(name: str, lm_dir: str):
    """A tiny config of each objective, on two devices, with Adam's eps large enough that float32 noise in a
    near-zero gradient cannot flip the sign of an update."""
    common = {"mesh": TWO_DEVICES, "optim.eps": 1e-6, "optim.lr": 1e-3}
    if name == "pretrain":
        return tiny_config(**common)
    if name == "sft":
        return tiny_config(**common, **{"data.format": "chat", "data.tasks": "sort", "init_from": lm_dir})
    if name == "reward":
        return reward_config(lm_dir, **common)
    cfg = tiny_config(**common, **{"data.format": "chat", "data.tasks": "sort", "init_from": lm_dir, "trainer": name,
                                   "batch_size": 16})
    if name == "dpo":
        cfg.dpo = config.load("configs/dpo.py:model=tiny").dpo
        cfg.seq_len = 96
    elif name == "distill":
        cfg.distill = config.load(f"configs/distill.py:model=tiny,teacher={lm_dir}").distill
        cfg.distill.divergence, cfg.init_from = "jsd", ""
    else:
        cfg.ppo = config.load("configs/ppo.py:model=tiny").ppo
        cfg.ppo.update(reward="tasks", max_new_tokens=6, epochs=2, minibatches=2)
    return cfg


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("lm"))
    saved_run(tiny_config(**{"data.format": "chat", "data.tasks": "sort"}), workdir)
    return workdir


MOE = {"model.moe_experts": 4, "model.moe_d_ff": 64, "model.moe_top_k": 2}


@pytest.fixture(scope="module")
def moe_lm_dir(tmp_path_factory) -> str:
    """lm_dir's model with experts."""
    workdir = str(tmp_path_factory.mktemp("moe_lm"))
    saved_run(tiny_config(**{"data.format": "chat", "data.tasks": "sort", **MOE}), workdir)
    return workdir


# Each group runs in one worker (pytest-xdist --dist loadgroup): its module fixture is made once, and its objectives
# share compiled steps through the worker's compilation cache (sft's are pretraining's).
@pytest.mark.slow  # twelve compiles of whole objectives; the fast subset keeps test_microbatches_weigh_by_their_units
@pytest.mark.xdist_group("step_lm")
@pytest.mark.parametrize("name", ["pretrain", "sft", "reward", "dpo", "ppo", "distill"])
def test_grad_accumulation_equals_one_batch(name, lm_dir, tmp_path):
    """optim.grad_accum=4 takes the same step as 1: the same loss and metrics, the same updated parameters."""
    results, batch = [], None
    for k in (1, 4):
        cfg = objective_config(name, lm_dir)
        cfg.optim.grad_accum = k
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:2])
        task = registry.task(cfg, str(tmp_path / str(k)), mesh)
        state = task.start()
        if batch is None:
            batch = jax.device_get(task.source(state, 0)[0])
        step = task.jit_step(jax.tree.map(lambda x: x.sharding, state))
        new, m = step(state, jax.device_put(batch, task.batch_sharding), *task.frozen)
        results.append(jax.device_get((new.params, m)))
    (params, m), (params_k, m_k) = results
    assert m_k["nonfinite"] == 0 and set(m_k) == set(m)
    for key in set(m) - NONLINEAR:
        np.testing.assert_allclose(m_k[key], m[key], rtol=2e-5, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), params_k, params)


def weighted_loss(params, batch):
    """A mean over each row's units (weights), as every objective's loss is over tokens, pairs or prompts."""
    per_row = jnp.sum(params["w"] * batch["x"], axis=-1) ** 2
    return jnp.sum(per_row * batch["units"]) / jnp.sum(batch["units"]), {"rows": jnp.mean(per_row)}


def test_microbatches_weigh_by_their_units():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
             "units": jnp.asarray([0, 3, 1, 7, 2, 2, 5, 1], jnp.float32)}
    params = {"w": jnp.asarray([0.5, -1.0, 2.0])}
    whole = grads(weighted_loss)(params, batch)
    accumulated = grads(weighted_loss, 4, lambda mb: jnp.sum(mb["units"]))(params, batch)
    np.testing.assert_allclose(accumulated[0], whole[0], rtol=1e-6)
    np.testing.assert_allclose(accumulated[2]["w"], whole[2]["w"], rtol=1e-5)
    unweighted = grads(weighted_loss, 4)(params, batch)
    assert abs(float(unweighted[0]) - float(whole[0])) > 1e-3  # the weights matter: rows carry unequal units


def test_nonfinite_step_is_skipped_and_counted():
    def loss(params, batch):
        return jnp.sum(params["w"] * batch["x"]) + batch["shift"], {}

    tx = optax.adam(0.1)
    params = {"w": jnp.ones(3)}
    step = jax.jit(make_step(loss, tx, optax.constant_schedule(0.1)))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    clean = {"x": jnp.array([1.0, 2.0, 3.0]), "shift": jnp.float32(0)}
    for bad in ({"x": jnp.array([1.0, jnp.nan, 3.0])},  # NaN gradients
                {"shift": jnp.float32(jnp.inf)}):       # an infinite loss with finite gradients
        new, m = step(state, clean | bad)
        assert float(m["nonfinite"]) == 1 and int(new.bad_steps) == int(state.bad_steps) + 1
        jax.tree.map(np.testing.assert_array_equal, (new.params, new.opt_state), (state.params, state.opt_state))
        state = new
    new, m = step(state, clean)
    assert float(m["nonfinite"]) == 0 and int(new.bad_steps) == 0 and int(new.step) == 3
    assert not np.array_equal(new.params["w"], state.params["w"])


@pytest.mark.slow  # three compiles of whole objectives
@pytest.mark.xdist_group("step_moe_lm")
@pytest.mark.parametrize("name", ["reward", "dpo", "ppo"])
def test_router_losses_join_every_objective(name, moe_lm_dir, tmp_path):
    """On an MoE model each objective's step logs the router's losses and trains the router (pretraining and SFT:
    tests/models/test_moe.py, tests/test_moe_experiment.py)."""
    cfg = objective_config(name, moe_lm_dir)
    for key, value in (MOE | {"optim.warmup_steps": 0}).items():  # a first step with a learning rate
        config.override(cfg, key, value)
    task = registry.task(cfg, str(tmp_path / "run"), sharding.make_mesh(cfg.mesh, jax.devices()[:2]))
    state = task.start()
    router = lambda p: np.asarray((p["trunk"] if name == "reward" else p["policy"] if name == "ppo" else p)  # noqa: E731
                                  ["layers"]["moe_router"])
    before = router(state.params)  # the step donates the state
    new, m = task.jit_step(jax.tree.map(lambda x: x.sharding, state))(state, task.source(state, 0)[0], *task.frozen)
    assert {"moe_balance", "moe_z", "moe_load_min"} <= set(m) and float(m["moe_balance"]) >= 1.0
    assert np.abs(router(new.params) - before).max() > 0
