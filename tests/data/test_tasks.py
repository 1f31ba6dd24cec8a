import numpy as np
import pytest

from llmjax.data import tasks

N = 200


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_checker_accepts_answer_and_rejects_near_misses(name):
    task = tasks.TASKS[name]
    rng = np.random.default_rng(0)
    for _ in range(N):
        ex = task.generate(rng)
        assert ex.task == name and ex.text == ex.prompt + ex.answer
        assert ex.prompt.startswith(name + " ") and ex.prompt.endswith(" = ")
        assert "\n" not in ex.text and 10 <= len(ex.text) <= 40
        assert task.check(ex.prompt, ex.answer)
        assert task.check(ex.prompt, f" {ex.answer}\n")
        assert not task.check(ex.prompt, ex.answer + "x")
        assert not task.check(ex.prompt, "")
        wrong = tasks.corrupt(ex, rng)
        assert len(wrong) == len(ex.answer) and not task.check(ex.prompt, wrong)


def test_answers_are_recomputed_from_the_prompt():
    check = {name: task.check for name, task in tasks.TASKS.items()}
    assert check["reverse"]("reverse abcd = ", "dcba")
    assert check["copy"]("copy abcd = ", "abcd")
    assert check["add"]("add 12 + 345 = ", "357")
    assert not check["add"]("add 12 + 345 = ", "0357")
    assert check["sort"]("sort 5391 = ", "1359")
    assert check["lookup"]("lookup a=1 b=7 c=3 ? b = ", "7")
    with pytest.raises(ValueError, match="add"):
        check["add"]("reverse abcd = ", "dcba")


def test_corrupt_never_leads_a_sum_with_zero():
    rng = np.random.default_rng(1)
    for _ in range(N):
        ex = tasks.TASKS["add"].generate(rng)
        wrong = tasks.corrupt(ex, rng)
        assert len(wrong) == 1 or not wrong.startswith("0")


def test_sample_is_deterministic_and_covers_the_named_tasks():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [tasks.sample(rng, ["add", "sort"]) for _ in range(50)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert {ex.task for ex in draw(3)} == {"add", "sort"}


@pytest.mark.parametrize("names", [["reverse", "bogus"], []])
def test_bad_task_names_raise(names):
    with pytest.raises(ValueError, match="bogus" if names else "non-empty") as err:
        tasks.sample(np.random.default_rng(0), names)
    assert "reverse" in str(err.value) and "lookup" in str(err.value)
