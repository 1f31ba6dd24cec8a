import math

import numpy as np
import pytest

from llmjax import rewards
from llmjax.data import tasks
from llmjax.errors import LlmjaxError

# Reward functions of a "user's module": this one, imported by the specs below as test_rewards:NAME (tests/ is on
# the path, setup.cfg's pythonpath).


def answer_length(prompts, responses, records):
    """The record's own fields reach the function: scores 1 where the response is as long as record["n"]."""
    return [float(len(r) == rec["n"]) for r, rec in zip(responses, records, strict=True)]


def judge(prompts, responses, records):
    for r in responses:
        if "4" in r:
            raise ValueError("boom")
    return [1.0] * len(responses)


def nan_on_empty(prompts, responses, records):
    return [math.nan if not r else 1.0 for r in responses]


def batch_only(prompts, responses, records):
    if len(responses) > 1:
        raise MemoryError("batch too large")
    return [0.0]


def too_few(prompts, responses, records):
    return [0.0] * (len(responses) - 1)


NOT_A_FUNCTION = 3


def one(spec, **kw):
    [term] = rewards.parse(spec, **kw)
    return term


def test_each_form_parses_with_its_name_and_weight(tmp_path):
    run = str(tmp_path / "rm")
    (tmp_path / "rm").mkdir()
    terms = rewards.parse(f"math,format:<answer>.*</answer>:0.1,exact:-2,tasks:1e-1,test_rewards:judge:3,{run}:0.5")
    assert [(t.name, t.weight) for t in terms] == [("math", 1.0), ("format:<answer>.*</answer>", 0.1), ("exact", -2.0),
                                                   ("tasks", 0.1), ("test_rewards:judge", 3.0), (run, 0.5)]
    assert [t.run for t in terms] == [None] * 5 + [run] and terms[-1].fn is None
    assert terms[4].fn([], [], []) == []  # the function itself, imported
    # A list (as a config file gives) keeps commas inside a regex; a regex with colons keeps them.
    regex, plain = rewards.parse(["format:^a{1,3}:b$:2", " math "])
    assert (regex.name, regex.weight, plain.name) == ("format:^a{1,3}:b$", 2.0, "math")
    assert regex.fn([""] * 3, ["aa:b", "aaaa:b", "a:bc"], [{}] * 3) == [1.0, 0.0, 0.0]
    assert one("runs/rm") == ("runs/rm", 1.0, None, "runs/rm")  # not checked here: the caller does
    assert one("gs://bucket/rm:2") == ("gs://bucket/rm", 2.0, None, "gs://bucket/rm")


@pytest.mark.parametrize("spec, message", [
    ("", r"^ppo.reward='' has an empty or non-string term; name one or more"),
    ("math,,exact", "has an empty or non-string term"),
    ([], "has an empty or non-string term"),
    (["math", 3], "has an empty or non-string term"),
    (None, "has an empty or non-string term"),
    ("math:nan", r"reward 'math:nan' has weight 'nan'; give a finite number"),
    ("exact:inf", "give a finite number"),
    (":2", "has no kind before its weight"),
    ("math:x", r"'math:x': math takes no argument \(write math or math:WEIGHT\)"),
    ("format:", r"has no regex; write format:REGEX"),
    ("format:(ab", r"reward 'format:\(ab': the regex '\(ab' does not compile \(missing \), unterminated subpattern"),
    ("math,format:[a", r"does not compile .*\(a regex with a comma must be given as a list of terms, e\.g\."),
    ("format:a{1,3},math", r"'3}' after a format: term is neither .*a regex with a comma must be given as a list"),
    ("no_such_module_xyz:f", r"reward 'no_such_module_xyz:f': no module 'no_such_module_xyz'; put its folder on "
                             "PYTHONPATH or fix the name"),
    ("test_rewards:missing", r"'missing' is not defined in test_rewards; name a function fn\(prompts, responses, "),
    ("test_rewards:NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not a function"),
    ("a/rm,b/rm", r"has 2 reward-model runs \(a/rm, b/rm\); at most one"),
    ("math,math:2", "names a reward twice"),
])
def test_bad_specs_are_one_config_error_naming_the_key(spec, message):
    with pytest.raises(LlmjaxError, match=message) as e:
        rewards.parse(spec, "ppo.reward")
    assert "ppo.reward" in str(e.value) and "\n" not in str(e.value)


def test_the_key_named_is_the_callers():
    with pytest.raises(LlmjaxError, match=r"^eval.reward: reward 'math:x'"):
        rewards.parse("math:x", key="eval.reward")


