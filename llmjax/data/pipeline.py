"""Training batches from a real corpus with grain: shuffle, shard by process, tokenize, pack, batch.

    records -> shuffle(seed, reshuffled each epoch) -> repeat(epochs) -> [process_index::process_count]
            -> render to (tokens, weights) and split into row-sized chunks -> first-fit pack -> batch

Batches have synthetic.make_batch's keys, dtypes and meaning, so every trainer takes either. Each process
reads only its own records; the iterator's `get_state()` is a small JSON-serialisable dict (record indices
and counters, never buffered tokens) from which `set_state` resumes exactly, the next batch being the one the
uninterrupted iterator would have produced. `grain.checkpoint.CheckpointSave(iterator)` writes it into an
orbax checkpoint, one file per process.

A document longer than a row (seq_len + 1 tokens) is split into chunks of at most a row that overlap by one
token: each chunk's first token is context only, so every target of the document is predicted exactly once
and none is lost at a cut. Positions restart at 0 in each chunk, as attention never crosses segments.
"""

from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from llmjax.data import chat, sources
from llmjax.data.tokenizer import Tokenizer, get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.sharding import global_batch

Record = dict[str, Any]
Document = dict[str, np.ndarray]  # "tokens" (int32) and "weights" (float32, each token's weight as a target)
FIELDS = {"text": ("text",), "chat": ("prompt", "response")}  # what each data.format reads of a record
FORMATS = tuple(FIELDS)


def _str(value: str | bytes) -> str:
    """tfds data sources give text features as UTF-8 bytes."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def render(record: Record, tokenizer: Tokenizer, format: str) -> Document:
    """A record's tokens and target weights: text as bos..eos with every target weighted, chat through the
    chat template (loss on the response alone)."""
    if format == "text":
        ids = tokenizer.encode(_str(record["text"]), bos=True, eos=True)
        weights = [0.0] + [1.0] * (len(ids) - 1)
    else:
        ids, weights = chat.render(tokenizer, _str(record["prompt"]), _str(record["response"]))
    return {"tokens": np.asarray(ids, np.int32), "weights": np.asarray(weights, np.float32)}


def split(doc: Document, length: int, truncate: bool = False) -> list[Document]:
    """Chunks of at most `length` tokens, consecutive ones sharing one token (see the module docstring);
    with `truncate`, only the first chunk.

    Each chunk's first weight is 0: in a packed row the target at that token's place is predicted from the
    previous segment's last token, which must not count.
    """
    n = len(doc["tokens"])
    starts = [0] if truncate else range(0, max(n - 1, 1), length - 1)
    chunks = [{k: v[s:s + length].copy() for k, v in doc.items()} for s in starts]
    for c in chunks:
        c["weights"][0] = 0.0
    return chunks


class _Flatten(grain.experimental.FlatMapTransform):
    """Emits the chunks a record was split into (by the map before it), one element each."""

    max_fan_out = 1  # only a MapDataset flat map reads it; ours runs on an IterDataset, where fan-out is free

    def flat_map(self, element: list[Document]) -> list[Document]:
        return element


def to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed rows of seq_len + 1 tokens -> make_batch's layout: the targets are the inputs shifted by one (the
    packing's other fields are dropped)."""
    tokens, weights = packed["tokens"], packed["weights"]
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": packed["tokens_segment_ids"][:, :-1],
        "positions": packed["tokens_positions"][:, :-1],
        "loss_mask": weights[:, 1:],
    }


