"""Prompt records for reinforcement learning: what PPO and GRPO answer, and what their rewards and evaluations read.

A record is a dict with a "prompt" and any other fields its source holds (an "answer", an id, test cases), kept
with the rollout and handed to the reward functions (llmjax.rewards). Sources, by cfg.data.source:
  synthetic       the built-in tasks the objective names (or data.tasks): {"prompt", "answer", "task"}
  files:PATH      .jsonl lines with a "prompt" (llmjax.data.sources, kind "prompts"), their data.validation share
  tfds:NAME       held out for evaluation; a prepared tfds dataset whose records have a "prompt" feature
  mixture         several of them, drawn by data.weights (llmjax.data.mixture.indexed)
Records are read in a seeded shuffle, reshuffled each epoch, so step s's prompts are a pure function of (seed, s):
a resumed run asks the same questions. GRPO answers each prompt group_size times in a row.
"""

import os
from collections.abc import Callable, Sequence
from functools import cache

import numpy as np

from llmjax.data import chat, mixture, sources, tasks
from llmjax.data.synthetic import HELD_OUT, MIXED
from llmjax.errors import LlmjaxError


def synthetic(example: tasks.Example) -> dict:
    return {"prompt": example.prompt, "answer": example.answer, "task": example.task}


def records(cfg, split: str) -> sources.Records:
    """A files: or tfds: source's prompt records of `split`, refused in one line if they have no prompt."""
    found = sources.for_run(cfg, split, kind="prompts")
    if "prompt" not in found[0]:
        raise LlmjaxError(f"data.source={cfg.data.source!r} holds no prompt records (fields {sorted(found[0])}); "
                          'RL needs records with a "prompt"')
    return found


def record_sources(cfg) -> dict[str, object]:
    """The run's sources of prompt records (not the synthetic tasks), by the name evaluation reports them under:
    data.source's, or each of a mixture's, as a config reading it alone."""
    if cfg.data.source == "mixture":
        views = {n: mixture.view(cfg, n) for n in cfg.data.mixture}
        return {n: v for n, v in views.items() if v.data.source != "synthetic"}
    return {} if cfg.data.source == "synthetic" else {name(cfg.data.source): cfg}


def _item(cfg) -> Callable[[int], dict]:
    """A mixture source's i-th prompt record: a fresh example of its tasks, or its records in a seeded shuffle,
    reshuffled each epoch."""
    if cfg.data.source == "synthetic":
        names = cfg.data.tasks.split(",")
        return lambda i: synthetic(tasks.sample(np.random.default_rng([cfg.seed, MIXED, i]), names))
    found = records(cfg, "train")
    order = cache(lambda epoch: np.random.default_rng([cfg.seed, epoch]).permutation(len(found)))
    return lambda i: found[int(order(i // len(found))[i % len(found)])]


def source(cfg, k: int = 1, task_names: str = "") -> Callable[[int], list[dict]]:
    """step -> its batch_size records, each prompt k times in a row (a GRPO group); synthetic prompts of
    `task_names` (default data.tasks)."""
    n = cfg.batch_size // k
    if cfg.data.source == "mixture":
        item = mixture.indexed(cfg, n, _item)

        def draw(step: int) -> list[dict]:
            return [item(g) for g in range(step * n, (step + 1) * n)]
    elif cfg.data.source == "synthetic":
        names = (task_names or cfg.data.tasks).split(",")

        def draw(step: int) -> list[dict]:
            rng = np.random.default_rng([cfg.seed, step])
            return [synthetic(tasks.sample(rng, names)) for _ in range(n)]
    else:
        found = records(cfg, "train")

        def draw(step: int) -> list[dict]:
            out = []
            for g in range(step * n, (step + 1) * n):
                epoch, i = divmod(g, len(found))
                out.append(found[int(np.random.default_rng([cfg.seed, epoch]).permutation(len(found))[i])])
            return out

    return lambda step: [record for record in draw(step) for _ in range(k)]


def held_out(cfg, n: int) -> dict[str, list[dict]]:
    """Evaluation prompts by name: n of each synthetic task of data.tasks (of a mixture's synthetic sources, if it
    has any; a seed no training stream uses), and up to n held-out records of each source of prompt records
    (record_sources)."""
    rng = np.random.default_rng([cfg.seed, HELD_OUT])
    names = (mixture.synthetic_view(cfg) or cfg).data.tasks.split(",")
    out = {name: [synthetic(tasks.sample(rng, [name])) for _ in range(n)] for name in names}
    for name, view in record_sources(cfg).items():
        found = records(view, "validation")
        out[name] = [found[i] for i in range(min(n, len(found)))]
    return out


def name(source: str) -> str:
    """A source's short name for metrics: the file or folder name without its suffix, or the tfds name."""
    return os.path.splitext(os.path.basename(source.partition(":")[2].rstrip("/")))[0]


def ids(tokenizer, prompts: Sequence[str], width: int, key: str) -> list[list[int]]:
    """The prompts through the chat template, refused in one line if one does not fit `width` tokens: a fixed
    prompt width is what keeps the sampler from compiling again for longer prompts."""
    out = [chat.prompt_ids(tokenizer, p) for p in prompts]
    longest = max(range(len(out)), key=lambda i: len(out[i]))
    if len(out[longest]) > width:
        raise LlmjaxError(f"a prompt of {len(out[longest])} tokens does not fit {key}={width} "
                          f"({prompts[longest][:60]!r}); raise --config.{key}")
    return out
