"""The one training loop every objective shares: resume, step, log, checkpoint, stop cleanly on preemption.

The step itself is the caller's (`step(state, batch) -> (state, metrics)`); the loop jits it once with the
state's shardings and donates the state. Metrics stay on the device between log steps, so the host never
waits on the accelerator except to log.
"""

import logging
import signal
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from llmjax import checkpoint, metrics
from llmjax.train import state as state_lib

log = logging.getLogger("llmjax")


def peak_flops(cfg) -> float:
    """Whole-job peak FLOP/s for MFU: cfg.peak_flops per device, else this machine's measured matmul rate in
    the compute dtype (on the CPU, fake devices share the cores, so the rate counts once per process)."""
    if cfg.peak_flops:
        return cfg.peak_flops * jax.device_count()
    rate = metrics.matmul_flops_per_s("jax", n=2048, seconds=0.5, dtype=cfg.model.compute_dtype)
    return rate * (jax.process_count() if jax.default_backend() == "cpu" else jax.device_count())


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


class Task(NamedTuple):
    """What a trainer hands the loop: its mesh, optimizer, step function, batches and FLOPs per token."""

    mesh: Mesh
    tx: optax.GradientTransformation
    step: Callable
    batches: Callable[[int], dict]
    batch_sharding: NamedSharding
    flops_per_token: float
    evaluate: Callable[[dict], dict[str, float]] | None = None  # params -> held-out metrics
    frozen: tuple = ()  # extra step arguments that never change, e.g. a frozen reference model's parameters
    data_iterator: object = None  # a grain iterator behind `batches`, saved and restored with the checkpoints
    rollout: Callable | None = None  # (state, batch, step) -> (batch, metrics): experience of the policy (PPO)
    init_params: Callable | None = None  # () -> the state a fresh run starts from (default: cfg.init_from's)

    def jit_step(self, state_sh: state_lib.TrainState) -> Callable:
        """step(state, batch, *frozen) compiled once with the shardings of its arguments, the state donated."""
        frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        return jax.jit(self.step, in_shardings=(state_sh, self.batch_sharding, *frozen_sh),
                       out_shardings=(state_sh, None), donate_argnums=0)


def run(cfg, workdir: str, task: Task) -> state_lib.TrainState:
    """Trains to cfg.steps from the latest checkpoint in `workdir`, else from the parameters of the run in
    cfg.init_from, else from scratch."""
    checkpoint.claim_workdir(workdir, cfg)
    mngr = checkpoint.manager(workdir, cfg)
    if mngr.latest_step() is None and task.init_params:
        state = task.init_params()
    elif mngr.latest_step() is None and cfg.init_from:
        params = checkpoint.load_params(cfg.init_from, task.mesh, cfg.model, cfg.data.tokenizer)
        state = state_lib.from_params(cfg, task.mesh, task.tx, params)
        log.info("starting from the parameters of %s", cfg.init_from)
    elif mngr.latest_step() is None:
        state = state_lib.create(cfg, task.mesh, task.tx)
    else:
        state = checkpoint.restore(mngr, state_lib.abstract(cfg, task.mesh, task.tx), data_iterator=task.data_iterator)
        log.info("resumed from %s at step %d", workdir, mngr.latest_step())
    start = int(state.step)
    step_fn = task.jit_step(jax.tree.map(lambda x: x.sharding, state))
    peak = peak_flops(cfg)
    preempted = _Preemption(mngr)
    pending, t_last = [], time.perf_counter()
    writer = metrics.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=jax.process_index() != 0,
               dynamic_ncols=True)
    try:
        for step in range(start, cfg.steps):
            if preempted(step):
                log.warning("preempted at step %d: saving and stopping", step)
                break
            batch = task.batches(step)
            experience = {}
            if task.rollout:
                batch, experience = task.rollout(state, batch, step)
            state, m = step_fn(state, batch, *task.frozen)
            m |= experience
            pending.append(m)
            done = step + 1
            if done % cfg.checkpoint.every == 0:
                checkpoint.save(mngr, done, state, task.data_iterator)
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps or done == start + 1:
                fetched = jax.device_get(pending)
                row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                now = time.perf_counter()
                if done == start + 1:  # the first step includes compilation
                    row["compile_s"] = now - t_last
                else:
                    row["tokens_per_s"] = tokens_in(batch) * len(pending) / (now - t_last)
                    row["mfu"] = metrics.mfu(row["tokens_per_s"], task.flops_per_token, peak)
                writer.write(done, row)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "tokens_per_s", "mfu") if k in row})
                log.info("step %d: %s", done, " ".join(f"{k}={v:.4g}" for k, v in row.items()))
                pending, t_last = [], now
            if task.evaluate and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                row = {f"eval/{k}": v for k, v in task.evaluate(state.params).items()}
                writer.write(done, row)
                log.info("eval at step %d: %s", done, " ".join(f"{k}={v:.4g}" for k, v in row.items()))
                t_last = time.perf_counter()  # evaluation time is not training time
        if mngr.latest_step() != int(state.step):
            checkpoint.save(mngr, int(state.step), state, task.data_iterator)
        mngr.wait_until_finished()
    finally:
        preempted.close()
        bar.close()
        writer.close()
        mngr.close()
    return state
