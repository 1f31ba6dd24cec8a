"""DPO: precomputed reference == live, packed pairs == two rows, sharded == unsharded, and it learns."""

from functools import partial

import jax
import numpy as np
import pytest
from helpers import dpo_config, metric_rows, one_device

from llmjax import config, runs, sharding
from llmjax.data import preference
from llmjax.train import dpo, loop, registry


def test_precomputed_reference_equals_live(sft_dir, tmp_path):
    live = dpo_config(sft_dir, steps=3)
    task = registry.task(live, str(tmp_path / "live"))
    reference = task.frozen[0]
    pre = dpo_config(sft_dir, steps=3)
    pre.dpo.reference = "precomputed"
    pre_task = registry.task(pre, str(tmp_path / "pre"))
    assert not (tmp_path / "pre").exists()  # building a task writes nothing; the first batch computes them
    constrain = sharding.make_constrain(sharding.make_mesh(live.mesh), live.rules)
    policy = jax.tree.map(lambda x: x * 1.01, reference)  # a policy that differs from the reference
    for step in range(3):
        want = dpo.loss_fn(policy, task.source(None, step)[0], live, constrain, reference)
        got = dpo.loss_fn(policy, pre_task.source(None, step)[0], pre, constrain)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    assert pre_task.frozen == () and (tmp_path / "pre" / "reference_logps.npz").exists()


def test_packed_equals_two_rows(sft_dir, tmp_path):
    cfg = dpo_config(sft_dir)
    task = registry.task(cfg, str(tmp_path))
    reference = task.frozen[0]
    policy = jax.tree.map(lambda x: x * 0.99, reference)
    constrain = sharding.make_constrain(sharding.make_mesh(cfg.mesh), cfg.rules)
    two_rows = preference.batches(cfg, task.batch_sharding, preference.source(cfg))(0)
    packed = preference.batches(cfg, task.batch_sharding, preference.source(cfg), layout="packed")(0)
    assert int((packed["packed"]["segment_ids"] == 2).sum()) > 0
    want = dpo.loss_fn(policy, two_rows, cfg, constrain, reference)
    got = dpo.loss_fn(policy, packed, cfg, constrain, reference)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def dpo_loss(policy, batch, reference, cfg, constrain):
    return dpo.loss_fn(policy, batch, cfg, constrain, reference)[0]


def test_sharded_equals_single_device(sft_dir):
    results = []
    for mesh_cfg, devices in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              (dict(data=1, fsdp=4, tensor=2), jax.devices()),
                              (dict(data=1, fsdp=2, context=2, tensor=2), jax.devices())):
        cfg = dpo_config(sft_dir)
        cfg.mesh = mesh_cfg
        mesh = sharding.make_mesh(cfg.mesh, devices)
        reference = runs.load_params(sft_dir, mesh)
        policy = jax.tree.map(lambda x: x * 1.01, reference)
        batch = preference.batches(cfg, sharding.batch_sharding(mesh, cfg.rules), preference.source(cfg))(0)
        constrain = sharding.make_constrain(mesh, cfg.rules)
        grad = jax.jit(jax.value_and_grad(partial(dpo_loss, cfg=cfg, constrain=constrain)))
        results.append(jax.device_get(grad(policy, batch, reference)))
    (loss, grads), *sharded = results
    for loss_s, grads_s in sharded:  # the second: ring attention over the sequence split in two
        np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_s, grads)


def test_dpo_learns(sft_dir, tmp_path):
    """From the SFT run, with RPO's NLL term: on held-out pairs the policy prefers the correct answer and gives it
    more probability than the SFT model did, and greedy accuracy does not fall (measured: log p(correct)
    -2.27 -> -2.16, accuracy 31.3% -> 33.6%; plain DPO lowers both, as it is known to)."""
    cfg = dpo_config(sft_dir, steps=150, eval_every=150, eval_prompts=128,
                     **{"optim.lr": 3e-4, "optim.warmup_steps": 5, "seq_len": 64})
    cfg.dpo.nll_weight = 1.0
    mesh = one_device()  # the task, its reference and the training run on one mesh: one fake device (1.5x faster)
    task = registry.task(cfg, str(tmp_path), mesh)
    reference = task.frozen[0]
    held_out = dpo_config(sft_dir, seed=12345, seq_len=64)
    batch = preference.batches(held_out, task.batch_sharding, preference.source(held_out))(0)
    constrain = sharding.make_constrain(mesh, cfg.rules)
    before = task.evaluate(reference)
    final = loop.run(cfg, str(tmp_path), task)  # registry.train's run, on the task built above
    _, aux = dpo.loss_fn(final.params, batch, cfg, constrain, reference)
    assert float(aux["reward_accuracy"]) >= 0.8, aux
    assert float(aux["reward_margin"]) > 0.1, aux  # both are 0 at the start, where policy == reference
    chosen_before = float(dpo.pair_logps(reference, batch, cfg, constrain)[0].mean())
    assert float(aux["logp_chosen"]) > chosen_before + 0.03, (chosen_before, aux["logp_chosen"])
    after = [r for r in metric_rows(tmp_path) if "eval/accuracy" in r][-1]
    assert after["eval/accuracy"] >= before["accuracy"], (before, after)
    assert after["eval/perplexity"] < before["perplexity"], (before, after)  # of the correct answers


def test_pairs_that_train_on_nothing_are_refused_before_anything_else(tmp_path):
    """chosen == rejected in every pair: DPO's gradient is exactly 0, so the run is refused in one line before it
    reads its reference or writes to its workdir."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "p.jsonl").write_text("".join(f'{{"prompt": "sort {i} = ", "chosen": "12", "rejected": "12"}}\n'
                                            for i in range(8)))
    cfg = dpo_config(str(tmp_path / "no_sft_run"), eval_every=0, **{"data.source": f"files:{folder}",
                                                                    "data.data_dir": str(tmp_path / "tfds")})
    with pytest.raises(config.LlmjaxError, match=r"^data.source='files:.*': all \d records have the same best and "
                                                 r"worst response \(chosen == rejected\)"):
        registry.task(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_every_dpo_loss_refuses_a_beta_of_zero_or_less():
    for loss in ("sigmoid", "cdpo", "ipo", "hinge", "simpo"):
        for beta in (0.0, -0.1):
            cfg = dpo_config("runs/sft")
            cfg.dpo.update(loss=loss, beta=beta)
            with pytest.raises(config.LlmjaxError, match=rf"^dpo.beta={beta} is outside \(0, inf\)"):
                registry.validate(cfg, 8)
