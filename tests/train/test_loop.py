"""The loop: a run of non-finite steps stops the run, and the checkpoints keep the last good parameters."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import losses, tiny_config

from llmjax import checkpoint, sharding
from llmjax.train import loop, registry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    """From step 8 on every batch gives an infinite loss: steps 8-10 are skipped, the run stops before it
    saves step 10, and checkpoint 5 restores to exactly the parameters the run had at step 5."""
    cfg = tiny_config(steps=20, log_every=1, **{"optim.max_nonfinite": 3})
    task = registry.task(cfg, str(tmp_path))

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
    restored = checkpoint.load_params(str(tmp_path), sharding.make_mesh(cfg.mesh))
    cfg.steps = 5
    at_5 = loop.run(cfg, str(tmp_path / "five"), task).params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(at_5))


@pytest.mark.slow
def test_diverging_cli_run_exits_nonzero_and_keeps_checkpoints(tmp_path):
    """The issue's scenario: a finished run resumed at lr 1e6 goes non-finite; it stops with exit status 1 and one
    line, and the good checkpoint is still there and loadable."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    base = [sys.executable, "-m", "llmjax.main", "--config=configs/pretrain.py:model=tiny,steps=4",
            "--config.batch_size=8", "--config.seq_len=32", "--config.eval_every=0", "--config.checkpoint.every=4",
            "--config.peak_flops=1e12", f"--workdir={tmp_path}"]
    subprocess.run(base, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    out = subprocess.run([*base, "--config.steps=40", "--config.optim.lr=1e6", "--config.optim.warmup_steps=0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "training stopped:" in out.stderr and "optim.max_nonfinite=5" in out.stderr
    mngr = checkpoint.manager(str(tmp_path), tiny_config())
    assert mngr.latest_step() in (4, 8, 12, 16, 20, 24, 28, 32, 36)
    mngr.close()
    params = checkpoint.load_params(str(tmp_path), sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1)))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))
