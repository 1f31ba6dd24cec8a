"""The one training loop every objective shares: resume, step, log, checkpoint, stop on preemption or divergence.

The step and the batches are an objective's (a `Task`); the loop jits the step once with the state's
shardings and donates the state. Metrics stay on the device between log steps; the host reads a step's
non-finite count only while the next step runs, so it waits on the accelerator only to log.
"""

import contextlib
import logging
import signal
import time
from collections.abc import Callable
from functools import cache, partial
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from tqdm import tqdm

from llmjax import checkpoint, metrics, runs
from llmjax.train import state as state_lib

log = logging.getLogger("llmjax")


def peak_flops(cfg) -> float:
    """Whole-job peak FLOP/s for MFU: cfg.peak_flops per device, else this machine's measured matmul rate in
    the compute dtype (on the CPU, fake devices share the cores, so the rate counts once per process)."""
    if cfg.peak_flops:
        return cfg.peak_flops * jax.device_count()
    rate = _matmul_rate(cfg.model.compute_dtype)
    return rate * (jax.process_count() if jax.default_backend() == "cpu" else jax.device_count())


@cache
def _matmul_rate(dtype: str) -> float:
    """Measured once a process: a pipeline's or a notebook's runs share the machine, and half a second each."""
    return metrics.matmul_flops_per_s("jax", n=2048, seconds=0.5, dtype=dtype)


def tokens_in(batch: dict) -> int:
    """Input tokens of a batch: every `inputs` array in it (a preference batch holds two per pair)."""
    return sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(batch)
               if getattr(path[-1], "key", None) == "inputs")


class _Preemption:
    """SIGTERM on a single process, or the multi-host preemption sync point, asks the loop to save and stop."""

    def __init__(self, mngr):
        self.mngr, self.flag = mngr, False
        if jax.process_count() == 1:
            self.previous = signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_):
        self.flag = True

    def __call__(self, step: int) -> bool:
        return self.flag or self.mngr.reached_preemption(step)

    def close(self):
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self.previous)


class Diverged(RuntimeError):
    """optim.max_nonfinite steps in a row had a non-finite loss or gradients (each was skipped)."""


class Task(NamedTuple):
    """What an objective hands the loop. The loop jits `step` once with the state's and batch's shardings,
    the state donated, and asks `source` for each step's batch; it never asks which objective it runs."""

    step: Callable  # step(state, batch, *frozen) -> (state, metrics)
    source: Callable[[state_lib.TrainState, int], tuple[dict, dict]]  # (state, step) -> (batch, its metrics)
    batch_sharding: NamedSharding
    start: Callable[[], state_lib.TrainState]  # a new run's state (parameters read from cfg.init_from, if any)
    abstract: state_lib.TrainState  # the state's shapes and shardings: what a checkpoint resumes onto
    parts: dict[str, tuple[str, ...]]  # what the parameters hold, for runs that start from this one
    flops_per_token: float  # model FLOPs per input token of a step, everything the step and source compute
    evaluate: Callable[[dict], dict[str, float]] | None = None  # params -> held-out metrics
    frozen: tuple = ()  # step arguments that never change, e.g. a frozen reference model's parameters
    data_iterator: object = None  # a grain iterator behind `source`, saved and restored with the checkpoints
    trainable: dict | None = None  # state.trainable(specs) where some parameters are frozen (LoRA): not saved
    made: str = ""  # the objective's name, recorded in the run's parts.json
    meaning: tuple[str, ...] = ()  # config keys a resumed run must share with the one in its workdir

    def jit_step(self, state_sh: state_lib.TrainState) -> Callable:
        """step(state, batch, *frozen) compiled once with the shardings of its arguments, the state donated."""
        frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        return jax.jit(self.step, in_shardings=(state_sh, self.batch_sharding, *frozen_sh),
                       out_shardings=(state_sh, None), donate_argnums=0)


def _check_finite(m: dict, cfg, step: int) -> None:
    if int(m["bad_steps"]) >= cfg.optim.max_nonfinite:
        raise Diverged(f"{int(m['bad_steps'])} steps in a row up to step {step} had a non-finite loss or gradients "
                       f"and were skipped (optim.max_nonfinite={cfg.optim.max_nonfinite}); the checkpoints hold the "
                       "last good parameters: lower --config.optim.lr, or check the data")


