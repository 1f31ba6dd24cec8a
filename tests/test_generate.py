"""Completions from a run's checkpoint: the CLI prints each prompt with its completion, and a reward run refuses."""

import os
import subprocess
import sys

import pytest

from llmjax import generate
from llmjax.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_cli(sft_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "llmjax.generate", f"--workdir={sft_dir}", "--prompt=sort 321 = ",
                          "--max_new_tokens=8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sort 321 = \u2192 '"), out.stdout


def test_a_reward_model_does_not_generate(rm_dir):
    with pytest.raises(ConfigError, match="holds a reward model, which scores text but does not write it"):
        generate.complete(rm_dir, ["sort 21 = "])
