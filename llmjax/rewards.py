"""Rewards for PPO / GRPO as a plug: a spec such as ppo.reward="math,format:<answer>.*</answer>:0.1" names weighted
terms, each scoring a batch of responses to prompt records (dicts with "prompt" and any other fields):

    fn(prompts: list[str], responses: list[str], records: list[dict]) -> Sequence[float]  # one score a response

A term is KIND[:ARG][:WEIGHT], a trailing `:<float>` being its weight (1.0 if none; so a regex that itself ends in
`:<number>` needs a weight after it). Kinds:
    tasks           1 if the synthetic task of record["task"] (llmjax.data.tasks) accepts the response, else 0
    math            1 if the response's final answer (`extract_answer`) is `same_answer` as record["answer"]
    exact           1 if the response, stripped, is str(record["answer"]), stripped
    format:REGEX    1 if REGEX matches anywhere in the response (re.search, with re.DOTALL)
    MODULE:FUNC     a function of yours, imported when the spec is parsed (e.g. mypkg.rewards:length)
    anything else   a reward model's run directory, which the caller scores on device (at most one such term)
Several terms are comma-separated, or a list of term strings in a config file (the form a regex with a comma needs).

Numbers in `same_answer`: integers, decimals, fractions a/b and \\frac{a}{b} are compared as exact rationals, after
dropping "$", spaces, thousands commas (groups of three digits) and a trailing period, so "1,000", "1000.0",
"$1000." and "\\boxed{1000}" all answer 1000. Scientific notation is not a number: models asked for an integer
write one out, and an exponent from a sampled response could make a rational of any size. "1e3" is compared as text
(it is not 1000), and read in a response its last number is the 1 (an "e3" is no number).
"""

import importlib
import math
import os
import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

from llmjax.data import tasks
from llmjax.errors import LlmjaxError

RewardFn = Callable[[list[str], list[str], list[dict]], Sequence[float]]
CHECKERS = ("tasks", "math", "exact")  # the kinds that verify an answer rather than judge it

_FUNCTION = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")  # module.path:function
_BOXED = re.compile(r"\\boxed\s*\{")
# A number not glued to a word or decimal point before it (the 3 of "x3" or "1e3" is no number): thousands-grouped
# or plain digits, an optional decimal part, an optional /denominator.
_NUMBER = re.compile(r"(?<![\w.])-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:/[0-9]+)?")
_RATIONAL = re.compile(r"([-+]?)(?:([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:/([0-9]+))?|\\[dt]?frac\{([0-9]+)\}\{([0-9]+)\})")
_THOUSANDS = re.compile(r"[-+]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")


class RewardError(RuntimeError):
    """A reward function failed on a batch: one line naming the term and the response it failed on."""


class Term(NamedTuple):
    """One weighted reward: a function (`fn`), or a reward model's run directory (`run`) the caller scores."""

    name: str  # the spec without its weight: the metric reward/<name>
    weight: float
    fn: RewardFn | None
    run: str | None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(response: str) -> str:
    """A response as one short line for an error message."""
    return repr(_cut(response, 80))


def extract_answer(response: str) -> str:
    """The final answer a response gives: the content of its last complete \\boxed{...} (braces inside it nested),
    else its last number (as written, e.g. "1,000" or "3/4"), else the whole response (a text answer, e.g. a word
    or a sorted string)."""
    for start in reversed([m.end() for m in _BOXED.finditer(response)]):
        depth = 1
        for i in range(start, len(response)):
            depth += {"{": 1, "}": -1}.get(response[i], 0)
            if depth == 0:
                return response[start:i]
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else response


def _text(answer: Any) -> str:
    """An answer as text with "$", a trailing period and runs of whitespace gone, casefolded."""
    text = " ".join(str(answer).replace("\\$", "").replace("$", "").split()).rstrip(".").strip()
    return text.casefold()


