"""Evaluation: held-out perplexity, and task accuracy by sampling answers and checking them with each task's
checker. Used inside the training loop (cfg.eval_every) and standalone:

  python -m llmjax.evaluate --workdir=runs/demo [--format=chat] [--n=100]
"""

import json
import math
import os
from collections.abc import Callable

import jax
import numpy as np
from absl import flags

from llmjax import checkpoint, losses, sampling
from llmjax.cli import run_main
from llmjax.config import ConfigError
from llmjax.data import chat, pipeline, synthetic, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.models import transformer
from llmjax.sharding import Constrain, batch_sharding, make_constrain, make_mesh, no_constrain

HELD_OUT = 1_000_003  # offsets the seed so evaluation never sees a training example's random stream


def prompt_ids(tokenizer, prompt: str, fmt: str) -> list[int]:
    """A task prompt as the model was trained to see it: plain text after bos, or through the chat template."""
    return chat.prompt_ids(tokenizer, prompt) if fmt == "chat" else tokenizer.encode(prompt, bos=True)


def make_evaluator(cfg, mesh, constrain: Constrain = no_constrain, n: int = 64, batches: int = 4,
                   fmt: str | None = None) -> Callable[[transformer.Params], dict[str, float]]:
    """fn(params) -> {perplexity, accuracy, accuracy/<task>} on held-out data, compiled once. For a files or
    tfds source: the perplexity of its validation split alone (the task checkers only know synthetic tasks)."""
    fmt = fmt or cfg.data.format
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    names = cfg.data.tasks.split(",")
    sharding = batch_sharding(mesh, cfg.rules)
    if cfg.data.source == "synthetic":
        get = synthetic.batches(cfg, sharding, seed=cfg.seed + HELD_OUT, format=fmt)
        eval_batches = [get(i) for i in range(batches)]
    else:
        try:
            eval_batches = pipeline.validation_batches(cfg, sharding, batches)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"data.source={cfg.data.source!r} has no usable validation split ({e}); raise "
                              "--config.data.validation or set --config.eval_every=0") from None

    def summed_ce(params, b):
        logits = transformer.forward(params, b["inputs"], b["positions"], b["segment_ids"], cfg.model, constrain)[0]
        return losses.cross_entropy(logits, b["targets"], b["loss_mask"], normalizer=1.0)[0]

    loss = jax.jit(summed_ce)
    rng = np.random.default_rng([cfg.seed, HELD_OUT])
    examples = [tasks.sample(rng, [name]) for name in names for _ in range(n)]
    prompts, lengths = sampling.left_pad([prompt_ids(tokenizer, ex.prompt, fmt) for ex in examples])
    generate = sampling.sampler(cfg.model, max_new_tokens=32, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                vocab_size=tokenizer.vocab_size, constrain=constrain)

    def evaluate(params) -> dict[str, float]:
        total = sum(float(loss(params, b)) for b in eval_batches)
        tokens = sum(float(b["loss_mask"].sum()) for b in eval_batches)
        if cfg.data.source != "synthetic":
            return {"perplexity": math.exp(total / tokens)}
        out = jax.device_get(generate(params, prompts, lengths, jax.random.key(0)))
        correct = {name: [] for name in names}
        for ex, toks, length in zip(examples, out["tokens"], out["lengths"], strict=True):
            response = tokenizer.decode(toks[:length])
            correct[ex.task].append(tasks.TASKS[ex.task].check(ex.prompt, response))
        metrics = {"perplexity": math.exp(total / tokens), "accuracy": float(np.mean(sum(correct.values(), [])))}
        return metrics | {f"accuracy/{name}": float(np.mean(c)) for name, c in correct.items()}

    return evaluate


def main(argv: list[str]) -> None:
    del argv
    workdir, fmt = flags.FLAGS.workdir, flags.FLAGS.format
    cfg = checkpoint.run_config(workdir)
    mesh = make_mesh(cfg.mesh)
    params = checkpoint.load_params(workdir, mesh, reader="evaluate")
    result = make_evaluator(cfg, mesh, make_constrain(mesh, cfg.rules), n=flags.FLAGS.n, fmt=fmt)(params)
    with open(os.path.join(workdir, f"eval_{fmt or cfg.data.format}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":  # flags only for the command line: the trainers import this module
    flags.DEFINE_string("workdir", None, "A run's workdir; its latest checkpoint is evaluated.", required=True)
    flags.DEFINE_enum("format", None, ["text", "chat"], "Prompt format (default: the run's data.format).")
    flags.DEFINE_integer("n", 100, "Prompts per task.")
    run_main(main)
