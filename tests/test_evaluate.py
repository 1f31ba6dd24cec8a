"""Standalone evaluation: the CLI writes a checkpoint's perplexity and per-task accuracy to the run's eval JSON."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_cli(sft_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "llmjax.evaluate", f"--workdir={sft_dir}", "--n=8"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with open(os.path.join(sft_dir, "eval_chat.json")) as f:
        result = json.load(f)
    assert set(result) == {"perplexity", "accuracy", "accuracy/sort"}
