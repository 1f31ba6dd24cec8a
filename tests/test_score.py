"""Scoring texts with a reward run: the CLI reads {"prompt", "response"} lines and writes each with its score;
a bad line, or a text too long for the model, is refused naming the line."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import reward_config, saved_run

from llmjax import score
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError


@pytest.mark.slow  # a subprocess CLI
def test_score_cli(tmp_path):
    rm_dir = str(tmp_path / "rm")
    saved_run(reward_config(), rm_dir)  # untrained: the CLI's plumbing, not the model's judgement
    prompt = "sort: dcba"
    lines = tmp_path / "in.jsonl"
    lines.write_text("\n".join(json.dumps({"prompt": prompt, "response": r}) for r in ("abcd", "abdc")) + "\n")
    out = subprocess.run([sys.executable, "-m", "llmjax.score", f"--workdir={rm_dir}", f"--input={lines}",
                          f"--output={tmp_path / 'out.jsonl'}"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["response"] for r in rows] == ["abcd", "abdc"] and all(np.isfinite(r["score"]) for r in rows)
    assert "abcd" in out.stdout


@pytest.mark.parametrize("text, message", [
    (None, r"^--input='.*in\.jsonl' does not exist; pass a \.jsonl file"),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n', r"in\.jsonl:3: not valid JSON \("),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', r'in\.jsonl:2: not a JSON object with string "prompt" '),
    ('["prompt", "response"]\n', r'in\.jsonl:1: not a JSON object'),
    ("\n\n", r"holds no lines"),
])
def test_bad_input_lines_are_refused_naming_the_line(tmp_path, text, message):
    path = tmp_path / "in.jsonl"
    if text is not None:
        path.write_text(text)
    with pytest.raises(LlmjaxError, match=message):
        score.read_input(str(path))


def test_a_text_longer_than_the_reward_models_context_is_refused():
    cfg = reward_config()
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    ids, _ = score.render(cfg, tokenizer, "sort 21 = ", "12", "in.jsonl:1")
    assert len(ids) < 20
    with pytest.raises(LlmjaxError, match=r"^in.jsonl:2: the prompt and response take 314 tokens, more than the reward "
                                          r"model's max_seq_len=256; shorten the response"):
        score.render(cfg, tokenizer, "sort 21 = ", "1" * 300, "in.jsonl:2")


def test_agreement_counts_correct_over_wrong_pairs_within_a_prompt():
    """Prompt a: 3 beats 1 and 2; b: a tie counts half; c: no wrong answer, no pair. Across prompts the correct 3
    would lose to b's wrong 5, but answers to different prompts are never compared."""
    scores = np.array([3.0, 1.0, 2.0, 5.0, 5.0, 0.0, 1.0])
    correct = np.array([1, 0, 0, 1, 0, 1, 1])
    groups = np.array(["a", "a", "a", "b", "b", "c", "c"])
    assert score.agreement(scores, correct, groups) == (2.5 / 3, 3)
    assert score.agreement(scores[:3].reshape(1, 3), correct[:3].reshape(1, 3), [[0, 0, 0]]) == (1.0, 2)  # any shape
    fraction, pairs = score.agreement(scores[5:], correct[5:], groups[5:])
    assert np.isnan(fraction) and pairs == 0
