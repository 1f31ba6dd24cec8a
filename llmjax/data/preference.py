"""Preference data for reward models and DPO: a prompt with responses ranked best first.

From the synthetic tasks a correct answer beats a wrong one of some kind (tasks.NEGATIVES; with more responses,
each further corruption of it ranks lower); from a files:PATH / tfds:NAME source, the preference records of
llmjax.data.sources ({"prompt", "responses"}). Two sources `mix` row by row. Row r of step s is a pure function of
(seed, s, r) (a files source is read in a seeded shuffle of its records, epoch after epoch; each random choice has
its own stream), so runs resume exactly and each process builds only its own rows.

Layouts, every sequence through the chat template with its loss mask on the response (and eos) only:
  ranked   {"responses": rows [B, C, T]}: C responses per prompt; a record with fewer leaves empty rows
  pairs    {"chosen": rows, "rejected": rows} [B, T]: the best and the worst response (DPO)
  packed   {"packed": rows [B, T]}: chosen as segment 1 and rejected as segment 2 of one row
"""

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
from jax.sharding import NamedSharding

from llmjax.data import chat, mixture, sources, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.sharding import global_batch, process_rows

KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
Ranked = Callable[[int, int], tuple[str, list[str]]]  # (step, row) -> (prompt, responses best first)


def fill(row: dict[str, np.ndarray], start: int, ids: list[int], weights: list[float], segment: int) -> int:
    """Writes one rendered sequence into `row` from `start` (next-token layout); returns where it ends."""
    n = len(ids) - 1
    if start + n > row["inputs"].shape[-1]:
        raise LlmjaxError(f"a preference sequence of {n} tokens does not fit seq_len={row['inputs'].shape[-1]}; "
                          "raise --config.seq_len")
    end = start + n
    row["inputs"][start:end], row["targets"][start:end] = ids[:-1], ids[1:]
    row["loss_mask"][start:end], row["segment_ids"][start:end] = weights[1:], segment
    row["positions"][start:end] = np.arange(n)
    return end


def render(tokenizer, prompt: str, response: str, eos_input: bool = False) -> tuple[list[int], list[float]]:
    """A response through the chat template; eos_input feeds its eos as an input too (a reward model reading
    its score at the eos), ending the sequence there (a template may write more after eos, e.g. ChatML's newline)."""
    ids, weights = chat.render(tokenizer, prompt, response)
    if not eos_input:
        return ids, weights
    end = len(weights) - weights[::-1].index(1.0)  # after the answer's eos, its last weighted token
    return ids[:end] + [tokenizer.eos_id], weights[:end] + [1.0]


