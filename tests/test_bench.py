"""The training benchmark: a short run on the tiny model compiles its step once and reports a plausible speed."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_train_writes_its_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "bench.json"
    args = ["--config=configs/pretrain.py:model=tiny,steps=4", "--config.batch_size=8", "--config.seq_len=32",
            "--steps=3", f"--out={out}"]
    run = subprocess.run([sys.executable, "-m", "llmjax.bench", "train", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "train" and result["model"] == "tiny"
    assert result["compiles"] == 1  # no recompiles after the first step
    assert result["tokens_per_s"] > 0
    assert 0 < result["mfu_vs_jax_matmul"] < 1.5, result


@pytest.mark.slow
def test_bench_ppo_splits_an_iteration_and_never_recompiles(tmp_path):
    """Prompts of sort and lookup differ in length from iteration to iteration; the sampler and the update compile
    once all the same (prompts are padded to ppo.max_prompt_len)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "bench.json"
    args = ["--config=configs/ppo.py:model=tiny,algorithm=grpo", "--config.ppo.reward=tasks", "--config.batch_size=8",
            "--config.ppo.group_size=2", "--config.ppo.max_new_tokens=8", "--steps=3", f"--out={out}"]
    run = subprocess.run([sys.executable, "-m", "llmjax.bench", "ppo", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["longest_prompts_seen"]) > 1, result
    assert result["sampler_compiles"] == 1 and result["update_compiles"] == 1, result
    assert result["generate_tokens_per_s"] > 0 and result["update_tokens_per_s"] > 0
    shares = [result[f"{name}_share"] for name in ("generate", "score_reference_advantages", "update")]
    assert sum(shares) == pytest.approx(1.0)
