"""The pipeline experiment's pieces: every stage's config builds and validates at any scale, and the table reads
the stages' metrics. (The end-to-end run on `tiny` is done by hand for now: `--model=tiny --scale=0.1`.)"""

import jax
import pytest

from experiments.pipeline import run
from llmjax.config import validate


def test_every_stage_config_scales_and_validates():
    for name, spec, _, overrides in run.STAGES:
        cfg = run.stage_config(spec, "tiny", 0.1, {k: "/tmp/rm" if "{" in str(v) else v for k, v in overrides.items()})
        assert cfg.model.name == "tiny" and cfg.steps >= 2 and cfg.checkpoint.every <= cfg.steps, name
        assert not cfg.eval_every or cfg.eval_every <= cfg.steps, name
        validate(cfg, jax.device_count())
    grpo = run.stage_config("configs/ppo.py:algorithm=grpo", "tiny", 1.0, {"ppo.reward": "tasks"})
    assert grpo.ppo.algorithm == "grpo" and grpo.ppo.reward == "tasks"


def test_summaries_and_table():
    rows = [{"step": s, "score": s / 10, "kl_to_ref": 0.1 * s} for s in range(1, 9)]
    rows.append({"step": 8, "eval/perplexity": 3.0, "eval/accuracy": 0.25, "eval/accuracy/sort": 0.5})
    ppo = run.summarise("ppo", rows, 60.0)
    assert (ppo["reward_start"], ppo["reward_end"]) == pytest.approx((0.15, 0.75)) and ppo["accuracy/sort"] == 0.5
    rm = run.summarise("reward", [{"step": 5, "eval/accuracy": 0.8, "eval/margin": 1.0}], 30.0)
    assert rm["rm_accuracy"] == 0.8 and "accuracy" not in rm
    table = run.table([ppo, rm])
    assert "| ppo | 8 | 3 | 25.0% |  | 0.150 → 0.750 |" in table and "| reward | 5 |  |  | 80.0% |" in table
