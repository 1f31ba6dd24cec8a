"""Packed training batches of the synthetic tasks, as plain text (pretraining) or chat (SFT).

A row is a pure function of (seed, step, row index): training resumes exactly from a step number, and each
process of a multi-process run builds only its own rows yet gets the very rows a single process would.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from llmjax.data import chat
from llmjax.data import tasks as tasks_lib
from llmjax.data.tokenizer import ByteTokenizer, get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.sharding import global_batch, process_rows

Render = Callable[[ByteTokenizer, tasks_lib.Example], tuple[list[int], list[float]]]


def _text(tokenizer: ByteTokenizer, example: tasks_lib.Example) -> tuple[list[int], list[float]]:
    """Every token is a target except the bos, which nothing earlier in the row can predict."""
    ids = tokenizer.encode(example.text, bos=True, eos=True)
    return ids, [0.0] + [1.0] * (len(ids) - 1)


def _chat(tokenizer: ByteTokenizer, example: tasks_lib.Example) -> tuple[list[int], list[float]]:
    return chat.render(tokenizer, example.prompt, example.answer)


FORMATS: dict[str, Render] = {"text": _text, "chat": _chat}


def check_rows(cfg) -> None:
    """Refuses a long-range task of cfg.data.tasks whose documents are longer than a row of seq_len tokens (asked for
    at more tokens than the run's rows): packing keeps a document's start and cuts or splits off its end, so no
    answer would be learnt. A row holds seq_len + 1 tokens: the inputs and, shifted by one, the targets. (The short
    tasks' documents are a few dozen tokens; the one cut at a row's end is the only one.)"""
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    for name in cfg.data.tasks.split(","):
        task = tasks_lib.get(name)
        if task.distance is None:
            continue
        length = len(FORMATS[cfg.data.format](tokenizer, task.generate(np.random.default_rng(0)))[0])
        if length > cfg.seq_len + 1:
            raise LlmjaxError(f"data.tasks={cfg.data.tasks!r}: a {name} document is {length} tokens as "
                              f"{cfg.data.format}, more than a row of seq_len={cfg.seq_len} holds whole; raise "
                              f"--config.seq_len to {length - 1} or ask for a shorter one")


def _pack_row(
    rng: np.random.Generator, length: int, tasks: Sequence[str], tokenizer: ByteTokenizer, render: Render
) -> tuple[list[int], list[float], np.ndarray, np.ndarray]:
    """Concatenates whole documents until `length` tokens are filled, truncating the last one."""
    tokens: list[int] = []
    weights: list[float] = []
    lengths: list[int] = []
    while len(tokens) < length:
        ids, w = render(tokenizer, tasks_lib.sample(rng, tasks))
        tokens += ids
        weights += w
        lengths.append(len(ids))
    segment_ids = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(len(tokens)) - starts
    return tokens[:length], weights[:length], segment_ids[:length], positions[:length]


def make_batch(
    *, seed: int, step: int, rows: range, seq_len: int, tasks: Sequence[str], tokenizer: ByteTokenizer,
    format: str = "text",
) -> dict[str, np.ndarray]:
    """Rows `rows` of the global batch for `step`, each seq_len tokens of packed bos-led documents.

    `format` is "text" (whole examples as documents) or "chat" (prompt and answer through the chat template).
    `segment_ids` (from 1; 0 is left for padding) and `positions` describe the input tokens. `loss_mask` is
    each target's weight from its document's rendering: a document's first token (bos) always weighs 0, so a
    masked-in target always belongs to the same document as its input, and no target is shifted or lost.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; valid choices: {sorted(FORMATS)}")
    tokens, segment_ids, positions = (np.empty((len(rows), seq_len + 1), np.int32) for _ in range(3))
    weights = np.empty((len(rows), seq_len + 1), np.float32)
    for i, r in enumerate(rows):
        rng = np.random.default_rng([seed, step, r])
        tokens[i], weights[i], segment_ids[i], positions[i] = _pack_row(
            rng, seq_len + 1, tasks, tokenizer, FORMATS[format])
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids[:, :-1],
        "positions": positions[:, :-1],
        "loss_mask": weights[:, 1:],
    }


HELD_OUT = 1_000_003  # offsets the seed so evaluation never sees a training example's random stream
MIXED = 3_000_017  # offsets the seed of a mixture's synthetic streams, which are then none of the others


class Records(Sequence[dict]):
    """The tasks as a random-access source of records ("text", or "prompt" and "response" for chat) for the grain
    pipeline, as a mixture reads its sources: record i is a pure function of (seed, i), and there are more than
    any run reads (2**40), so the stream never repeats."""

    def __init__(self, seed: int, task_names: str, format: str):
        self._seed, self._names, self._format = seed, task_names.split(","), format

    def __len__(self) -> int:
        return 2**40

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = tasks_lib.sample(np.random.default_rng([self._seed, MIXED, index]), self._names)
        if self._format == "chat":
            return {"prompt": example.prompt, "response": example.answer}
        return {"text": example.text}


def batches(cfg, sharding: NamedSharding, seed: int | None = None,
            format: str | None = None) -> Callable[[int], dict[str, jax.Array]]:
    """step -> the global batch of cfg's corpus as jax.Arrays; each process generates only the rows its
    devices hold. `seed` and `format` default to cfg's (evaluation passes a held-out seed)."""
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    names = cfg.data.tasks.split(",")
    rows = process_rows(sharding, (cfg.batch_size, cfg.seq_len))
    seed = cfg.seed if seed is None else seed

    def get(step: int) -> dict[str, jax.Array]:
        local = make_batch(seed=seed, step=step, rows=rows, seq_len=cfg.seq_len, tasks=names, tokenizer=tokenizer,
                           format=format or cfg.data.format)
        return global_batch(local, sharding, cfg.batch_size)

    return get
