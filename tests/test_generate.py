"""Completions from a run's checkpoint: the CLI prints each prompt with its completion; a reward run and a prompt
too long for the model are refused."""

import os
import subprocess
import sys

import pytest
from helpers import reward_config

from llmjax import config, generate, runs
from llmjax.errors import LlmjaxError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_cli(sft_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "llmjax.generate", f"--workdir={sft_dir}", "--prompt=sort 321 = ",
                          "--max_new_tokens=8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sort 321 = \u2192 '"), out.stdout


def test_a_reward_model_does_not_generate(tmp_path):
    runs.claim_workdir(str(tmp_path), reward_config(), {"scorer": ()}, "reward")  # what generate reads first
    with pytest.raises(LlmjaxError, match="holds a reward model, which scores text but does not write it"):
        generate.complete(str(tmp_path), ["sort 21 = "])


@pytest.fixture
def config_only_run(tmp_path):
    """A workdir holding only a tiny pretraining run's config.json and parts.json: enough for every check made
    before the checkpoint is read."""
    runs.claim_workdir(str(tmp_path), config.base("tiny"), {"lm": ()}, "pretrain")
    return str(tmp_path)


def test_a_prompt_longer_than_the_context_is_refused(config_only_run):
    """Positions past model.max_seq_len were never trained (a learned table has none): refused before the
    checkpoint is read, not answered with noise."""
    with pytest.raises(LlmjaxError, match=r"^prompt 2 \('9999.*\.\.\.'\) takes 201 tokens; with max_new_tokens=64 it "
                                          r"exceeds the model's max_seq_len=256; shorten the prompt or lower "):
        generate.complete(config_only_run, ["sort 21 = ", "9" * 200])
    with pytest.raises(LlmjaxError, match="max_new_tokens=0, .* need max_new_tokens >= 1"):
        generate.complete(config_only_run, ["sort 21 = "], max_new_tokens=0)
