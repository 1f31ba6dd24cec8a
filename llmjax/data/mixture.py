"""Training data from several sources at once, sampled by weight, the weights changing over the run: the data
tables of GPT-3 and LLaMA (a share of the tokens per source), and Llama 3's annealing on high-quality data.

    cfg.data.source = "mixture"
    cfg.data.mixture = dict(tasks=dict(source="synthetic"),
                            code=dict(source="files:/usr/lib/python3.11", epochs=2))
    cfg.data.weights = "tasks=0.8, code=0.2"                        # the whole run
    cfg.data.weights = "0: tasks=0.8, code=0.2; 90%: tasks=1"       # stages from a step or a share of the run

A source is `synthetic` (data.tasks), `synthetic:TASK,TASK`, `files:PATH` or `tfds:NAME`, read in its own `format`
(text or chat; default data.format), repeated forever or `epochs` times (then the run stops when it runs out).
Each is tokenized and packed into rows on its own; grain's mix interleaves the rows by weight, so the weights are
shares of the rows (of the tokens, up to padding). A source a stage leaves out weighs 0 there, and resumes where
it stopped when a later stage draws it again.

Every step logs `data/<source>/tokens` (tokens read from it so far; in a multi-process run, process 0's count
times the processes) and `data/<source>/epochs` (how far through its records, 1.5 = halfway through the second
pass; not for the endless synthetic tasks); a source starting another pass says so. All of it, with the stage
and every source's place, is the iterator's state, which each checkpoint saves.

Preference pairs and RL prompts are not packed: their rows are pure functions of the step, and `indexed` mixes
them with grain's MapDataset.mix by their place in the run, under the same weights and stages.
"""

import copy
import logging
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from llmjax.data import pipeline, sources, synthetic, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.sharding import global_batch

log = logging.getLogger("llmjax")

Stage = tuple[int, dict[str, float]]  # (first step, weight of each source drawn in it)
Batches = Callable[[int], tuple[dict[str, jax.Array], dict[str, float]]]  # step -> (global batch, data metrics)
_START = re.compile(r"\s*(\d+)(%?)\s*:(.*)", re.S)
_WEIGHT = re.compile(r"\s*([\w-]+)\s*=\s*([^,]+?)\s*")


def view(cfg, name: str) -> ml_collections.ConfigDict:
    """The run's config as if source `name` of its mixture were its only data.source, so that code reading one
    source (the held-out rows, the records) reads this one."""
    s, out = cfg.data.mixture[name], copy.deepcopy(cfg)
    scheme, _, names = s.source.partition(":")
    out.data.source = "synthetic" if scheme == "synthetic" else s.source
    out.data.tasks = names if scheme == "synthetic" and names else cfg.data.tasks
    out.data.format = s.get("format") or cfg.data.format
    out.data.mixture, out.data.weights = {}, ""
    return out


def synthetic_view(cfg) -> ml_collections.ConfigDict | None:
    """The run's config as if its data were the synthetic tasks its sources draw (all of them, for a mixture),
    whose held-out prompts evaluation answers; None where it reads none."""
    if cfg.data.source != "mixture":
        return cfg if cfg.data.source == "synthetic" else None
    views = [v for v in map(partial(view, cfg), cfg.data.mixture) if v.data.source == "synthetic"]
    if not views:
        return None
    out = views[0]
    out.data.tasks = ",".join(dict.fromkeys(t for v in views for t in v.data.tasks.split(",")))
    return out


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LlmjaxError(f"data.weights: {where}={text!r} is not a number; write e.g. tasks=0.8, code=0.2") from None


