"""Evaluation: pass@k is Chen et al.'s unbiased estimator; the CLI writes a checkpoint's perplexity, per-task greedy
accuracy and pass@k to the run's eval JSON."""

import itertools
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import one_device, prompts_file, tiny_config

from llmjax import evaluate
from llmjax.data import prompts, tasks
from llmjax.data.tokenizer import ByteTokenizer
from llmjax.evaluate import check, ks, pass_at_k
from llmjax.models import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("marks", ["0000", "1000", "0110", "1111", "10010000", "0000000000000001", "1" * 5 + "0" * 15])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_answer(marks):
    """On constructed samples: the estimator equals the fraction of all k-subsets of the n answers that hold at
    least one correct one (what it estimates without bias), and 1 - C(n-c, k) / C(n, k) in float64."""
    n, c = len(marks), marks.count("1")
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(marks, k))
        share = sum("1" in s for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(share, abs=1e-12)
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_is_stable_where_the_binomials_overflow():
    n, c = 2000, 3
    assert pass_at_k(n, c, 100) == pytest.approx(1 - np.prod([1 - 100 / i for i in range(n - c + 1, n + 1)]))
    assert 0 < pass_at_k(n, c, 100) < 1


def test_reported_ks_and_checks():
    assert ks(1) == [1] and ks(8) == [1, 2, 4, 8] and ks(10) == [1, 2, 4, 8, 10]
    assert check({"prompt": "sort dcba = ", "task": "sort"}, "abcd") is True
    assert check({"prompt": "2 apples and 3 more?", "answer": "5"}, "It is \\boxed{5}.") is True
    assert check({"prompt": "2 apples and 3 more?", "answer": 5}, "6") is False
    assert check({"prompt": "say hi"}, "hi") is None


def test_evaluate_cli(sft_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "llmjax.evaluate", f"--workdir={sft_dir}", "--n=8", "--samples=4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with open(os.path.join(sft_dir, "eval_chat_pass4.json")) as f:
        result = json.load(f)
    passes = [f"pass@{k}" for k in (1, 2, 4)]
    assert set(result) == {"perplexity", "accuracy", "accuracy/sort", *passes, *(f"{p}/sort" for p in passes)}
    assert result["pass@1"] <= result["pass@2"] <= result["pass@4"] <= 1
    assert result["pass@4"] > 0  # the SFT model answers some sort prompts


def test_evaluate_cli_on_another_source(sft_dir, tmp_path):
    """--source asks another source's held-out prompts: an SFT run on prompt records it never trained on."""
    source = prompts_file(tmp_path / "problems.jsonl", 40)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "llmjax.evaluate", f"--workdir={sft_dir}", "--n=4",
                          f"--source={source}", "--tasks=reverse", "--validation=0.5",
                          f"--data_dir={tmp_path / 'tfds'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with open(os.path.join(sft_dir, "eval_chat.json")) as f:
        result = json.load(f)
    assert set(result) == {"accuracy", "accuracy/reverse", "accuracy/problems"}  # prompts: no perplexity


def test_long_range_accuracy_is_reported_by_distance(monkeypatch):
    """With a stand-in sampler that gives the key exactly where it ends fewer than 200 tokens before the question,
    each octave's accuracy is the share of its prompts that near; a short task gets no buckets. In the chat format
    the same prompts are asked alike, and held-out rows too short to score an answer report no perplexity."""
    tok, cfg = ByteTokenizer(), tiny_config(**{"data.tasks": "passkey_600,sort", "data.tokenizer": "byte"})

    def sampler(model, *, max_new_tokens, eos_id, **_):
        def generate(params, ids_BP, lengths_B, key):
            answers = []
            for ids in ids_BP:
                prompt = tok.decode(ids)
                near = prompt.startswith("passkey") and tasks.get("passkey").distance(prompt) < 200
                answers.append(tok.encode(re.search(r"\d{5}", prompt)[0] if near else "0", eos=True))
            return {"tokens": [np.array(a) for a in answers], "lengths": [len(a) for a in answers]}
        return generate

    monkeypatch.setattr(evaluate.sampling, "sampler", sampler)
    params = transformer.init(cfg.model, jax.random.key(0))
    metrics = evaluate.make_evaluator(cfg, one_device(), n=40, batches=1)(params)
    distances = np.array([tasks.get(r["task"]).distance(r["prompt"])
                          for r in prompts.held_out(cfg, 40)["passkey_600"]])
    assert evaluate.bucket(4) == "d0-127" and evaluate.bucket(128) == "d128-255" and evaluate.bucket(575) == "d512-1023"
    buckets = {"d0-127": (0, 128), "d128-255": (128, 256), "d256-511": (256, 512), "d512-1023": (512, 1024)}
    assert {k for k in metrics if k.startswith("accuracy/")} == {
        "accuracy/sort", "accuracy/passkey_600", *(f"accuracy/passkey_600/{b}" for b in buckets)}
    for name, (low, high) in buckets.items():
        inside = (distances >= low) & (distances < high)
        assert metrics[f"accuracy/passkey_600/{name}"] == pytest.approx(np.mean(distances[inside] < 200))
    assert metrics["accuracy/passkey_600"] == pytest.approx(np.mean(distances < 200)) and metrics["accuracy/sort"] == 0
    cfg.data.update(tasks="passkey_600", format="chat")  # rows of 64 tokens hold no answer: no perplexity, no error
    chat = evaluate.make_evaluator(cfg, one_device(), n=40, batches=1)(params)
    assert "perplexity" not in chat and chat["accuracy/passkey_600"] == metrics["accuracy/passkey_600"]
