"""The pretraining step: sharded equals unsharded, accumulation equals one big batch, and resume is exact."""

import os
import signal
from functools import partial

import jax
import numpy as np
import pytest
from helpers import losses, one_device, tiny_config

from llmjax import optim, sharding
from llmjax.data import synthetic
from llmjax.models import transformer
from llmjax.train import common, pretrain, registry, state, step

MESHES = {
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
    "context2_fsdp2_tensor2": dict(data=1, fsdp=2, context=2, tensor=2),  # ring attention, zigzag order
}


def loss_and_grads(cfg, devices):
    """One batch's loss and gradients, computed on a mesh over `devices` with the run's shardings."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    tx = optim.make(cfg, transformer.specs(cfg.model))
    params = state.create(transformer.specs(cfg.model), cfg, mesh, tx).params
    batch_sh = sharding.batch_sharding(mesh, cfg.rules)
    batch = synthetic.batches(cfg, batch_sh)(0)
    constrain = sharding.make_constrain(mesh, cfg.rules)
    loss_fn = partial(pretrain.loss_fn, cfg=cfg, constrain=constrain)
    fn = jax.jit(lambda p, b: step.grads(loss_fn, cfg.optim.grad_accum, common.tokens)(p, b))
    return jax.device_get(fn(params, batch))


@pytest.fixture(scope="module")
def reference():
    """One device's loss and gradients. Its users run in one worker (xdist_group "pretrain_reference"), which
    computes it once."""
    return loss_and_grads(tiny_config(**{"mesh.fsdp": 1}), jax.devices()[:1])


def test_foreign_padding_changes_nothing():
    """Masked targets of -100 (PyTorch's convention) give the loss and gradients of clean padding."""
    cfg = tiny_config(**{"mesh.fsdp": 1, "data.format": "chat"})
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    params = state.create(transformer.specs(cfg.model), cfg, mesh, optim.make(cfg, transformer.specs(cfg.model))).params
    batch = jax.device_get(synthetic.batches(cfg, sharding.batch_sharding(mesh, cfg.rules))(0))
    assert (batch["loss_mask"] == 0).any()
    grad = jax.jit(jax.value_and_grad(lambda p, b: pretrain.loss_fn(p, b, cfg, sharding.no_constrain)[0]))
    foreign = batch | {"targets": np.where(batch["loss_mask"] > 0, batch["targets"], -100)}
    (loss, g), (loss_f, g_f) = grad(params, batch), grad(params, foreign)
    assert np.isfinite(loss_f) and float(loss_f) == float(loss)
    jax.tree.map(np.testing.assert_array_equal, g_f, g)


@pytest.mark.xdist_group("pretrain_reference")
@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_step_equals_single_device(reference, mesh):
    cfg = tiny_config()
    cfg.mesh = MESHES[mesh]
    loss, aux, grads = loss_and_grads(cfg, jax.devices())
    ref_loss, ref_aux, ref_grads = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


@pytest.mark.xdist_group("pretrain_reference")
@pytest.mark.parametrize("model", [{"model.context_parallel": "allgather"}, {"model.attention": "blockwise",
                                                                          "model.attn_block": 16}])
def test_context_parallel_step_equals_single_device(reference, model):
    """The sequence split four ways: all-gathered keys and values, and ring attention over blockwise attention."""
    cfg = tiny_config(**model)
    cfg.mesh = dict(data=1, fsdp=2, context=4, tensor=1)
    loss, aux, grads = loss_and_grads(cfg, jax.devices())
    np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, reference[2])


@pytest.mark.xdist_group("pretrain_reference")
def test_grad_accumulation_equals_one_batch(reference):
    loss, aux, grads = loss_and_grads(tiny_config(**{"mesh.fsdp": 1, "optim.grad_accum": 4}), jax.devices()[:1])
    np.testing.assert_allclose(loss, reference[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, reference[2])


@pytest.mark.slow
def test_resume_is_exact(tmp_path, monkeypatch):
    """20 steps straight == 10 steps, a SIGTERM (preemption: save and stop), then resume to 20."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    cfg = tiny_config(steps=20, log_every=1)
    registry.train(cfg, straight, one_device())

    def preempt_after_10(cfg, sharding):
        get = batches(cfg, sharding)
        return lambda step: (step == 9 and os.kill(os.getpid(), signal.SIGTERM)) or get(step)

    batches = synthetic.batches
    monkeypatch.setattr(synthetic, "batches", preempt_after_10)
    registry.train(cfg, split, one_device())
    assert sorted(os.listdir(os.path.join(split, "checkpoints")), key=int) == ["5", "10"]
    monkeypatch.undo()
    registry.train(cfg, split, one_device())
    assert losses(split) == losses(straight)
    assert sorted(losses(split)) == list(range(1, 21))
