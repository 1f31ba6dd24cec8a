"""PPO / GRPO: the rollout's log-probs equal a teacher-forced recomputation (ratio 1 before any update), one
update is the same sharded as on one device, and both learn: the task reward and a reward model's score rise."""

import jax
import numpy as np
import pytest
from helpers import metric_rows, one_device, ppo_config

from llmjax import config, sharding
from llmjax.train import ppo, registry


@pytest.mark.parametrize("algorithm,value", [("ppo", "separate"), ("ppo", "shared"), ("grpo", "separate")])
def test_recomputed_logprobs_equal_the_rollouts(sft_dir, tmp_path, algorithm, value):
    cfg = ppo_config(sft_dir, algorithm)
    cfg.ppo.value = value
    task = registry.task(cfg, str(tmp_path))
    state = task.start()
    batch, metrics = task.source(state, 0)
    logp, _ = ppo.token_logprobs(state.params["policy"], batch, cfg, sharding.no_constrain)
    mask = np.asarray(batch["loss_mask"])
    assert mask.sum() > 16 and metrics["response_length"] > 1
    np.testing.assert_allclose(np.asarray(logp) * mask, np.asarray(batch["old_logp"]) * mask, atol=2e-4)
    _, aux = ppo.loss_fn(state.params, batch, cfg, sharding.no_constrain)
    np.testing.assert_allclose(aux["ratio_mean"], 1.0, atol=1e-4)
    assert float(aux["clip_frac"]) == 0.0
    assert abs(float(metrics["kl_to_ref"])) < 1e-3  # the policy is the reference before any update


def test_one_update_sharded_equals_single_device(sft_dir, tmp_path):
    results, batch = [], None
    for mesh_cfg, devices in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              (dict(data=2, fsdp=2, tensor=2), jax.devices())):
        cfg = ppo_config(sft_dir)
        cfg.mesh = mesh_cfg
        task = registry.task(cfg, str(tmp_path), sharding.make_mesh(cfg.mesh, devices))
        state = task.start()
        if batch is None:
            batch = jax.device_get(task.source(state, 0)[0])
        step = task.jit_step(jax.tree.map(lambda x: x.sharding, state))
        new, m = step(state, jax.device_put(batch, task.batch_sharding))
        results.append(jax.device_get((new.params, m)))
    (params, m), (params_s, m_s) = results
    # Adam divides by sqrt(v): float32 noise in a near-zero gradient moves that update by a fraction of lr (3e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5), params_s, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), m_s, m)


def quarters(workdir, key: str) -> tuple[float, float]:
    values = [r[key] for r in metric_rows(workdir) if key in r and "eval/accuracy" not in r]
    n = len(values) // 4
    return float(np.mean(values[:n])), float(np.mean(values[-n:]))


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_learns_the_task_reward(sft_dir, tmp_path, algorithm):
    """Rewarded by the sort checker, the sampled answers get right more often while the KL stays bounded."""
    cfg = ppo_config(sft_dir, algorithm, steps=60, batch_size=64)
    cfg.ppo.update(epochs=1, minibatches=1, group_size=8)
    registry.train(cfg, str(tmp_path), one_device())
    first, last = quarters(tmp_path, "score")
    assert last > first + 0.04, (first, last)
    assert quarters(tmp_path, "kl_to_ref")[1] < 1.5


def test_raises_the_reward_models_score(sft_dir, rm_dir, tmp_path):
    """PPO against a learned reward model, with the adaptive KL coefficient: the score rises, every metric is
    logged, and the coefficient moves toward its target."""
    cfg = ppo_config(sft_dir, steps=20, batch_size=32)
    cfg.ppo.update(reward=rm_dir, epochs=1, minibatches=1, target_kl=0.01)
    registry.train(cfg, str(tmp_path), one_device())
    first, last = quarters(tmp_path, "score")
    assert last > first + 0.2, (first, last)
    rows = [r for r in metric_rows(tmp_path) if "score" in r]
    for key in ("score", "reward_with_kl", "kl_to_ref", "entropy", "clip_frac", "approx_kl", "value_loss",
                "explained_variance", "response_length", "accuracy", "kl_coef"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["kl_coef"] != rows[0]["kl_coef"]


def test_prompts_come_from_ppo_tasks_in_groups():
    cfg = ppo_config("unused", "grpo")
    cfg.ppo.tasks = "lookup,add"
    examples = ppo.prompts(cfg)(0)
    assert len(examples) == cfg.batch_size and {ex.task for ex in examples} == {"lookup", "add"}
    groups = [examples[i:i + cfg.ppo.group_size] for i in range(0, len(examples), cfg.ppo.group_size)]
    assert all(len({ex.prompt for ex in group}) == 1 for group in groups)
    cfg.ppo.tasks = ""
    assert {ex.task for ex in ppo.prompts(cfg)(0)} == {"sort"}


@pytest.mark.parametrize("overrides, message", [
    ({"ppo.tasks": "sort,sorting"}, r"ppo.tasks='sort,sorting' names unknown tasks \['sorting'\]"),
    ({"ppo.algorithm": "grpo", "ppo.group_size": 1}, r"GRPO normalises over K >= 2 samples"),
    ({"ppo.minibatches": 3}, r"batch_size=16 must split into ppo.minibatches=3"),
    ({"ppo.value": "tied"}, r"ppo.value='tied' is not one of \('separate', 'shared'\)"),
    ({"init_from": ""}, r"PPO starts from an SFT run"),
])
def test_validate_rejects_bad_ppo_configs(overrides, message):
    cfg = ppo_config("runs/sft")
    for key, value in overrides.items():
        config.override(cfg, key, value)
    with pytest.raises(config.ConfigError, match=message):
        registry.validate(cfg, 8)