def stages(cfg) -> list[Stage]:
    """data.weights as (first step, weights) stages, in order, refused in one line where they name an unknown
    source, weigh one below 0 or all at 0, overlap, leave steps before the first stage, start past the run, or
    never draw a source of the mixture."""
    names, out = list(cfg.data.mixture), []
    parts = [p for p in cfg.data.weights.split(";") if p.strip()]
    if not parts:
        raise LlmjaxError("data.source=mixture with no data.weights; set --config.data.weights='"
                          + ", ".join(f"{n}=1" for n in names) + "' (or the shares you want)")
    for part in parts:
        if m := _START.fullmatch(part):
            start = int(m[1]) * cfg.steps // 100 if m[2] else int(m[1])
            text, at = m[3], f"{m[1]}{m[2]}"
        elif len(parts) == 1:
            start, text, at = 0, part, "0"
        else:
            raise LlmjaxError(f"data.weights stage {part.strip()!r} has no start; begin each stage with its first "
                              "step or share of the run, e.g. '0: tasks=0.8, code=0.2; 90%: tasks=1'")
        weights = {}
        for item in filter(str.strip, text.split(",")):
            if not (w := _WEIGHT.fullmatch(item)):
                raise LlmjaxError(f"data.weights: {item.strip()!r} is not SOURCE=WEIGHT; write e.g. tasks=0.8")
            if w[1] not in names:
                raise LlmjaxError(f"data.weights names {w[1]!r}, which data.mixture does not define; its sources "
                                  f"are {', '.join(names)}")
            weights[w[1]] = _number(w[2], w[1])
            if weights[w[1]] < 0:
                raise LlmjaxError(f"data.weights: {w[1]}={weights[w[1]]} is below 0; a weight is a share >= 0")
        if sum(weights.values()) <= 0:
            raise LlmjaxError(f"data.weights' stage from {at} weighs every source 0; give one a weight > 0")
        out.append((start, {n: w for n, w in weights.items() if w > 0}))
    for (a, _), (b, _), part in zip(out, out[1:], parts[1:], strict=False):
        if b <= a:
            raise LlmjaxError(f"data.weights' stage {part.strip()!r} starts at step {b}, not after the stage before "
                              f"it (step {a}): stages overlap; list them in order of their first steps")
    if out[0][0] != 0:
        raise LlmjaxError(f"data.weights' first stage starts at step {out[0][0]}, so steps 0-{out[0][0] - 1} have no "
                          "weights; start the first stage at 0")
    if out[-1][0] >= cfg.steps:
        raise LlmjaxError(f"data.weights' last stage starts at step {out[-1][0]}, after the run's steps={cfg.steps}; "
                          "start it earlier or raise --config.steps")
    unused = [n for n in names if not any(n in w for _, w in out)]
    if unused:
        raise LlmjaxError(f"data.mixture.{unused[0]} is never drawn: data.weights gives it no weight > 0; give it "
                          "one, or remove it from the mixture")
    return out


def validate(cfg) -> None:
    """The mixture's keys, in one line each (the sources' records are checked as they are opened)."""
    if cfg.data.source != "mixture":
        if cfg.data.mixture or cfg.data.weights:
            raise LlmjaxError(f"data.mixture/data.weights are set but data.source={cfg.data.source!r} reads one "
                              "source; set --config.data.source=mixture to read the mixture, or clear them")
        return
    if not cfg.data.mixture:
        raise LlmjaxError("data.source=mixture but data.mixture defines no source; define them in the config, "
                          "e.g. data.mixture=dict(tasks=dict(source='synthetic'))")
    for name, s in cfg.data.mixture.items():
        unknown = sorted(set(s) - {"source", "format", "epochs"})
        if unknown or "source" not in s:
            raise LlmjaxError(f"data.mixture.{name} has keys {sorted(s)}; a source takes source (required), "
                              "format and epochs")
        scheme, _, rest = s.source.partition(":")
        if scheme not in ("synthetic", "files", "tfds") or (scheme != "synthetic" and not rest):
            raise LlmjaxError(f"data.mixture.{name}.source={s.source!r}: use synthetic[:TASKS], files:PATH or "
                              "tfds:NAME")
        if scheme == "synthetic" and rest:
            tasks.check_names(f"data.mixture.{name}.source", rest)
        if s.get("format", "") not in ("", *pipeline.FORMATS):
            raise LlmjaxError(f"data.mixture.{name}.format={s.format!r} is not one of {pipeline.FORMATS}")
        epochs = s.get("epochs", 0)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise LlmjaxError(f"data.mixture.{name}.epochs={epochs!r}: passes over the source, 0 for endless")
        if epochs and scheme == "synthetic":
            raise LlmjaxError(f"data.mixture.{name}.epochs={epochs}: the synthetic tasks are endless (every "
                              "example is fresh); drop epochs")
    stages(cfg)


