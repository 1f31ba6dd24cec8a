"""Arithmetic word problems with checkable integer answers: a prompts file for PPO / GRPO with the `math` reward
(llmjax.rewards), and an SFT file of other problems from the same stream to warm the policy up on the answer format.

  python -m experiments.rl.word_problems --out=/tmp/rl/problems.jsonl --n=5000 --seed=0 --sft_out=/tmp/rl/sft.jsonl

--top bounds the counts and gains (default 30; the pipeline's 9 leave the `small` model sums it can sometimes do).

Each problem takes one or two addition / subtraction steps on small numbers, and no count goes below zero:
    {"prompt": "Ana has 12 apples. She buys 7 more. How many apples does Ana have now?", "answer": "19"}
The same seed gives the same files.
"""

import json
import os
import random

from absl import app, flags

NAMES = (("Ana", "She"), ("Ben", "He"), ("Chloe", "She"), ("David", "He"), ("Emma", "She"), ("Farid", "He"),
         ("Grace", "She"), ("Hugo", "He"), ("Iris", "She"), ("Jamal", "He"), ("Keiko", "She"), ("Liam", "He"))
OBJECTS = ("apples", "marbles", "stickers", "pencils", "books", "cookies", "shells", "coins", "stamps", "cards")
# Changes to a count, with their sign; {n} is the amount, {other} another person.
GAINS = ("buys {n} more", "finds {n} more", "gets {n} more from {other}", "is given {n} more")
LOSSES = ("gives {n} to {other}", "loses {n}", "sells {n}", "gives away {n}")
TOP = 30  # the default largest count or gain


def _change(rng: random.Random, count: int, other: str, most: int) -> tuple[str, int]:
    """A gain (at most `most`) or a loss (at most `count`) as a verb phrase, and its signed amount."""
    if count > 0 and rng.random() < 0.5:
        n = rng.randint(1, count)
        return rng.choice(LOSSES).format(n=n, other=other), -n
    n = rng.randint(1, most)
    return rng.choice(GAINS).format(n=n, other=other), n


def problem(rng: random.Random, top: int = TOP) -> tuple[str, list[int]]:
    """One problem's text, and the signed amounts its answer sums (so a test can recompute the answer without
    reading the text). Counts and gains are at most `top` (at least 4): smaller makes easier sums."""
    (name, pronoun), (other, _), (third, _) = rng.sample(NAMES, 3)
    things, a, two_steps = rng.choice(OBJECTS), rng.randint(3, top), rng.random() < 0.5
    most = min(20, top)  # the largest gain, or difference in a comparison
    template = rng.choice(("story", "together", "compare"))
    if template == "story":  # one person's count changes once or twice
        phrase, b = _change(rng, a, other, most)
        text, terms = f"{name} has {a} {things}. {pronoun} {phrase}.", [a, b]
        if two_steps:
            phrase, c = _change(rng, a + b, other, most)
            text, terms = f"{text} Then {name} {phrase}.", [*terms, c]  # by name: a pronoun could mean {other}
        return f"{text} How many {things} does {name} have now?", terms
    if template == "together":  # two or three people's counts added
        b = rng.randint(2, top)
        text, terms = f"{name} has {a} {things}. {other} has {b} {things}.", [a, b]
        if two_steps:
            c = rng.randint(2, top)
            text, terms = f"{text} {third} has {c} {things}.", [*terms, c]
        return f"{text} How many {things} do they have together?", terms
    more = rng.random() < 0.5  # compare: a second count given relative to the first, then perhaps changed
    b = rng.randint(2, most) if more else rng.randint(2, a - 1)  # 2 or more: "1 more apples" reads badly
    text = f"{name} has {a} {things}. {other} has {b} {'more' if more else 'fewer'} {things} than {name}."
    terms = [a, b if more else -b]
    if two_steps:
        phrase, c = _change(rng, sum(terms), third, most)
        text, terms = f"{text} Then {other} {phrase}.", [*terms, c]
    return f"{text} How many {things} does {other} have{' now' * two_steps}?", terms


def generate(n: int, seed: int, top: int = TOP) -> list[dict]:
    """n problems as prompt records {"prompt", "answer"}; the first n of a seed's stream are the same for any n."""
    if top < 4:
        raise ValueError(f"top={top}: problems need numbers up to at least 4 (a fewer-than comparison needs 3 > 2)")
    rng = random.Random(seed)
    return [{"prompt": text, "answer": str(sum(terms))} for text, terms in (problem(rng, top) for _ in range(n))]


def _write_lines(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def write(path: str, n: int, seed: int, sft_path: str | None = None, top: int = TOP) -> None:
    """Writes n problems as {"prompt", "answer"} lines to `path`; with `sft_path`, the next n problems of the same
    stream as {"prompt", "response"} lines there, the response being the answer alone (no problem is in both)."""
    records = generate(2 * n if sft_path else n, seed, top)
    _write_lines(path, records[:n])
    if sft_path:
        _write_lines(sft_path, [{"prompt": r["prompt"], "response": r["answer"]} for r in records[n:]])


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    write(f.out, f.n, f.seed, f.sft_out or None, f.top)
    print(f"wrote {f.n} problems to {f.out}" + (f" and {f.n} others for SFT to {f.sft_out}" if f.sft_out else ""))


if __name__ == "__main__":
    flags.DEFINE_string("out", None, "The prompts file to write (.jsonl of {prompt, answer}).", required=True)
    flags.DEFINE_integer("n", 5000, "Problems in each file.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed of the problem stream.")
    flags.DEFINE_string("sft_out", "", "Also write this .jsonl of {prompt, response} for an SFT warm start.")
    flags.DEFINE_integer("top", TOP, "The largest count a problem starts from or gain it adds (smaller: easier sums).",
                         lower_bound=4)
    app.run(main)