def _rational(answer: Any) -> Fraction | None:
    """An answer's value as an exact rational, or None if it is not a number `same_answer` reads."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        return Fraction(answer)
    if isinstance(answer, float):
        return Fraction(repr(answer)) if math.isfinite(answer) else None  # repr: 0.1 is 1/10, not its binary value
    text = _text(answer).replace(" ", "")
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    m = _RATIONAL.fullmatch(text)
    if not m:
        return None
    sign, number, denominator, top, bottom = m.groups()
    try:
        value = Fraction(number) / int(denominator or 1) if number else Fraction(int(top), int(bottom))
    except (ValueError, ZeroDivisionError):  # a zero denominator, or more digits than int() reads
        return None
    return -value if sign == "-" else value


def same_answer(a: Any, b: Any) -> bool:
    """Whether two answers (str or number) agree: as exact rationals when both are numbers, else as text
    (stripped, casefolded, whitespace collapsed)."""
    x, y = _rational(a), _rational(b)
    if x is not None and y is not None:
        return x == y
    return _text(a) == _text(b)


def _field(record: dict, field: str, index: int, kind: str) -> Any:
    if field not in record:
        raise RewardError(f"reward {kind!r} reads each prompt record's {field!r}, and record {index} (prompt "
                          f"{_show(record.get('prompt', ''))}) has none; give the prompts file that field, or "
                          "choose a reward that needs none (format:REGEX, a function, a reward model)")
    return record[field]


def _tasks(prompts: list[str], responses: list[str], records: list[dict]) -> list[float]:
    names = [_field(record, "task", i, "tasks") for i, record in enumerate(records)]  # all checked before any runs
    checks = []
    for i, name in enumerate(names):
        try:
            checks.append(tasks.get(name).check)
        except LlmjaxError:
            raise RewardError(f"reward 'tasks': record {i} has task {name!r}, not one of {tasks.NAMES}") from None
    return [float(check(prompt, response)) for check, prompt, response in zip(checks, prompts, responses, strict=True)]


def _math(prompts: list[str], responses: list[str], records: list[dict]) -> list[float]:
    del prompts
    out = []
    for i, (response, record) in enumerate(zip(responses, records, strict=True)):
        out.append(float(same_answer(extract_answer(response), _field(record, "answer", i, "math"))))
    return out


def _exact(prompts: list[str], responses: list[str], records: list[dict]) -> list[float]:
    del prompts
    return [float(response.strip() == str(_field(record, "answer", i, "exact")).strip())
            for i, (response, record) in enumerate(zip(responses, records, strict=True))]


def _format(pattern: re.Pattern) -> RewardFn:
    def matches(prompts: list[str], responses: list[str], records: list[dict]) -> list[float]:
        del prompts, records
        return [float(pattern.search(response) is not None) for response in responses]

    return matches


def _import(name: str, key: str) -> RewardFn:
    module_name, attribute = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise LlmjaxError(f"{key}: reward {name!r}: no module {e.name!r}; put its folder on PYTHONPATH or fix "
                              "the name (a reward function is module.path:function)") from None
        raise LlmjaxError(f"{key}: reward {name!r}: importing {module_name!r} failed: {e}") from None
    except Exception as e:  # the user's module is broken: report it in one line
        raise LlmjaxError(f"{key}: reward {name!r}: importing {module_name!r} raised {e!r}") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        what = "is not defined" if fn is None else f"is a {type(fn).__name__}, not a function"
        raise LlmjaxError(f"{key}: reward {name!r}: {attribute!r} {what} in {module_name}; name a function "
                          "fn(prompts, responses, records) -> one score a response")
    return fn


def _term(text: str, key: str) -> Term:
    """One term of a spec."""
    name, weight = text, 1.0
    head, colon, tail = text.rpartition(":")
    if colon:
        try:
            weight = float(tail)
        except ValueError:
            pass
        else:
            if not math.isfinite(weight):
                raise LlmjaxError(f"{key}: reward {text!r} has weight {tail!r}; give a finite number")
            name = head
    if not name:
        raise LlmjaxError(f"{key}: reward {text!r} has no kind before its weight")
    kind, colon, arg = name.partition(":")
    if kind in CHECKERS:
        if colon:
            raise LlmjaxError(f"{key}: reward {name!r}: {kind} takes no argument (write {kind} or {kind}:WEIGHT)")
        return Term(name, weight, {"tasks": _tasks, "math": _math, "exact": _exact}[kind], None)
    if kind == "format":
        if not arg:
            raise LlmjaxError(f"{key}: reward {name!r} has no regex; write format:REGEX")
        try:
            return Term(name, weight, _format(re.compile(arg, re.DOTALL)), None)
        except re.error as e:
            raise LlmjaxError(f"{key}: reward {name!r}: the regex {arg!r} does not compile ({e})") from None
    if _FUNCTION.fullmatch(name) and not os.path.isdir(name):
        return Term(name, weight, _import(name, key), None)
    return Term(name, weight, None, name)


def parse(spec: str | Sequence[str], key: str = "reward") -> list[Term]:
    """The terms of a reward spec (see the module docstring); `key` names the config key in errors."""
    split = isinstance(spec, str)
    pieces = spec.split(",") if split else list(spec) if isinstance(spec, list | tuple) else [spec]
    if not pieces or not all(isinstance(p, str) and p.strip() for p in pieces):
        raise LlmjaxError(f"{key}={spec!r} has an empty or non-string term; name one or more rewards, e.g. "
                          f"{key}=math or {key}=math,format:REGEX:0.1")
    hint = (f" (a regex with a comma must be given as a list of terms, e.g. {key}=['format:a{{1,3}}', 'math'])"
            if split and len(pieces) > 1 else "")
    terms = []
    for piece in pieces:
        try:
            term = _term(piece.strip(), key)
        except LlmjaxError as e:
            raise LlmjaxError(f"{e}{hint}") from None
        if hint and term.run and not os.path.isdir(term.run) and terms and terms[-1].name.startswith("format:"):
            raise LlmjaxError(f"{key}: reward {term.name!r} after a format: term is neither a reward kind nor an "
                              f"existing directory{hint}")
        terms.append(term)
    names = [t.name for t in terms]
    if len(set(names)) < len(names):
        raise LlmjaxError(f"{key}={spec!r} names a reward twice; give each once, with its weight")
    runs = [t.name for t in terms if t.run]
    if len(runs) > 1:
        raise LlmjaxError(f"{key}={spec!r} has {len(runs)} reward-model runs ({', '.join(runs)}); at most one is "
                          "scored (or each term is a kind, a module:function, or the one run directory)")
    return terms


def _values(term: Term, out: Any, responses: Sequence[str]) -> np.ndarray:
    """A term's scores as float64 [B], or a RewardError saying what is wrong with them."""
    try:
        values = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        raise RewardError(f"reward {term.name!r} returned {type(out).__name__} that is not numbers ({e})") from None
    if values.shape != (len(responses),):
        got = f"shape {values.shape}" if values.ndim != 1 else f"{len(values)} scores"
        raise RewardError(f"reward {term.name!r} returned {got} for {len(responses)} responses; return one score "
                          "a response")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise RewardError(f"reward {term.name!r} returned {values[i]} for response {i} {_show(responses[i])}")
    return values


