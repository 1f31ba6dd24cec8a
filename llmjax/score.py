"""Scores (prompt, response) texts with a trained reward model:

  python -m llmjax.score --workdir=runs/rm --prompt="sort: dcba" --response=abcd --response=abdc
  python -m llmjax.score --workdir=runs/rm --input=pairs.jsonl --output=scored.jsonl   # {"prompt", "response"}

A prompt and response longer than the reward model's max_seq_len are refused, naming the line, as in
llmjax.rejection_sample: scoring a truncated response would score other text.
"""

import json
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

from llmjax import runs
from llmjax.cli import run_main
from llmjax.data import preference
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.models import heads
from llmjax.sharding import make_constrain, make_mesh
from llmjax.train import registry


def reward_run(workdir: str) -> ml_collections.ConfigDict:
    """The config of a run holding a reward model (a scorer part); any other run refused in one line."""
    if "scorer" not in runs.run_parts(workdir):
        raise LlmjaxError(f"{workdir!r} holds a {runs.made(workdir)!r} run, not a reward model; train one with "
                          "configs/reward.py")
    return runs.run_config(workdir)


def render(cfg, tokenizer, prompt: str, response: str, where: str) -> tuple[list[int], list[float]]:
    """(ids, weights) of a prompt and response as the reward run `cfg` reads them; refused, naming `where`, when
    they do not fit its max_seq_len (it never saw later positions; a learned position table has none)."""
    ids, weights = preference.render(tokenizer, prompt, response, registry.get(cfg).at_eos(cfg))
    if len(ids) - 1 > cfg.model.max_seq_len:
        raise LlmjaxError(f"{where}: the prompt and response take {len(ids) - 1} tokens, more than the reward model's "
                          f"max_seq_len={cfg.model.max_seq_len}; shorten the response (or the prompt)")
    return ids, weights


def agreement(scores: np.ndarray, correct: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """How often a reward model agrees with the checkers, given one score, verdict and prompt id per answer: over
    answers to the same prompt (same `groups` id), the fraction of (correct, wrong) pairs it scores correct above
    wrong, a tie counting half (a constant score reads 0.5, chance), and how many such pairs there are (NaN and 0
    when none). Answers to different prompts are never compared: a reward need only rank the answers to one."""
    scores, correct, groups = np.ravel(scores), np.ravel(correct).astype(bool), np.ravel(groups)
    wins, pairs = 0.0, 0
    for group in np.unique(groups):
        here = groups == group
        right, wrong = scores[here & correct], scores[here & ~correct]
        diff = right[:, None] - wrong[None, :]
        wins += float(np.sum(diff > 0) + 0.5 * np.sum(diff == 0))
        pairs += diff.size
    return (wins / pairs if pairs else float("nan")), pairs


class Scorer:
    """A reward run's model, compiled once per padded length: scorer(prompts, responses) -> scores."""

    def __init__(self, workdir: str):
        self.cfg = reward_run(workdir)
        mesh = make_mesh(self.cfg.mesh)
        self.params = runs.load_params(workdir, mesh, "scorer", reader="score")
        self.tokenizer = get_tokenizer(self.cfg.data.tokenizer)
        constrain = make_constrain(mesh, self.cfg.rules)
        self._scores = jax.jit(lambda params, rows: heads.scores(params, rows, self.cfg.model, constrain)[0])

    def rows(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        """The reward model's input rows, as in training (next-token layout, loss mask on the response)."""
        seqs = [render(self.cfg, self.tokenizer, p, r, f"the response {r[:40]!r} to {p[:40]!r}")
                for p, r in zip(prompts, responses, strict=True)]
        width = -(-max(len(ids) - 1 for ids, _ in seqs) // 64) * 64  # few distinct shapes, few compilations
        out = preference.empty((len(seqs), width))
        for i, seq in enumerate(seqs):
            preference.fill({k: v[i] for k, v in out.items()}, 0, *seq, segment=1)
        return out

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.asarray(self._scores(self.params, self.rows(prompts, responses)))


def read_input(path: str) -> list[tuple[str, dict]]:
    """(FILE:LINE, {"prompt", "response", ...}) of every line of a .jsonl file; a missing file or a line that is
    not such an object refused in one line naming it."""
    if not os.path.isfile(path):
        raise LlmjaxError(f"--input={path!r} does not exist; pass a .jsonl file of {{\"prompt\", \"response\"}} lines")
    items = []
    with open(path) as file:
        for n, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise LlmjaxError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); write one "
                                  "{\"prompt\": ..., \"response\": ...} object per line") from None
            if not (isinstance(item, dict) and all(isinstance(item.get(k), str) for k in ("prompt", "response"))):
                raise LlmjaxError(f"{path}:{n}: not a JSON object with string \"prompt\" and \"response\" fields")
            items.append((f"{path}:{n}", item))
    if not items:
        raise LlmjaxError(f"--input={path!r} holds no lines; write one {{\"prompt\", \"response\"}} object per line")
    return items


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if f.input:
        lines = read_input(f.input)
    elif f.prompt is not None and f.response:
        lines = [(f"--response={r if len(r) <= 40 else r[:40] + '...'!r}", {"prompt": f.prompt, "response": r})
                 for r in f.response]
    else:
        raise LlmjaxError("give --input=FILE.jsonl of {prompt, response} lines, or --prompt and --response")
    cfg, items = reward_run(f.workdir), [item for _, item in lines]
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    for where, item in lines:  # every line checked before the model is read
        render(cfg, tokenizer, item["prompt"], item["response"], where)
    if f.output:
        os.makedirs(os.path.dirname(os.path.abspath(f.output)), exist_ok=True)
    scorer = Scorer(f.workdir)
    n = scorer.cfg.batch_size
    scores = np.concatenate([scorer([x["prompt"] for x in items[i:i + n]], [x["response"] for x in items[i:i + n]])
                             for i in range(0, len(items), n)])
    out = [item | {"score": float(s)} for item, s in zip(items, scores, strict=True)]
    with open(f.output, "w") if f.output else sys.stdout as file:
        for row in out:
            file.write(json.dumps(row) + "\n")
    if f.output:
        for row in out:
            print(f"{row['score']:+.4f}  {row['prompt']!r} -> {row['response']!r}")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A reward run's workdir (configs/reward.py).", required=True)
    flags.DEFINE_string("prompt", None, "A prompt to score responses to.")
    flags.DEFINE_multi_string("response", [], "A response to --prompt (repeatable).")
    flags.DEFINE_string("input", None, "A .jsonl file of {prompt, response} lines.")
    flags.DEFINE_string("output", None, "Where to write the lines with a score field (default: stdout).")
    run_main(main)