@pytest.mark.parametrize("response, answer, expected", [
    ("The answer is \\boxed{1000}.", 1000, 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("so it is 1,000.", "1000.0", 1.0),
    ("It costs $1,000.", 1000, 1.0),
    ("\\boxed{1000.0}", "$1,000", 1.0),
    ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\dfrac{6}{8}}", "3/4", 1.0),
    ("about 3/4 of them", 0.75, 1.0),
    ("\\boxed{{x}^{2}} and then 7", "{x}^{2}", 1.0),  # nested braces; the box wins over a later number
    ("first \\boxed{1} then \\boxed{2}", 2, 1.0),  # the last box
    ("\\boxed{5} then \\boxed{unclosed", 5, 1.0),  # the last complete box
    ("12 apples, then 7 more: 19", "19", 1.0),  # the last number
    ("she has -3 left", -3, 1.0),
    ("10-5=5", 5, 1.0),
    ("0.1 of it", 0.1, 1.0),
    ("\\boxed{ Paris. }", "paris", 1.0),  # text: stripped, casefolded, a trailing period dropped
    ("\\boxed{New   York}", "new york", 1.0),
    ("19", "20", 0.0),
    ("nineteen apples", "19", 0.0),  # words only: compared as text
    (" Abcd ", "abcd", 1.0),  # a text answer (no number): the whole response, normalised
    ("\\boxed{1e3}", 1000, 0.0),  # scientific notation is text
    ("1e3", 1, 1.0),  # ... and in a response only its 1 is a number
    ("1,2,3", "123", 0.0),
    ("x = 1/0", "1/0", 1.0),  # not a number: compared as text
])
def test_math_compares_final_answers_as_numbers(response, answer, expected):
    assert one("math").fn(["p"], [response], [{"prompt": "p", "answer": answer}]) == [expected]


def test_extract_answer_and_same_answer():
    assert rewards.extract_answer("\\boxed{a{b{c}}d} 4") == "a{b{c}}d"
    assert rewards.extract_answer("no number here") == "no number here"
    assert rewards.same_answer("1,000", 1000) and rewards.same_answer(" -1.50 ", "-3/2")
    assert not rewards.same_answer("1,00", 100) and not rewards.same_answer("9" * 5000, "9" * 4999)


def test_exact_format_and_tasks():
    exact = one("exact").fn(["p"] * 3, [" 12\n", "12.0", "012"], [{"answer": 12}] * 3)
    assert exact == [1.0, 0.0, 0.0]
    fmt = one(r"format:<answer>\d+</answer>")
    assert fmt.fn(["p"] * 2, ["x\n<answer>5</answer>", "<answer>five</answer>"], [{}] * 2) == [1.0, 0.0]
    example = tasks.TASKS["sort"].generate(np.random.default_rng(0))
    record = {"prompt": example.prompt, "answer": example.answer, "task": "sort"}
    assert one("tasks").fn([example.prompt] * 2, [example.answer, "x"], [record] * 2) == [1.0, 0.0]


def test_a_checker_missing_its_field_says_how_to_fix_it():
    for spec, field in (("tasks", "task"), ("math", "answer"), ("exact", "answer")):
        with pytest.raises(rewards.RewardError, match=rf"^reward '{spec}' reads each prompt record's '{field}', and "
                                                      r"record 1 \(prompt 'q'\) has none; give the prompts file"):
            records = [{"prompt": "p", field: "sort"}, {"prompt": "q"}]
            rewards.score(rewards.parse(spec), ["p", "q"], ["1", "2"], records)


def test_score_is_the_weighted_sum_with_each_terms_own_scores():
    terms = rewards.parse(["math", "format:^\\d+$:0.5", "test_rewards:answer_length:-1", "runs/rm:0.25"])
    responses = ["19", "it is 19", "20"]
    records = [{"prompt": "p", "answer": "19", "n": n} for n in (2, 8, 0)]
    total, raw = rewards.score(terms, ["p"] * 3, responses, records, model_scores=np.array([4.0, -4.0, 0.0]))
    assert raw["math"].tolist() == [1, 1, 0] and raw["format:^\\d+$"].tolist() == [1, 0, 1]
    assert raw["test_rewards:answer_length"].tolist() == [1, 1, 0] and raw["runs/rm"].tolist() == [4, -4, 0]
    assert total.dtype == np.float32 and total.tolist() == [1.5, -1.0, 0.5]
    with pytest.raises(ValueError, match="model_scores are the reward-model term's"):
        rewards.score(terms, ["p"] * 3, responses, records)


@pytest.mark.parametrize("spec, responses, message", [
    ("test_rewards:judge", ["1", "2", "3", "The answer is 4" + " and more" * 20],
     r"^reward 'test_rewards:judge' raised ValueError\('boom'\) on response 3 'The answer is 4 and more.*\.\.\.'$"),
    ("test_rewards:nan_on_empty", ["a", "b", "", "c"], r"^reward 'test_rewards:nan_on_empty' returned nan for "
                                                       r"response 2 ''$"),
    ("test_rewards:batch_only", ["a", "b"], r"^reward 'test_rewards:batch_only' raised MemoryError\('batch too "
                                            r"large'\) on the batch of 2 responses \(on each alone it does not\)$"),
    ("test_rewards:too_few", ["a", "b"], r"^reward 'test_rewards:too_few' returned 1 scores for 2 responses"),
    ("runs/rm", ["a", "b\nc"], r"^reward 'runs/rm' returned inf for response 1 'b\\nc'$"),
])
def test_failing_rewards_name_the_term_and_the_response_in_one_line(spec, responses, message):
    n = len(responses)
    model_scores = np.array([0.0, np.inf]) if spec == "runs/rm" else None
    with pytest.raises(rewards.RewardError, match=message) as e:
        rewards.score(rewards.parse(spec), ["p"] * n, responses, [{"prompt": "p"}] * n, model_scores)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_a_weighted_sum_that_overflows_is_refused():
    terms = rewards.parse("runs/rm:1e30")
    with pytest.raises(rewards.RewardError, match="overflows float32 for response 0 'a'"):
        rewards.score(terms, ["p"], ["a"], [{}], model_scores=np.array([1e10]))
