"""Synthetic tasks whose answers can be checked exactly, so every training stage runs without external data.

Each example is one line, `"<task> <operands> = " + answer`. The answer is recomputed by parsing the prompt,
so a model's completion can be scored from the prompt alone (SFT evaluation, PPO rewards), and `corrupt`
gives a near-miss answer for preference pairs.
"""

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from llmjax.config import ConfigError

_SEP = " = "


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The rendered document used for pretraining."""
        return self.prompt + self.answer


@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable[[np.random.Generator], Example]
    check: Callable[[str, str], bool]


def _randints(rng: np.random.Generator, high: int, n: int) -> list[int]:
    """n uniform ints in [0, high): several times faster than rng.integers(size=n), bias below 2**-40."""
    return (rng.random(n) * high).astype(np.int64).tolist()


def _string(rng: np.random.Generator, alphabet: str) -> str:
    return "".join([alphabet[i] for i in _randints(rng, len(alphabet), rng.integers(3, 9))])


def _letters(rng: np.random.Generator) -> str:
    return _string(rng, string.ascii_lowercase)


def _digits(rng: np.random.Generator) -> str:
    return _string(rng, string.digits)


def _addends(rng: np.random.Generator) -> str:
    # Draw the digit count first so 1- and 2-digit numbers are as common as 3-digit ones.
    a, b = (rng.integers(10 ** rng.integers(1, 4)) for _ in range(2))
    return f"{a} + {b}"


def _table(rng: np.random.Generator) -> str:
    n = rng.integers(3, 6)
    keys = [string.ascii_lowercase[k] for k in rng.permutation(26)[:n].tolist()]
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, _randints(rng, 10, n), strict=True))
    return f"{pairs} ? {keys[rng.integers(n)]}"


def _lookup(body: str) -> str:
    pairs, query = body.split(" ? ")
    return dict(pair.split("=") for pair in pairs.split())[query]


def _add(body: str) -> str:
    a, b = body.split(" + ")
    return str(int(a) + int(b))


def _task(name: str, operands: Callable[[np.random.Generator], str], solve: Callable[[str], str]) -> Task:
    """Builds a task whose generator and checker share one solver, so they can never disagree."""
    prefix = name + " "

    def answer(prompt: str) -> str:
        if not (prompt.startswith(prefix) and prompt.endswith(_SEP)):
            raise ValueError(f"not a {name!r} prompt: {prompt!r}")
        return solve(prompt[len(prefix) : -len(_SEP)])

    def generate(rng: np.random.Generator) -> Example:
        prompt = prefix + operands(rng) + _SEP
        return Example(name, prompt, answer(prompt))

    def check(prompt: str, response: str) -> bool:
        """Exact match after stripping whitespace: trailing junk fails, so cut completions at eos first."""
        return response.strip() == answer(prompt)

    return Task(name, generate, check)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        _task("reverse", _letters, lambda s: s[::-1]),
        _task("add", _addends, _add),
        _task("sort", _digits, lambda s: "".join(sorted(s))),
        _task("copy", _letters, lambda s: s),
        _task("lookup", _table, _lookup),
    )
}


def check_names(key: str, names: str) -> None:
    """Refuses a config key (data.tasks, ppo.tasks) that names a task we do not have."""
    unknown = [n for n in names.split(",") if n not in TASKS]
    if unknown:
        raise ConfigError(f"{key}={names!r} names unknown tasks {unknown}; choose from {','.join(TASKS)}")


def sample(rng: np.random.Generator, names: Sequence[str]) -> Example:
    """Draws an example from a task chosen uniformly among `names`."""
    if not names or not TASKS.keys() >= set(names):
        raise ValueError(f"task names {list(names)} must be a non-empty subset of {sorted(TASKS)}")
    return TASKS[names[rng.integers(len(names))]].generate(rng)


def corrupt(example: Example, rng: np.random.Generator) -> str:
    """A near-miss answer, one character changed or two neighbours swapped, that always fails the check.

    No edit moves a zero to the front of a longer answer, so wrong sums still look like numbers.
    """
    answer = list(example.answer)
    swaps = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1] and (i, answer[1]) != (0, "0")]
    if swaps and rng.random() < 0.5:
        i = swaps[rng.integers(len(swaps))]
        answer[i], answer[i + 1] = answer[i + 1], answer[i]
    else:
        i = rng.integers(len(answer))
        alphabet = string.digits if answer[i].isdigit() else string.ascii_lowercase
        choices = [c for c in alphabet if c != answer[i] and not (c == "0" and i == 0 and len(answer) > 1)]
        answer[i] = choices[rng.integers(len(choices))]
    return "".join(answer)
