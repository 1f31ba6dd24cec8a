"""PPO / GRPO: the rollout's log-probs equal a teacher-forced recomputation at the sampling temperature (ratio 1
before any update), one update is the same sharded as on one device, and both learn: the task reward, a reward
model's score, and GRPO on a files: prompts source rewarded by the answers in its records. A user's reward function
reads the records and its scores become the advantages; one that raises or returns NaN stops the run, naming
itself."""

import jax
import numpy as np
import pytest
from helpers import metric_rows, one_device, ppo_config, prompts_file

from llmjax import config, losses, rewards, sharding
from llmjax.data import prompts
from llmjax.train import ppo, registry


@pytest.mark.parametrize("algorithm,value,temperature", [
    ("ppo", "separate", 1.0), ("ppo", "shared", 1.0), ("grpo", "separate", 1.0), ("grpo", "separate", 0.5)])
def test_recomputed_logprobs_equal_the_rollouts(sft_dir, tmp_path, algorithm, value, temperature):
    cfg = ppo_config(sft_dir, algorithm)
    cfg.ppo.value, cfg.ppo.temperature = value, temperature
    task = registry.task(cfg, str(tmp_path))
    state = task.start()
    batch, metrics = task.source(state, 0)
    logp, _ = ppo.token_logprobs(state.params["policy"], batch, cfg, sharding.no_constrain)
    mask = np.asarray(batch["loss_mask"])
    assert mask.sum() > 16 and metrics["response_length"] > 1
    np.testing.assert_allclose(np.asarray(logp) * mask, np.asarray(batch["old_logp"]) * mask, atol=2e-4)
    if temperature != 1.0:  # the tempered policy's log-probs, not the raw model's
        untempered = cfg.copy_and_resolve_references()
        untempered.ppo.temperature = 1.0
        raw, _ = ppo.token_logprobs(state.params["policy"], batch, untempered, sharding.no_constrain)
        assert np.abs(np.asarray(raw - logp) * mask).max() > 0.05
    _, aux = ppo.loss_fn(state.params, batch, cfg, sharding.no_constrain)
    np.testing.assert_allclose(aux["ratio_mean"], 1.0, atol=1e-4)
    assert float(aux["clip_frac"]) == 0.0
    assert abs(float(metrics["kl_to_ref"])) < 1e-3  # the policy is the reference before any update


def test_one_update_sharded_equals_single_device(sft_dir, tmp_path):
    results, batch = [], None
    for mesh_cfg, devices in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              (dict(data=1, fsdp=2, context=2, tensor=2), jax.devices())):  # ring attention
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


def test_ppo_learns_the_task_reward(sft_dir, tmp_path):
    """Rewarded by the sort checker, the sampled answers get right more often while the KL stays bounded."""
    cfg = ppo_config(sft_dir, "ppo", steps=60, batch_size=64)
    cfg.ppo.update(epochs=1, minibatches=1)
    registry.train(cfg, str(tmp_path), one_device())
    first, last = quarters(tmp_path, "score")
    assert last > first + 0.04, (first, last)
    assert quarters(tmp_path, "kl_to_ref")[1] < 1.5


def test_grpo_learns_from_a_files_prompts_source(sft_dir, tmp_path):
    """GRPO on prompt records read from a .jsonl file, rewarded by `math` against each record's answer: the reward
    (the accuracy) rises while the KL stays bounded."""
    cfg = ppo_config(sft_dir, "grpo", steps=60, batch_size=64)
    cfg.data.update(source=prompts_file(tmp_path / "prompts.jsonl", n=512), data_dir=str(tmp_path / "tfds"))
    cfg.ppo.update(reward="math", epochs=1, minibatches=1, group_size=8)
    registry.train(cfg, str(tmp_path / "run"), one_device())
    first, last = quarters(tmp_path / "run", "score")
    assert last > first + 0.04, (first, last)
    assert quarters(tmp_path / "run", "accuracy") == (first, last)
    assert quarters(tmp_path / "run", "kl_to_ref")[1] < 1.5


def test_user_reward_reads_the_records_and_becomes_the_advantages(sft_dir, tmp_path):
    """ppo.reward=module:function is called with the records' extra fields; its scores, combined with a built-in
    by weight, are what the group advantages are taken of. A function that raises or returns NaN stops the rollout
    in one line naming it and the answer."""
    cfg = ppo_config(sft_dir, "grpo")
    cfg.data.update(source=prompts_file(tmp_path / "prompts.jsonl"), data_dir=str(tmp_path / "tfds"))
    cfg.ppo.reward = "helpers:weighted_length:0.5,exact:2"
    task = registry.task(cfg, str(tmp_path), one_device())
    rollout, state = task.source, task.start()
    records = rollout.prompts(0)
    sampled = rollout.sample(state.params, records, 0)
    scores = [0.5 * r["weight"] * len(a) + 2.0 * (a.strip() == r["answer"])
              for r, a in zip(records, sampled.responses, strict=True)]
    assert len(set(scores)) > 2
    got, made = rollout.score(records, sampled)
    np.testing.assert_allclose(np.asarray(got), scores, rtol=1e-6)
    batch, _ = rollout.experience(state.params, sampled.rows, got, state.extra["kl_coef"])
    mask = np.asarray(batch["loss_mask"]) > 0
    expected = np.asarray(losses.group_advantages(np.array(scores, np.float32), cfg.ppo.group_size))
    np.testing.assert_allclose(np.asarray(batch["advantages"]), np.where(mask, expected[:, None], 0), atol=1e-5)
    assert made["reward/helpers:weighted_length"] == pytest.approx(np.mean([r["weight"] * len(a) for r, a in zip(
        records, sampled.responses, strict=True)]))
    for spec, problem in (("helpers:raising", r"raised ValueError\('too long'\) on response \d+ '"),
                          ("helpers:nan_for_long", r"returned nan for response \d+ '")):
        rollout.terms = rewards.parse(spec)
        with pytest.raises(rewards.RewardError, match=rf"^reward '{spec}' {problem}") as e:
            rollout.score(records, sampled)
        assert "\n" not in str(e.value)


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


