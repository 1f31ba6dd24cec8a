"""The loop: a run of non-finite steps stops the run, and the checkpoints keep the last good parameters."""

import os

import jax
import numpy as np
import pytest
from helpers import losses, metric_rows, one_device, tiny_config

from llmjax import checkpoint, runs, sharding
from llmjax.train import loop, registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    """From step 8 on every batch gives an infinite loss: steps 8-10 are skipped, the run stops before it
    saves step 10, and checkpoint 5 restores to exactly the parameters the run had at step 5."""
    cfg = tiny_config(steps=20, log_every=1, **{"optim.max_nonfinite": 3})
    task = registry.task(cfg, str(tmp_path), one_device())

    def poisoned(state, step):
        batch, made = task.source(state, step)
        if step >= 7:
            batch = batch | {"loss_mask": batch["loss_mask"] * np.inf}
        return batch, made

    with pytest.raises(loop.Diverged, match=r"3 steps in a row up to step 10 .*optim.max_nonfinite=3"):
        loop.run(cfg, str(tmp_path), task._replace(source=poisoned))
    mngr = checkpoint.manager(str(tmp_path), cfg)
    assert mngr.all_steps() == [5]
    mngr.close()
    rows = losses(str(tmp_path))
    assert all(np.isfinite(rows[s]) for s in range(1, 8)) and not np.isfinite(rows[8])
    restored = runs.load_params(str(tmp_path), sharding.make_mesh(cfg.mesh))
    cfg.steps = 5
    at_5 = loop.run(cfg, str(tmp_path / "five"), task).params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(at_5))



def test_a_crashed_run_resumes_with_one_row_per_step(tmp_path):
    """A crash after step 7 (checkpoint 5): the rerun replays steps 6 and 7 and their rows are written once."""
    cfg = tiny_config(steps=10, log_every=1)
    task = registry.task(cfg, str(tmp_path), one_device())

    def crashing(state, step):
        if step == 7:
            raise RuntimeError("crash")
        return task.source(state, step)

    with pytest.raises(RuntimeError, match="crash"):
        loop.run(cfg, str(tmp_path), task._replace(source=crashing))
    loop.run(cfg, str(tmp_path), task)
    assert [r["step"] for r in metric_rows(tmp_path) if "loss" in r] == list(range(1, 11))