def _checked(source: Sequence[Record], format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; valid choices: {list(FORMATS)}")
    if not len(source):
        raise ValueError("the data source holds no records")
    missing = [k for k in FIELDS[format] if k not in source[0]]
    if missing:
        raise LlmjaxError(f"data.format={format!r} reads {', '.join(FIELDS[format])} but the records hold "
                          f"{', '.join(sorted(source[0]))}; set --config.data.format to match the data")


def rows(
    source: Sequence[Record], *, tokenizer: Tokenizer, seq_len: int, rows: int, process_index: int = 0,
    process_count: int = 1, seed: int = 0, format: str = "text", epochs: int | None = None, truncate: bool = False,
    shuffle: bool = True,
) -> grain.IterDataset:
    """This process's packed rows of seq_len + 1 tokens, one at a time, `rows` packed together: dicts of "tokens",
    "weights", "tokens_segment_ids", "tokens_positions" and "epoch" (each token's record's position in the repeated
    source, in epochs: a record's first token reads 1.25 in the second epoch's first quarter; 0 on padding).
    `shuffle=False` reads records in order (a source that is random already, as the synthetic tasks are)."""
    _checked(source, format)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    length, n = seq_len + 1, len(source)
    records = grain.MapDataset.source(source)
    records = (records.shuffle(seed=seed) if shuffle else records).repeat(epochs)[process_index::process_count]

    def document(i: int, record: Record) -> list[Document]:
        doc = render(record, tokenizer, format)
        progress = (i * process_count + process_index + 1) / n
        return split(doc | {"epoch": np.full(len(doc["tokens"]), progress, np.float32)}, length, truncate)

    # Tokenizing in grain's reader threads only adds overhead: the tokenizers hold the GIL (measured 2-5x slower).
    docs = records.map_with_index(document).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return grain.experimental.FirstFitPackIterDataset(
        grain.experimental.FlatMapIterDataset(docs, _Flatten()),
        length_struct={"tokens": length, "weights": length, "epoch": length}, num_packing_bins=rows,
        shuffle_bins=False, padding_struct={"tokens": tokenizer.pad_id, "weights": 0.0, "epoch": 0.0})


def make_iterator(
    source: Sequence[Record], *, tokenizer: Tokenizer, seq_len: int, batch_size: int, process_index: int = 0,
    process_count: int = 1, seed: int = 0, format: str = "text", epochs: int | None = None, truncate: bool = False,
) -> grain.DatasetIterator:
    """An iterator of this process's rows of each global batch: dicts of [batch_size // process_count, seq_len]
    numpy arrays "inputs", "targets", "segment_ids" (from 1; 0 is padding), "positions" (from 0 in each
    document or chunk) and "loss_mask" (0 on padding and across documents).

    `source` is any random-access sequence of records (a list of dicts, a grain or tfds data source): "text"
    reads record["text"], "chat" record["prompt"] and record["response"]. Processes read disjoint records
    whose union, over the run, is every epoch in full. `epochs=None` repeats forever; with a finite number
    the last incomplete batch is dropped and processes may yield different numbers of batches, so multi-process
    training should repeat forever and stop at a step count. `truncate` keeps only the first seq_len + 1 tokens of a
    long document instead of splitting it.

    A batch's rows are packed together first-fit: a document goes into the first row with room for it, and the
    batch is complete when the next document fits in none of them.
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
    local = batch_size // process_count
    packed = rows(source, tokenizer=tokenizer, seq_len=seq_len, rows=local, process_index=process_index,
                  process_count=process_count, seed=seed, format=format, epochs=epochs, truncate=truncate)
    # No prefetch thread: jax dispatches steps asynchronously, so the next batch is built while the device computes.
    return iter(packed.batch(local, drop_remainder=True).map(to_batch))


def train_records(cfg) -> sources.Records:
    """The train split of cfg.data.source (files:PATH, with its held-out fraction, or tfds:NAME), its SFT records
    with empty responses counted (warned, or refused when all are)."""
    records = sources.for_run(cfg, "train")
    if cfg.data.format == "chat":
        sources.check_degenerate(records, cfg.data.source, "have an empty response (only its eos is learnt)",
                                 "give each prompt a response")
    return records


def _iterator(cfg, split: str) -> grain.DatasetIterator:
    """This process's batches of `split` of cfg.data.source. Whatever is wrong with the input is one LlmjaxError."""
    records = train_records(cfg) if split == "train" else sources.for_run(cfg, split)
    return make_iterator(records, tokenizer=get_tokenizer(cfg.data.tokenizer), seq_len=cfg.seq_len,
                         batch_size=cfg.batch_size, process_index=jax.process_index(),
                         process_count=jax.process_count(), seed=cfg.seed, format=cfg.data.format)


def batches(cfg, sharding: NamedSharding) -> tuple[grain.DatasetIterator, Callable[[int], dict[str, jax.Array]]]:
    """The iterator over the source's train split and step -> global batch. Batches come in order whatever the
    step: resuming restores the iterator from the checkpoint."""
    it = _iterator(cfg, "train")
    return it, lambda step: global_batch(next(it), sharding, cfg.batch_size)


def validation_batches(cfg, sharding: NamedSharding, n: int) -> list[dict[str, jax.Array]]:
    """n global batches of the source's validation split, in a fixed order (repeated if the split is smaller,
    so every process takes the same number of batches)."""
    it = _iterator(cfg, "validation")
    return [global_batch(next(it), sharding, cfg.batch_size) for _ in range(n)]