class Mixture(grain.DatasetIterator):
    """This process's rows of each step's batch, drawn from the sources by the step's stage (grain's mix), with
    the data metrics of the batches so far. Rows are mixed one at a time, so a batch holds each source's share.
    `sources` yield packed rows (pipeline.rows) that name their source under "source"."""

    def __init__(self, sources: dict[str, grain.IterDataset], schedule: list[Stage], rows: int,
                 endless: set[str], processes: int):
        super().__init__()
        self._sources, self._schedule, self._rows, self._processes = sources, schedule, rows, processes
        self._step, self._stage, self._mix, self._index = 0, -1, None, 0
        self._places = {}  # each source's iterator state where it last stopped
        self._tokens = dict.fromkeys(sources, 0)
        self._epochs = {n: 0.0 for n in sources if n not in endless}

    def _enter(self, stage: int) -> None:
        """Starts the mix of `stage`, each of its sources where it last stopped (and the mix itself where it
        stopped, when a restored run goes on in the stage it saved in)."""
        self._leave()
        weights = self._schedule[stage][1]
        self._mix = grain.IterDataset.mix([self._sources[n] for n in weights], list(weights.values())).__iter__()
        state = self._mix.get_state()
        state["parents"] = [self._places.get(n, p) for n, p in zip(weights, state["parents"], strict=True)]
        state["index"] = self._index if stage == self._stage else 0
        self._mix.set_state(state)
        if stage != self._stage and stage:
            log.info("step %d: data stage %d of %d: %s", self._step, stage + 1, len(self._schedule),
                     ", ".join(f"{n}={w:g}" for n, w in weights.items()))
        self._stage = stage

    def _leave(self) -> None:
        """Notes where the current stage's sources and mix stopped."""
        if self._mix is not None:
            state = self._mix.get_state()
            self._places |= dict(zip(self._schedule[self._stage][1], state["parents"], strict=True))
            self._index = state["index"]

    def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        stage = max(i for i, (start, _) in enumerate(self._schedule) if start <= self._step)
        if self._mix is None or stage != self._stage:
            self._enter(stage)
        try:
            rows = [next(self._mix) for _ in range(self._rows)]
        except StopIteration:
            raise StopIteration(f"a source of data.mixture ran out of records at step {self._step} after its "
                                "epochs; raise its data.mixture.<source>.epochs (0: endless) to train longer") from None
        for row in rows:
            self._account(row)
        self._step += 1
        batch = pipeline.to_batch({k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "source"})
        return batch, self.metrics()

    def _account(self, row: dict) -> None:
        name = row["source"]
        self._tokens[name] += int((row["tokens_segment_ids"][:-1] > 0).sum()) * self._processes
        if name in self._epochs:
            was, now = self._epochs[name], float(row["epoch"].max())
            if np.ceil(now) > np.ceil(was) and was:
                log.info("step %d: data.mixture.%s starts epoch %d (its records are used up)", self._step, name,
                         int(np.ceil(now)))
            self._epochs[name] = max(was, now)

    def metrics(self) -> dict[str, float]:
        """Tokens read from each source so far, and epochs elapsed of each with a finite number of records."""
        out = {f"data/{n}/tokens": float(t) for n, t in self._tokens.items()}
        return out | {f"data/{n}/epochs": e for n, e in self._epochs.items()}

    def get_state(self) -> dict:
        self._leave()
        return {"step": self._step, "stage": self._stage, "index": self._index, "places": dict(self._places),
                "tokens": dict(self._tokens), "epochs": dict(self._epochs)}

    def set_state(self, state: dict) -> None:
        self._step, self._stage, self._index = state["step"], state["stage"], state["index"]
        self._places = dict(state["places"])
        self._tokens = {n: state["tokens"].get(n, 0) for n in self._tokens}
        self._epochs = {n: state["epochs"].get(n, 0.0) for n in self._epochs}
        self._mix = None


