"""Scores (prompt, response) texts with a trained reward model:

  python -m llmjax.score --workdir=runs/rm --prompt="sort: dcba" --response=abcd --response=abdc
  python -m llmjax.score --workdir=runs/rm --input=pairs.jsonl --output=scored.jsonl   # {"prompt", "response"}
"""

import json
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

from llmjax import checkpoint
from llmjax.cli import run_main
from llmjax.config import ConfigError
from llmjax.data import preference
from llmjax.data.tokenizer import get_tokenizer
from llmjax.sharding import make_constrain, make_mesh
from llmjax.train import reward


class Scorer:
    """A reward run's model, compiled once per padded length: scorer(prompts, responses) -> scores."""

    def __init__(self, workdir: str):
        self.cfg = checkpoint.run_config(workdir)
        if self.cfg.trainer != "reward":
            raise ConfigError(f"{workdir!r} holds a {self.cfg.trainer!r} run, not a reward model; train one with "
                              "configs/reward.py")
        mesh = make_mesh(self.cfg.mesh)
        self.params = checkpoint.load_params(workdir, mesh, "scorer", reader="score")
        self.tokenizer = get_tokenizer(self.cfg.data.tokenizer)
        constrain = make_constrain(mesh, self.cfg.rules)
        self._scores = jax.jit(lambda params, rows: reward.scores(params, rows, self.cfg, constrain))

    def rows(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        """The reward model's input rows, as in training (next-token layout, loss mask on the response)."""
        eos = self.cfg.reward.read == "eos"
        seqs = [preference.render(self.tokenizer, p, r, eos) for p, r in zip(prompts, responses, strict=True)]
        width = -(-max(len(ids) - 1 for ids, _ in seqs) // 64) * 64  # few distinct shapes, few compilations
        out = preference.empty((len(seqs), width))
        for i, seq in enumerate(seqs):
            preference.fill({k: v[i] for k, v in out.items()}, 0, *seq, segment=1)
        return out

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.asarray(self._scores(self.params, self.rows(prompts, responses)))


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if f.input:
        with open(f.input) as file:
            items = [json.loads(line) for line in file if line.strip()]
    elif f.prompt is not None and f.response:
        items = [{"prompt": f.prompt, "response": r} for r in f.response]
    else:
        raise ConfigError("give --input=FILE.jsonl of {prompt, response} lines, or --prompt and --response")
    missing = [i for i, item in enumerate(items) if not {"prompt", "response"} <= item.keys()]
    if missing:
        raise ConfigError(f"{f.input}: lines {[i + 1 for i in missing[:5]]} lack a prompt or response field")
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