def _start(cfg, workdir: str, task: Task, mngr) -> state_lib.TrainState:
    if mngr.latest_step() is None:
        if cfg.init_from:
            log.info("starting from the parameters of %s", cfg.init_from)
        return task.start()
    log.info("resumed from %s at step %d", workdir, mngr.latest_step())
    saved = checkpoint.restore(mngr, state_lib.kept(task.abstract, task.trainable), data_iterator=task.data_iterator)
    return saved if task.trainable is None else state_lib.resumed(saved, task.start(), task.trainable)


def _row(fetched: list[dict], seconds: float, compiled: bool, tokens: int, flops_per_token: float,
         peak: float) -> dict[str, float]:
    """One log row: the mean of each metric over the steps since the last row (of a `data/` one, running totals
    of the data read, the last), and their speed (the first step after a start compiles, so it reports the
    compile time instead)."""
    row = {k: float(fetched[-1][k] if k.startswith("data/") else np.mean([m[k] for m in fetched])) for k in fetched[0]}
    if compiled:
        return row | {"compile_s": seconds}
    tokens_per_s = tokens * len(fetched) / seconds
    return row | {"tokens_per_s": tokens_per_s, "mfu": metrics.mfu(tokens_per_s, flops_per_token, peak)}


def run(cfg, workdir: str, task: Task) -> state_lib.TrainState:
    """Trains to cfg.steps from the latest checkpoint in `workdir`, else from task.start(), holding the workdir's
    lock. Stops with Diverged after optim.max_nonfinite skipped steps in a row, saving nothing more; a disk that
    fills during a save stops it with one line (a LlmjaxError)."""
    runs.check_workdir(workdir, cfg, task.meaning)  # before the lock: a refused run writes nothing
    with runs.locked(workdir):
        runs.claim_workdir(workdir, cfg, task.parts, task.made, task.meaning)
        mngr = checkpoint.manager(workdir, cfg)
        try:
            return _train(cfg, workdir, task, mngr)
        except Exception as e:
            if (full := checkpoint.disk_full(e, workdir)) is None:
                raise
            raise full from None
        finally:
            with contextlib.suppress(Exception):  # a failed save raises again on close; it was reported above
                mngr.close()


def _train(cfg, workdir: str, task: Task, mngr) -> state_lib.TrainState:
    state = _start(cfg, workdir, task, mngr)
    saved = partial(state_lib.kept, mask=task.trainable)
    start = int(state.step)
    step_fn = task.jit_step(jax.tree.map(lambda x: x.sharding, state))
    peak = peak_flops(cfg)
    preempted = _Preemption(mngr)
    pending, last, t_last = [], None, time.perf_counter()
    writer = metrics.MetricsWriter(workdir, enabled=jax.process_index() == 0, resumed_at=start)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=jax.process_index() != 0,
               dynamic_ncols=True)
    try:
        for step in range(start, cfg.steps):
            if preempted(step):
                log.warning("preempted at step %d: saving and stopping", step)
                break
            try:
                batch, made = task.source(state, step)
            except StopIteration as e:  # a source with a finite number of epochs
                log.warning("the data ran out at step %d: saving and stopping (%s)", step, e)
                break
            state, m = step_fn(state, batch, *task.frozen)
            if last is not None:  # the previous step's verdict, read while this one runs
                _check_finite(last, cfg, step)
            last = m
            pending.append(m | made)
            done = step + 1
            if done % cfg.checkpoint.every == 0:
                _check_finite(m, cfg, done)
                checkpoint.check_space(mngr, workdir, saved(state), done)
                checkpoint.save(mngr, done, saved(state), task.data_iterator)
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps or done == start + 1:
                fetched = jax.device_get(pending)  # first: timed to when the steps finished, not were dispatched
                now = time.perf_counter()
                row = _row(fetched, now - t_last, done == start + 1, tokens_in(batch), task.flops_per_token, peak)
                writer.write(done, row)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "tokens_per_s", "mfu") if k in row})
                log.info("step %d: %s", done, " ".join(f"{k}={v:.4g}" for k, v in row.items()))
                pending, t_last = [], now
            if task.evaluate and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                row = {f"eval/{k}": v for k, v in task.evaluate(state.params).items()}
                writer.write(done, row)
                log.info("eval at step %d: %s", done, " ".join(f"{k}={v:.4g}" for k, v in row.items()))
                t_last = time.perf_counter()  # evaluation time is not training time
        if last is not None:
            _check_finite(last, cfg, int(state.step))
        if mngr.latest_step() != int(state.step):
            checkpoint.check_space(mngr, workdir, saved(state), int(state.step))
            checkpoint.save(mngr, int(state.step), saved(state), task.data_iterator)
        mngr.wait_until_finished()
    finally:
        preempted.close()
        bar.close()
        writer.close()
    return state