def indexed(cfg, per_step: int, items: Callable[[ml_collections.ConfigDict], Callable[[int], Any]]
            ) -> Callable[[int], Any]:
    """Item g of the run (row g % per_step of step g // per_step), drawn from the source that grain's
    MapDataset.mix picks at g under the weights of its step's stage; `items(view)` gives a source's i-th item.
    Each source's items come in order, a source resuming across stages where it stopped. For the objectives whose
    rows are pure functions of their place in the run (preference pairs, RL prompts), which need no iterator."""
    get = {n: _named(n, items, view(cfg, n)) for n in cfg.data.mixture}
    schedule, mixes, offsets, drawn = stages(cfg), [], [], dict.fromkeys(cfg.data.mixture, 0)
    ends = [start for start, _ in schedule[1:]] + [cfg.steps]
    for (start, weights), end in zip(schedule, ends, strict=True):
        tagged = [grain.MapDataset.range(2**40).map(partial(lambda n, i: (n, i), n)) for n in weights]
        mixes.append(grain.MapDataset.mix(tagged, list(weights.values())))
        offsets.append(dict(drawn))
        if end < cfg.steps:  # what this stage draws of each source, where the next one starts it
            for k in range((end - start) * per_step):
                drawn[mixes[-1][k][0]] += 1

    def item(g: int) -> Any:
        stage = max(i for i, (start, _) in enumerate(schedule) if start * per_step <= g)
        name, i = mixes[stage][g - schedule[stage][0] * per_step]
        return get[name](offsets[stage][name] + i)

    return item


def _named(name: str, read: Callable, view_cfg) -> Any:
    """read(view_cfg), a problem with the source refused in one line that names it as the mixture does."""
    try:
        return read(view_cfg)
    except (LlmjaxError, ValueError) as e:
        raise LlmjaxError(f"data.mixture.{name}: {str(e).removeprefix('data.source=')}") from None


def _records(view_cfg) -> synthetic.Records | sources.Records:
    if view_cfg.data.source == "synthetic":
        return synthetic.Records(view_cfg.seed, view_cfg.data.tasks, view_cfg.data.format)
    return pipeline.train_records(view_cfg)


def _mixture(cfg, sharding: NamedSharding) -> tuple[Mixture, Batches]:
    tokenizer, processes = get_tokenizer(cfg.data.tokenizer), jax.process_count()
    local = cfg.batch_size // processes

    def packed(view_cfg, epochs: int) -> grain.IterDataset:
        return pipeline.rows(_records(view_cfg), tokenizer=tokenizer, seq_len=cfg.seq_len, rows=local,
                             process_index=jax.process_index(), process_count=processes, seed=cfg.seed,
                             format=view_cfg.data.format, epochs=epochs or None,
                             shuffle=view_cfg.data.source != "synthetic")

    views = {name: view(cfg, name) for name in cfg.data.mixture}
    rows = {name: _named(name, partial(packed, epochs=cfg.data.mixture[name].get("epochs")), v).map(
        partial(lambda name, row: row | {"source": name}, name)) for name, v in views.items()}
    endless = {name for name, v in views.items() if v.data.source == "synthetic"}
    it = Mixture(rows, stages(cfg), local, endless, processes)

    def get(step: int) -> tuple[dict[str, jax.Array], dict[str, float]]:
        batch, metrics = next(it)
        return global_batch(batch, sharding, cfg.batch_size), metrics

    return it, get


def batches(cfg, sharding: NamedSharding) -> tuple[grain.DatasetIterator | None, Batches]:
    """The run's training batches from data.source (the synthetic tasks, one files: or tfds: source, or a
    mixture): the grain iterator to checkpoint (None where a batch is a pure function of the step), and
    step -> (global batch, data metrics)."""
    if cfg.data.source == "mixture":
        return _mixture(cfg, sharding)
    if cfg.data.source == "synthetic":
        get = synthetic.batches(cfg, sharding)
        return None, lambda step: (get(step), {})
    it, get = pipeline.batches(cfg, sharding)
    return it, lambda step: (get(step), {})


def held_out(cfg, sharding: NamedSharding, n: int) -> dict[str, list[dict[str, jax.Array]]]:
    """n held-out global batches of each source, by name ("" for a run of one source): fresh synthetic rows
    (a seed training never uses), or a files: or tfds: source's validation split."""
    if cfg.data.source == "mixture":
        return {name: held_out(view(cfg, name), sharding, n)[""] for name in cfg.data.mixture}
    if cfg.data.source == "synthetic":
        get = synthetic.batches(cfg, sharding, seed=cfg.seed + synthetic.HELD_OUT)
        return {"": [get(i) for i in range(n)]}
    return {"": pipeline.validation_batches(cfg, sharding, n)}
