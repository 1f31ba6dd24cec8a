"""Synthetic tasks whose answers can be checked exactly, so every training stage runs without external data.

Each example is one line, `"<task> <operands> = " + answer`. The answer is recomputed by parsing the prompt,
so a model's completion can be scored from the prompt alone (SFT evaluation, PPO rewards). TASKS are the short
ones (the default corpus, which the shipped tokenizer was trained on); `get` also knows the long-range `passkey_N_K`:
N tokens of random filler with a K-digit key planted at a uniform depth, asked for at the end, so that one task
gives short documents to pretrain on and long ones to test context extension with. The wrong answers of
preference pairs come in kinds (NEGATIVES): a near miss (`corrupt`), the right answer's own characters rearranged
(`permute`) and a neighbouring prompt's right answer (`neighbour`), so that no surface cue of the right answer (its
length, alphabet, characters or order) tells it apart from every wrong one.
"""

import functools
import itertools
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from llmjax.errors import LlmjaxError

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
    solve: Callable[[str], str]  # operands -> the right answer
    mistakes: Callable[[str], list[str]]  # operands -> plausible wrong answers made of the prompt's own material
    distance: Callable[[str], int] | None = None  # long-range tasks: prompt -> tokens from what it asks for to its end


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


def _values(body: str) -> list[str]:
    return [pair.split("=")[1] for pair in body.split(" ? ")[0].split()]


def _task(name: str, operands: Callable[[np.random.Generator], str], solve: Callable[[str], str],
          mistakes: Callable[[str], list[str]] = lambda _: [], word: str = "", **extra) -> Task:
    """Builds a task whose generator and checker share one solver, so they can never disagree. Its prompts start
    with `word` (default: its name)."""
    prefix = (word or name) + " "

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

    return Task(name, generate, check, solve, mistakes, **extra)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        _task("reverse", _letters, lambda s: s[::-1], lambda s: [s]),  # copied, not reversed
        _task("add", _addends, _add),
        _task("sort", _digits, lambda s: "".join(sorted(s)), lambda s: [s]),  # left unsorted
        _task("copy", _letters, lambda s: s, lambda s: [s[::-1]]),  # reversed
        _task("lookup", _table, _lookup, _values),  # another key's value
    )
}


# passkey_N[_K] (llmjax.data.tasks.get): "passkey <filler> key DDDDD <filler> = " + DDDDD, exactly N tokens with bos
# and eos, one token a character (the byte and shipped tokenizers), the key K digits (default 5). The filler is random
# letters and spaces: nothing to memorise, and no digit, so the key is the prompt's one number.
PASSKEY, PASSKEY_LENGTH, PASSKEY_DIGITS = "passkey", 256, 5  # bare `passkey` is passkey_256_5
_PASSKEY_NAME = re.compile(rf"{PASSKEY}(?:_(\d+)(?:_(\d+))?)?")
_PASSKEY_BODY = re.compile(r"[a-z ]* key (\d+) [a-z ]*")
_FILLER = string.ascii_lowercase + " " * 5  # words of about five letters
_PASSKEY_FIXED = len(f"{PASSKEY}  key  {_SEP}") + 2  # the tokens of a document without filler or key; bos and eos
NAMES = f"{','.join(TASKS)},{PASSKEY}_N[_K]"


def passkey_distances(length: int, digits: int = PASSKEY_DIGITS) -> tuple[int, int]:
    """The least and most tokens a passkey_<length>_<digits> key can end before its prompt does."""
    return 4, length - _PASSKEY_FIXED - 2 * digits + 4


def passkey(rng: np.random.Generator, length: int, distance: int | None = None,
            digits: int = PASSKEY_DIGITS) -> Example:
    """A passkey document of `length` tokens whose key of `digits` digits ends `distance` tokens before the question
    (the end of the prompt, where the answer starts); by default uniform over all it can (passkey_distances)."""
    low, high = passkey_distances(length, digits)
    distance = int(rng.integers(low, high + 1)) if distance is None else distance
    if not low <= distance <= high:
        raise ValueError(f"a passkey_{length}_{digits} key ends {low} to {high} tokens before the question, not "
                         f"{distance}")
    key = "".join(string.digits[i] for i in _randints(rng, 10, digits))
    before, after = ("".join(_FILLER[i] for i in _randints(rng, len(_FILLER), n))
                     for n in (high - distance, distance - low))
    name = f"{PASSKEY}_{length}" + (f"_{digits}" if digits != PASSKEY_DIGITS else "")
    return Example(name, f"{PASSKEY} {before} key {key} {after}{_SEP}", key)


def _key(body: str) -> str:
    found = _PASSKEY_BODY.fullmatch(body)
    if found is None:
        raise ValueError(f"no passkey in {body[:40]!r}...")
    return found[1]


def _distance(prompt: str) -> int:
    return len(prompt) - _PASSKEY_BODY.fullmatch(prompt[len(PASSKEY) + 1 : -len(_SEP)]).end(1) - len(PASSKEY) - 1


