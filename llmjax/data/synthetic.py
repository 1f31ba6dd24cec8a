"""Packed pretraining batches of the synthetic tasks.

A row is a pure function of (seed, step, row index): training resumes exactly from a step number, and each
process of a multi-process run builds only its own rows yet gets the very rows a single process would.
"""

from collections.abc import Sequence

import numpy as np

from llmjax.data import tasks as tasks_lib
from llmjax.data.tokenizer import ByteTokenizer


def _pack_row(
    rng: np.random.Generator, length: int, tasks: Sequence[str], tokenizer: ByteTokenizer
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Concatenates whole documents until `length` tokens are filled, truncating the last one."""
    tokens: list[int] = []
    lengths: list[int] = []
    while len(tokens) < length:
        doc = tokenizer.encode(tasks_lib.sample(rng, tasks).text, bos=True, eos=True)
        tokens += doc
        lengths.append(len(doc))
    segment_ids = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(len(tokens)) - starts
    return tokens[:length], segment_ids[:length], positions[:length]


def make_batch(
    *, seed: int, step: int, rows: range, seq_len: int, tasks: Sequence[str], tokenizer: ByteTokenizer
) -> dict[str, np.ndarray]:
    """Rows `rows` of the global batch for `step`, each seq_len tokens of packed bos/eos-delimited documents.

    `segment_ids` (from 1; 0 is left for padding) and `positions` describe the input tokens, and
    `loss_mask` is 0 where the target starts a new document, as it cannot be predicted from the previous one.
    """
    tokens, segment_ids, positions = (np.empty((len(rows), seq_len + 1), np.int32) for _ in range(3))
    for i, r in enumerate(rows):
        rng = np.random.default_rng([seed, step, r])
        tokens[i], segment_ids[i], positions[i] = _pack_row(rng, seq_len + 1, tasks, tokenizer)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids[:, :-1],
        "positions": positions[:, :-1],
        "loss_mask": (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(np.float32),
    }