def empty(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    out = {k: np.zeros(shape, np.int32) for k in KEYS}
    out["loss_mask"] = out["loss_mask"].astype(np.float32)
    return out


# Streams of a row's random choices besides its example's: the same rows draw the same prompts whatever is mixed.
KIND_STREAM, MIX_STREAM = 1, 2


def synthetic(seed: int, names: Sequence[str], k: int, negatives: Sequence[str] = ("corrupt",)) -> Ranked:
    """The correct answer, then a wrong answer of a kind drawn uniformly from `negatives` (tasks.NEGATIVES), then
    (k > 2) accumulated corruptions of that one, each a wrong answer not seen before in the list: the list ranks
    answers by how far they are from the right one, as no order among wrong answers of different prompts or
    arrangements would mean anything."""
    def ranked(step: int, r: int) -> tuple[str, list[str]]:
        rng = np.random.default_rng([seed, step, r])
        example = tasks.sample(rng, names)
        kind = negatives[np.random.default_rng([seed, step, r, KIND_STREAM]).integers(len(negatives))]
        check = tasks.get(example.task).check
        responses = [example.answer]
        while len(responses) < k:
            wrong = tasks.NEGATIVES[kind] if len(responses) == 1 else tasks.corrupt
            worse = wrong(tasks.Example(example.task, example.prompt, responses[-1]), rng)
            if not check(example.prompt, worse) and worse not in responses:
                responses.append(worse)
        return example.prompt, responses

    return ranked


def mix(ranked: Ranked, other: Ranked, fraction: float, seed: int) -> Ranked:
    """Each row from `other` with probability `fraction` (else from `ranked`), drawn from the row's own stream:
    about that share of every batch, the same rows on every resume."""
    def mixed(step: int, r: int) -> tuple[str, list[str]]:
        take = np.random.default_rng([seed, step, r, MIX_STREAM]).random() < fraction
        return (other if take else ranked)(step, r)

    return mixed


def from_records(records: Sequence[dict], seed: int, batch_size: int) -> Ranked:
    """Preference records in a seeded shuffle, reshuffled each epoch; global row g of the run is record
    perm_epoch[g mod N]."""
    n = len(records)

    def ranked(step: int, r: int) -> tuple[str, list[str]]:
        epoch, i = divmod(step * batch_size + r, n)
        record = records[int(np.random.default_rng([seed, epoch]).permutation(n)[i])]
        return record["prompt"], list(record["responses"])

    return ranked


def make(ranked: Ranked, *, step: int, rows: range, seq_len: int, tokenizer, layout: str = "pairs", k: int = 2,
         eos_input: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """One step's rows of this process in `layout` (ranked, pairs or packed; see the module docstring)."""
    n = len(rows)
    parts = {"ranked": {"responses": empty((n, k, seq_len))}, "packed": {"packed": empty((n, seq_len))},
             "pairs": {"chosen": empty((n, seq_len)), "rejected": empty((n, seq_len))}}[layout]
    for i, r in enumerate(rows):
        prompt, responses = ranked(step, r)
        rendered = [render(tokenizer, prompt, response, eos_input) for response in responses]
        if layout == "ranked":
            if len(rendered) > k:
                raise LlmjaxError(f"a record ranks {len(rendered)} responses but reward.responses={k}; raise it")
            for j, seq in enumerate(rendered):
                fill({key: v[i, j] for key, v in parts["responses"].items()}, 0, *seq, segment=1)
        elif layout == "packed":
            row = {key: v[i] for key, v in parts["packed"].items()}
            fill(row, fill(row, 0, *rendered[0], segment=1), *rendered[-1], segment=2)
        else:
            fill({key: v[i] for key, v in parts["chosen"].items()}, 0, *rendered[0], segment=1)
            fill({key: v[i] for key, v in parts["rejected"].items()}, 0, *rendered[-1], segment=1)
    return parts


def source(cfg, split: str = "train", seed_offset: int = 0, k: int = 2, negatives: Sequence[str] = ("corrupt",)
           ) -> Ranked:
    """cfg.data.source's ranked responses: the synthetic tasks (wrong answers of the kinds `negatives`), a
    files/tfds source's preference records (its `split`: train, or validation for held-out metrics), or a mixture
    of them (llmjax.data.mixture.indexed: row r of step s is the mix's item s * batch_size + r)."""
    seed = cfg.seed + seed_offset
    if cfg.data.source == "mixture":
        item = mixture.indexed(cfg, cfg.batch_size, lambda view: partial(source(view, split, seed_offset, k,
                                                                                 negatives), 0))
        return lambda step, r: item(step * cfg.batch_size + r)
    if cfg.data.source == "synthetic":
        return synthetic(seed, cfg.data.tasks.split(","), k, negatives)
    records = sources.for_run(cfg, split, kind="preference")
    if "responses" not in records[0]:
        raise LlmjaxError(f"data.source={cfg.data.source!r} holds no preference records (prompt, chosen, rejected "
                          "or responses); point it at preference data")
    if split == "train":
        sources.check_degenerate(records, cfg.data.source, "have the same best and worst response (chosen == "
                                 "rejected)", "give pairs whose chosen and rejected responses differ")
    return from_records(records, seed, cfg.batch_size)


def batches(cfg, sharding: NamedSharding, ranked: Ranked, layout: str = "pairs", k: int = 2,
            eos_input: bool = False) -> Callable[[int], dict]:
    """step -> the global batch; each process builds only the rows its devices hold."""
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    rows = process_rows(sharding, (cfg.batch_size, cfg.seq_len))

    def get(step: int) -> dict:
        parts = make(ranked, step=step, rows=rows, seq_len=cfg.seq_len, tokenizer=tokenizer, layout=layout, k=k,
                     eos_input=eos_input)
        return {name: global_batch(part, sharding, cfg.batch_size) for name, part in parts.items()}

    return get
