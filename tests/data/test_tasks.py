import contextlib
import string

import numpy as np
import pytest

from llmjax.data import tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError

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


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_permute_rearranges_the_right_answers_own_material(name):
    """Same characters (lookup: another value of the table), wrong, never a zero in front of a number; the task's
    typical mistake about half the time; another prompt's answer only where no rearrangement differs."""
    task, rng = tasks.TASKS[name], np.random.default_rng(2)
    mistakes = 0
    for _ in range(N):
        ex = task.generate(rng)
        wrong = tasks.permute(ex, rng)
        assert wrong != ex.answer and not task.check(ex.prompt, wrong)
        operands = ex.prompt[len(name) + 1 : -3]
        mistakes += wrong in task.mistakes(operands)
        if name == "lookup":
            values = [pair.split("=")[1] for pair in operands.split(" ? ")[0].split()]
            assert wrong in values or set(values) == {ex.answer}
        elif len(set(ex.answer) - {"0"} if name == "add" else set(ex.answer)) > 1:  # a rearrangement exists
            assert sorted(wrong) == sorted(ex.answer) and not (name == "add" and wrong.startswith("0"))
    expected = {"add": 0, "lookup": N}.get(name, N / 2)
    assert abs(mistakes - expected) <= 0.15 * N, mistakes


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_neighbour_is_the_right_answer_to_a_prompt_one_character_away(name):
    task, rng = tasks.TASKS[name], np.random.default_rng(3)
    for _ in range(50):
        ex = task.generate(rng)
        wrong = tasks.neighbour(ex, rng)
        assert wrong != ex.answer and not task.check(ex.prompt, wrong)
        operands = ex.prompt[len(name) + 1 : -3]
        neighbours = set()
        for i, c in enumerate(operands):
            for new in (string.digits if c.isdigit() else string.ascii_lowercase) if c.isalnum() else ():
                with contextlib.suppress(KeyError):  # lookup's query changed to a key its table lacks
                    neighbours.add(task.solve(operands[:i] + new + operands[i + 1:]))
        assert wrong in neighbours
        if name == "sort":  # ascending and as long as the right answer: only its digits tell them apart
            assert list(wrong) == sorted(wrong) and len(wrong) == len(ex.answer)


@pytest.mark.parametrize("kinds, message", [
    ("corrupt,bogus", r"^reward.negatives='corrupt,bogus' names unknown kinds \['bogus'\]; give some of "
                      r"corrupt,permute,neighbour, comma-separated$"),
    ("", r"names unknown kinds \[''\]"),
    ("permute,permute", r"^reward.negatives='permute,permute' names a kind twice; give some of"),
])
def test_bad_negative_kinds_are_refused(kinds, message):
    with pytest.raises(LlmjaxError, match=message):
        tasks.check_negatives("reward.negatives", kinds)
    tasks.check_negatives("reward.negatives", "neighbour,corrupt")


@pytest.mark.parametrize("length, digits", [(29, 5), (256, 5), (1024, 5), (3000, 5), (21, 1), (1024, 2)])
def test_passkey_documents_are_as_long_as_asked_and_their_key_as_far_as_asked(length, digits):
    """Exactly `length` tokens with bos and eos (one a character); the key ends the asked distance before the
    question, by default anywhere from the least to the most the length allows; its checker reads the prompt."""
    name = f"passkey_{length}" + (f"_{digits}" if digits != 5 else "")
    task, rng, tok = tasks.get(name), np.random.default_rng(4), get_tokenizer("synthetic")
    low, high = tasks.passkey_distances(length, digits)
    assert (low, high) == (4, length - 15 - 2 * digits)
    for distance in (low, (low + high) // 2, high, None):
        ex = tasks.passkey(rng, length, distance, digits) if distance else task.generate(rng)
        assert ex.task == name and len(tok.encode(ex.text, bos=True, eos=True)) == length
        assert ex.prompt.startswith("passkey ") and ex.prompt.endswith(" = ") and f" key {ex.answer} " in ex.prompt
        assert len(ex.answer) == digits and task.distance(ex.prompt) == (distance or task.distance(ex.prompt))
        assert ex.prompt.index(f" {ex.answer} ") + 1 + digits + task.distance(ex.prompt) == len(ex.prompt)
        assert task.check(ex.prompt, ex.answer) and task.check(ex.prompt, f" {ex.answer}\n")
        for wrong in (tasks.corrupt(ex, rng), tasks.permute(ex, rng), tasks.neighbour(ex, rng), "", ex.answer + "0"):
            assert not task.check(ex.prompt, wrong)
    assert task.check("passkey ab key 01234 cd = ", "01234") and not task.check("passkey ab key 01234 cd = ", "1234")
    with pytest.raises(ValueError, match="not 3"):
        tasks.passkey(rng, length, 3, digits)
    with pytest.raises(ValueError, match="no passkey"):
        task.check("passkey ab key 0123 cd 4 = ", "0123")


def test_passkey_distances_are_uniform_and_fresh():
    rng = np.random.default_rng(5)
    examples = [tasks.get("passkey_1024").generate(rng) for _ in range(400)]
    distances = np.array([tasks.get("passkey").distance(ex.prompt) for ex in examples])  # any length's checker
    assert distances.min() < 100 and distances.max() > 900 and abs(distances.mean() - 502) < 40
    assert len({ex.answer for ex in examples}) > 390 and len({ex.prompt[8:40] for ex in examples}) == 400


@pytest.mark.parametrize("names, message", [
    ("sort,passkey_x", r"unknown tasks \['passkey_x'\]; choose from reverse,add,sort,copy,lookup,passkey_N\[_K\]$"),
    ("passkey_28", r"^data.tasks='passkey_28': task 'passkey_28': a passkey document with a 5-digit key takes at "
                   r"least 29 tokens; ask for passkey_29_5 or more$"),
    ("passkey_64_0", r"^data.tasks='passkey_64_0': task 'passkey_64_0': a passkey's key has one digit or more$"),
])
def test_bad_passkey_names_are_refused(names, message):
    with pytest.raises(LlmjaxError, match=message):
        tasks.check_names("data.tasks", names)
    tasks.check_names("data.tasks", "sort,passkey,passkey_29,passkey_21_1")
    assert tasks.get("passkey").generate(np.random.default_rng(0)).task == "passkey"
