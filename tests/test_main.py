"""The training entry point `python -m llmjax.main`: the README's default run learns, and a run that diverges
exits with status 1 and keeps its good checkpoints."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import losses, metric_rows, tiny_config

from llmjax import checkpoint, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """The README's default command, cut to 25 steps, on the one CPU device a user has."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-m", "llmjax.main", "--config=configs/pretrain.py:steps=25",
                    "--config.eval_prompts=16", f"--workdir={tmp_path}"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)
    loss = losses(str(tmp_path))
    assert loss[25] < 0.55 * loss[1], loss  # measured 5.76 -> 2.46
    evals = [row for row in metric_rows(tmp_path) if "eval/perplexity" in row]
    assert [row["step"] for row in evals] == [25] and 0 <= evals[0]["eval/accuracy"] <= 1


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