@functools.cache
@functools.cache  # a passkey name is parsed once, not once an example
def get(name: str) -> Task:
    """The task a name asks for: one of TASKS, or passkey_N_K (N tokens, a K-digit key; passkey: N = 256, K = 5)."""
    if name in TASKS:
        return TASKS[name]
    found = _PASSKEY_NAME.fullmatch(name)
    if found is None:
        raise LlmjaxError(f"task {name!r} is unknown; choose from {NAMES}")
    length, digits = int(found[1] or PASSKEY_LENGTH), int(found[2] or PASSKEY_DIGITS)
    if digits < 1:
        raise LlmjaxError(f"task {name!r}: a passkey's key has one digit or more")
    if passkey_distances(length, digits)[1] < 4:
        least = _PASSKEY_FIXED + 2 * digits
        raise LlmjaxError(f"task {name!r}: a passkey document with a {digits}-digit key takes at least {least} "
                          f"tokens; ask for {PASSKEY}_{least}_{digits} or more")

    def operands(rng: np.random.Generator) -> str:
        return _operands(passkey(rng, length, digits=digits))

    return _task(name, operands, _key, word=PASSKEY, distance=_distance)


def check_names(key: str, names: str) -> None:
    """Refuses a config key (data.tasks, ppo.tasks) that names a task we do not have."""
    unknown = [n for n in names.split(",") if n not in TASKS and not _PASSKEY_NAME.fullmatch(n)]
    if unknown:
        raise LlmjaxError(f"{key}={names!r} names unknown tasks {unknown}; choose from {NAMES}")
    for name in names.split(","):
        try:
            get(name)
        except LlmjaxError as e:
            raise LlmjaxError(f"{key}={names!r}: {e}") from None


def sample(rng: np.random.Generator, names: Sequence[str]) -> Example:
    """Draws an example from a task chosen uniformly among `names`."""
    try:
        chosen = [get(name) for name in names]
    except LlmjaxError:
        chosen = []
    if not chosen:
        raise ValueError(f"task names {list(names)} must be a non-empty list of {NAMES}")
    return chosen[rng.integers(len(chosen))].generate(rng)


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


def _operands(example: Example) -> str:
    return example.prompt.partition(" ")[2][: -len(_SEP)]


def neighbour(example: Example, rng: np.random.Generator) -> str:
    """The right answer to a neighbouring prompt, one operand character changed (a digit for a digit, a letter for
    a letter): well-formed and as plausible as a wrong answer gets (sort: ascending, of the right length, one digit
    off; add: one digit of an addend misread), so it catches a judge that checks only an answer's form."""
    task, operands = get(example.task), _operands(example)
    spots = [i for i, c in enumerate(operands) if c.isalnum()]
    while True:  # some change always moves the answer (lookup: the queried value), so this ends
        i = spots[rng.integers(len(spots))]
        alphabet = string.digits if operands[i].isdigit() else string.ascii_lowercase
        try:
            answer = task.solve(operands[:i] + alphabet[rng.integers(len(alphabet))] + operands[i + 1:])
        except (KeyError, ValueError):  # lookup's query changed to a key its table lacks, passkey's marker changed
            continue
        if answer != example.answer:
            return answer


def permute(example: Example, rng: np.random.Generator) -> str:
    """A wrong answer made of the right one's material, so that no check of its length or characters catches it:
    half the time the task's typical mistake with the prompt's own material (reverse: the letters copied; copy:
    reversed; sort: left unsorted; lookup: another key's value), else two unequal characters of the right answer
    swapped, anywhere (never a zero to the front of a longer answer). Where neither differs from the right answer
    (a one-digit sum, "777"), a neighbouring prompt's answer (`neighbour`)."""
    answer = example.answer
    mistakes = [m for m in get(example.task).mistakes(_operands(example)) if m != answer]
    swaps = [(i, j) for i, j in itertools.combinations(range(len(answer)), 2)
             if answer[i] != answer[j] and (i, answer[j]) != (0, "0")]
    if mistakes and (not swaps or rng.random() < 0.5):
        return mistakes[rng.integers(len(mistakes))]
    if not swaps:
        return neighbour(example, rng)
    i, j = swaps[rng.integers(len(swaps))]
    chars = list(answer)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


# The kinds of wrong answer a preference pair's rejected response can be: (example, rng) -> a wrong answer.
NEGATIVES: dict[str, Callable[[Example, np.random.Generator], str]] = {
    "corrupt": corrupt, "permute": permute, "neighbour": neighbour}


def check_negatives(key: str, kinds: str) -> None:
    """Refuses a config key (reward.negatives) naming no kind, an unknown one, or one twice (kinds are drawn
    uniformly: a weight would be silent)."""
    names = kinds.split(",")
    unknown = [n for n in names if n not in NEGATIVES]
    if unknown or len(set(names)) < len(names):
        problem = f"names unknown kinds {unknown}" if unknown else "names a kind twice"
        raise LlmjaxError(f"{key}={kinds!r} {problem}; give some of {','.join(NEGATIVES)}, comma-separated")
