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