def _call(term: Term, prompts: list[str], responses: list[str], records: list[dict]) -> np.ndarray:
    """The term's scores; when the function raises, one RewardError naming the first response it raises on alone."""
    try:
        return _values(term, term.fn(prompts, responses, records), responses)
    except RewardError:
        raise
    except Exception as batch_error:
        for i, one in enumerate(zip(prompts, responses, records, strict=True)):
            try:
                term.fn(*([x] for x in one))
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"reward {term.name!r} raised {_cut(repr(e), 200)} on response {i} "
                                  f"{_show(responses[i])}") from e
        raise RewardError(f"reward {term.name!r} raised {_cut(repr(batch_error), 200)} on the batch of "
                          f"{len(responses)} responses (on each alone it does not)") from batch_error


def score(terms: Sequence[Term], prompts: Sequence[str], responses: Sequence[str], records: Sequence[dict],
          model_scores: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The weighted sum of the terms' scores (float32 [B]) and each term's own scores (float64 [B], by name);
    `model_scores` are the reward model's, for its term. Raises RewardError rather than return a non-finite score."""
    prompts, responses, records = list(prompts), list(responses), list(records)
    if not len(prompts) == len(responses) == len(records):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(records)} records")
    if (model_scores is not None) != any(t.run for t in terms):
        raise ValueError("model_scores are the reward-model term's scores: pass them exactly when there is one")
    raw = {t.name: _values(t, model_scores, responses) if t.run else _call(t, prompts, responses, records)
           for t in terms}
    total = sum((t.weight * raw[t.name] for t in terms), np.zeros(len(responses)))
    with np.errstate(over="ignore"):
        total = total.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(total))
    if bad.size:
        i = int(bad[0])
        raise RewardError(f"the weighted sum of rewards overflows float32 for response {i} {_show(responses[i])}")
    return total, raw
