"""The pipeline experiment: it runs end to end on `tiny` (two steps a stage), every stage's config builds and
validates at any scale, and the table reads the stages' metrics."""

import json
import math
import os

import jax
import pytest

from experiments.pipeline import run
from llmjax import runs
from llmjax.train.registry import validate


def test_runs_end_to_end_on_tiny(pipeline_dir):
    with open(os.path.join(pipeline_dir, "results.json")) as f:
        results = json.load(f)
    stages = {r["stage"]: r for r in results["stages"]}
    assert list(stages) == [name for name, *_ in run.STAGES] and results["model"] == "tiny"
    assert results["focus"] == ["sort", "lookup"]
    for name, _, parent, _ in run.STAGES:
        cfg = runs.run_config(os.path.join(pipeline_dir, name))
        assert cfg.model.name == "tiny" and stages[name]["steps"] == cfg.steps <= 4, name
        assert cfg.init_from == (os.path.join(pipeline_dir, parent) if parent else ""), name
    rewards = {name: runs.run_config(os.path.join(pipeline_dir, name)).ppo.reward
               for name in ("ppo", "ppo_tasks", "grpo", "grpo_math")}
    assert rewards == {"ppo": os.path.join(pipeline_dir, "reward"), "ppo_tasks": "tasks", "grpo": "tasks",
                       "grpo_math": "math"}
    assert cfg.data.source == "files:" + os.path.join(pipeline_dir, "problems.jsonl")
    assert 0 <= stages["reward"]["rm_accuracy"] <= 1
    for name in ("pretrain", "sft", "dpo", "ppo", "ppo_tasks", "grpo"):
        assert math.isfinite(stages[name]["perplexity"]) and 0 <= stages[name]["accuracy"] <= 1, name
    for name in ("ppo", "ppo_tasks", "grpo", "grpo_math"):
        assert all(math.isfinite(stages[name][k]) for k in ("reward_start", "reward_end", "kl_to_ref")), name
        assert 0 <= stages[name]["own_start"] <= 1 and 0 <= stages[name]["own_end"] <= 1, name
    assert stages["grpo_math"]["own_prompts"] == "problems" and stages["grpo"]["own_prompts"] == "sort, lookup"
    with open(os.path.join(pipeline_dir, "results.md")) as f:
        assert f.read() == run.table(results["stages"], results["focus"])
    assert os.path.getsize(os.path.join(pipeline_dir, "pipeline.png")) > 10_000


def test_every_stage_config_scales_and_validates():
    for name, spec, _, overrides in run.STAGES:
        cfg = run.stage_config(spec, "tiny", 0.1, {k: v.format(reward="/tmp/rm", problems="/tmp/p.jsonl",
                                                                problems_sft="/tmp/s.jsonl", data_dir="/tmp/tfds")
                                                   if isinstance(v, str) else v for k, v in overrides.items()})
        assert cfg.model.name == "tiny" and cfg.steps >= 2 and cfg.checkpoint.every <= cfg.steps, name
        assert not cfg.eval_every or cfg.eval_every <= cfg.steps, name
        validate(cfg, jax.device_count())
    grpo = run.stage_config("configs/ppo.py:algorithm=grpo", "tiny", 1.0, {"ppo.reward": "tasks"})
    assert grpo.ppo.algorithm == "grpo" and grpo.ppo.reward == "tasks"


def test_summaries_and_table():
    rows = [{"step": s, "score": s / 10, "kl_to_ref": 0.1 * s} for s in range(1, 9)]
    rows.append({"step": 8, "eval/perplexity": 3.0, "eval/accuracy": 0.25, "eval/accuracy/sort": 0.5,
                 "eval/accuracy/lookup": 0.2})
    ppo = run.summarise("ppo", rows, 60.0)
    assert (ppo["reward_start"], ppo["reward_end"]) == pytest.approx((0.15, 0.75)) and ppo["accuracy/sort"] == 0.5
    rm = run.summarise("reward", [{"step": 5, "eval/accuracy": 0.8, "eval/margin": 1.0}], 30.0)
    assert rm["rm_accuracy"] == 0.8 and "accuracy" not in rm
    cfg = run.stage_config("configs/ppo.py", "tiny", 0.1, {"ppo.reward": "tasks"})
    start = {"accuracy/sort": 0.4, "accuracy/lookup": 0.1, "accuracy/add": 0.9}
    ppo |= run.own_accuracy(cfg, start, "start") | run.own_accuracy(cfg, rows, "end")
    assert (ppo["own_start"], ppo["own_end"]) == pytest.approx((0.25, 0.35))
    table = run.table([ppo, rm], ["sort", "lookup"])
    assert "| accuracy on sort, lookup |" in table
    assert "| ppo | 8 | 3 | 25.0% | 35.0% | sort, lookup: 25.0% → 35.0% |  | 0.150 → 0.750 |" in table
    assert "| reward | 5 |  |  |  |  | 80.0% |" in table