def test_a_misspelt_reward_is_refused_naming_the_kinds(sft_dir, tmp_path):
    cfg = ppo_config(sft_dir)
    cfg.ppo.reward = "maths:1.0,exact:0.5"
    with pytest.raises(config.LlmjaxError, match=r"'maths' is neither a reward \(tasks, math, exact"):
        registry.task(cfg, str(tmp_path), one_device())


def test_prompts_come_from_ppo_tasks_in_groups():
    cfg = ppo_config("unused", "grpo")
    cfg.ppo.tasks = "lookup,add"
    records = prompts.source(cfg, cfg.ppo.group_size, cfg.ppo.tasks)(0)
    assert len(records) == cfg.batch_size and {r["task"] for r in records} == {"lookup", "add"}
    groups = [records[i:i + cfg.ppo.group_size] for i in range(0, len(records), cfg.ppo.group_size)]
    assert all(len({r["prompt"] for r in group}) == 1 for group in groups)
    cfg.ppo.tasks = ""
    assert {r["task"] for r in prompts.source(cfg, cfg.ppo.group_size, cfg.ppo.tasks)(0)} == {"sort"}


def test_files_prompts_come_in_a_seeded_shuffle_of_every_record_per_epoch(tmp_path):
    cfg = ppo_config("unused", "grpo", batch_size=16)
    cfg.data.update(source=prompts_file(tmp_path / "p.jsonl", n=40), data_dir=str(tmp_path / "tfds"), validation=0.2)
    get, train = prompts.source(cfg, cfg.ppo.group_size, cfg.ppo.tasks), prompts.records(cfg, "train")
    steps = -(-len(train) // (cfg.batch_size // cfg.ppo.group_size))
    seen = [r["id"] for step in range(steps) for r in get(step)[::cfg.ppo.group_size]][:len(train)]
    assert sorted(seen) == sorted(r["id"] for r in train)  # each record once per epoch
    again = prompts.source(cfg, cfg.ppo.group_size, cfg.ppo.tasks)
    assert get(3) == again(3) and get(0) != get(steps)  # a pure function of the step
    held = prompts.held_out(cfg, 100)["p"]
    assert held and not {r["id"] for r in held} & set(seen)


@pytest.mark.parametrize("overrides, message", [
    ({"ppo.tasks": "sort,sorting"}, r"ppo.tasks='sort,sorting' names unknown tasks \['sorting'\]"),
    ({"ppo.algorithm": "grpo", "ppo.group_size": 1}, r"GRPO normalises over K >= 2 samples"),
    ({"ppo.minibatches": 3}, r"batch_size=16 must split into ppo.minibatches=3"),
    ({"ppo.value": "tied"}, r"ppo.value='tied' is not one of \('separate', 'shared'\)"),
    ({"init_from": ""}, r"PPO starts from an SFT run"),
    ({"ppo.loss_agg": "mean"}, r"ppo.loss_agg='mean' is not one of"),
    ({"ppo.baseline": "rloo"}, r"ppo.baseline='rloo' is not one of"),
    ({"ppo.dynamic_sampling": True}, r"ppo.dynamic_sampling shapes GRPO's group advantages"),
    ({"ppo.overlong_buffer": 13}, r"ppo.overlong_buffer=13 is longer than ppo.max_new_tokens=12"),
    ({"ppo.clip_low": 1.5}, r"ppo.clip_low=1.5"),
    ({"ppo.reward": "math:x"}, r"ppo.reward"),
    ({"ppo.reward": "no_such_module_xyz:fn"}, r"no_such_module_xyz"),
    ({"data.source": "files:/tmp/p.jsonl"}, r"the tasks' checkers score the synthetic tasks"),
    ({"data.source": "files:/tmp/p.jsonl", "ppo.reward": "math", "ppo.tasks": "sort"}, r"ppo.tasks='sort' chooses"),
])
def test_validate_rejects_bad_ppo_configs(overrides, message):
    cfg = ppo_config("runs/sft")
    for key, value in overrides.items():
        config.override(cfg, key, value)
    with pytest.raises(config.LlmjaxError, match=message):
        registry.validate(cfg, 8)
