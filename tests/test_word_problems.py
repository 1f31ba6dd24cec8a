import json
import random
import re

import pytest

from experiments.rl import word_problems
from llmjax import rewards
from llmjax.data import sources

# This test's own reading of the text: a sentence with one of these words takes its number away, any other adds it.
TAKES_AWAY = {"gives", "loses", "sells", "fewer"}


def test_same_seed_same_problems_and_a_longer_run_extends_a_shorter():
    first = word_problems.generate(300, seed=3)
    assert first == word_problems.generate(300, seed=3) and first != word_problems.generate(300, seed=4)
    assert word_problems.generate(500, seed=3)[:300] == first
    assert len({r["prompt"] for r in first}) > 290  # varied, hardly a repeat


@pytest.mark.parametrize("top", [30, 5])
def test_answers_are_the_sums_of_the_numbers_the_text_states(top):
    rng, kinds = random.Random(0), set()
    for _ in range(2000):
        text, terms = word_problems.problem(rng, top)
        assert max(terms) <= top, (text, terms)  # counts and gains; a loss is bounded by the count it takes from
        assert 2 <= len(terms) <= 3
        assert all(sum(terms[: i + 1]) >= 0 for i in range(len(terms))), (text, terms)  # no count below zero
        stated = []
        for sentence in re.split(r"(?<=[.?]) ", text):
            numbers = [int(n) for n in re.findall(r"\d+", sentence)]
            sign = -1 if TAKES_AWAY & set(sentence.rstrip(".?").split()) else 1
            stated += [sign * n for n in numbers]
        assert stated == terms, text
        kinds.add((text.rstrip("?").split()[-1], len(terms)))  # the question's last word: together, now or have
    assert len(kinds) == 5  # each template with one step and with two (a comparison's two-step question is "now")


def test_top_below_four_is_refused():
    with pytest.raises(ValueError, match="top=3: problems need numbers up to at least 4"):
        word_problems.generate(10, seed=0, top=3)


def test_math_reward_scores_the_true_answer_and_not_a_wrong_one():
    records = word_problems.generate(50, seed=1)
    prompts = [r["prompt"] for r in records]
    math = rewards.parse("math")
    for responses, expected in (([f"The answer is {r['answer']}." for r in records], 1.0),
                                ([str(int(r["answer"]) + 1) for r in records], 0.0)):
        total, _ = rewards.score(math, prompts, responses, records)
        assert total.tolist() == [expected] * len(records)


def test_files_load_as_prompts_with_their_answers_and_as_sft(tmp_path):
    path, sft_path = tmp_path / "rl" / "problems.jsonl", tmp_path / "sft.jsonl"
    word_problems.write(str(path), 40, seed=2, sft_path=str(sft_path))
    records = list(sources.load(f"files:{path}", str(tmp_path / "tfds"), "train", kind="prompts", validation=0))
    assert records == word_problems.generate(40, seed=2)
    sft = [json.loads(line) for line in sft_path.read_text().splitlines()]
    assert [{"prompt": r["prompt"], "answer": r["response"]} for r in sft] == word_problems.generate(80, seed=2)[40:]
    assert all(re.fullmatch(r"\d+", r["response"]) for r in sft)
