"""Preference pairs of the synthetic tasks: a prompt, its correct answer (chosen) and a corrupted one
(rejected), through the chat template. Like every synthetic batch, row r of step s is a pure function of
(seed, s, r), so runs resume exactly and each process builds only its own rows.

A pair is either two rows (`chosen`, `rejected`) or one packed row in which the chosen sequence is
segment 1 and the rejected one segment 2 (fewer padding tokens; the same log-probs).
"""

from collections.abc import Callable, Sequence

import numpy as np
from jax.sharding import NamedSharding

from llmjax.data import chat, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.sharding import global_batch, process_rows

KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def _fill(row: dict[str, np.ndarray], start: int, ids: list[int], weights: list[float], segment: int) -> int:
    """Writes one rendered sequence into `row` from `start` (next-token layout); returns where it ends."""
    n = len(ids) - 1
    if start + n > row["inputs"].shape[0]:
        raise ValueError(f"a preference sequence of {n} tokens does not fit seq_len={row['inputs'].shape[0]}; "
                         "raise --config.seq_len")
    end = start + n
    row["inputs"][start:end], row["targets"][start:end] = ids[:-1], ids[1:]
    row["loss_mask"][start:end], row["segment_ids"][start:end] = weights[1:], segment
    row["positions"][start:end] = np.arange(n)
    return end


def make_pairs(*, seed: int, step: int, rows: range, seq_len: int, names: Sequence[str], tokenizer,
               packed: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{"chosen": rows, "rejected": rows} or {"packed": rows}; rows are dicts of [len(rows), seq_len] arrays
    with the loss mask on the response tokens (and eos) only."""
    def empty():
        out = {k: np.zeros((len(rows), seq_len), np.int32) for k in KEYS}
        out["loss_mask"] = out["loss_mask"].astype(np.float32)
        return out

    parts = {"packed": empty()} if packed else {"chosen": empty(), "rejected": empty()}
    for i, r in enumerate(rows):
        rng = np.random.default_rng([seed, step, r])
        example = tasks.sample(rng, names)
        chosen = chat.render(tokenizer, example.prompt, example.answer)
        rejected = chat.render(tokenizer, example.prompt, tasks.corrupt(example, rng))
        if packed:
            row = {k: v[i] for k, v in parts["packed"].items()}
            _fill(row, _fill(row, 0, *chosen, segment=1), *rejected, segment=2)
        else:
            _fill({k: v[i] for k, v in parts["chosen"].items()}, 0, *chosen, segment=1)
            _fill({k: v[i] for k, v in parts["rejected"].items()}, 0, *rejected, segment=1)
    return parts


def batches(cfg, sharding: NamedSharding, packed: bool = False) -> Callable[[int], dict]:
    """step -> the global batch of preference pairs; each process builds only the rows its devices hold."""
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    names = cfg.data.tasks.split(",")
    rows = process_rows(sharding, (cfg.batch_size, cfg.seq_len))

    def get(step: int) -> dict:
        parts = make_pairs(seed=cfg.seed, step=step, rows=rows, seq_len=cfg.seq_len, names=names,
                           tokenizer=tokenizer, packed=packed)
        return {name: global_batch(part, sharding, cfg.batch_size) for name, part in parts.items()}

    return get
