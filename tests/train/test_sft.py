"""SFT: prompts carry no loss, and a short run learns the chat format."""

import jax
import numpy as np
import pytest
from helpers import metric_rows, tiny_config

from llmjax import sharding
from llmjax.evaluate import make_evaluator
from llmjax.train import pretrain, registry


def sft_config(**overrides):
    return tiny_config(**{"data.format": "chat", "data.tasks": "sort", "seq_len": 128, "batch_size": 16,
                          "optim.lr": 3e-3, **overrides})


def test_prompt_targets_carry_no_loss():
    """Changing every target the mask leaves out (prompts, template tokens, across packed examples) changes
    nothing; changing one response target changes the loss."""
    cfg = sft_config()
    task = registry.task(cfg, "")
    params = task.start().params
    batch = jax.device_get(task.source(None, 0)[0])
    assert (batch["segment_ids"].max(axis=1) > 1).all()  # several examples packed per row
    loss = jax.jit(lambda b: pretrain.loss_fn(params, b, cfg, sharding.no_constrain)[0])
    masked_out = batch | {"targets": np.where(batch["loss_mask"] == 0, 7, batch["targets"])}
    assert float(loss(masked_out)) == float(loss(batch))
    r, t = np.argwhere(batch["loss_mask"] == 1)[0]
    changed = batch["targets"].copy()
    changed[r, t] = (changed[r, t] + 1) % 262
    assert float(loss(batch | {"targets": changed})) != float(loss(batch))


@pytest.fixture(scope="module")
def sft_run(sft_dir):
    """The session's short SFT run from scratch on one task (tests/conftest.py), with its evaluation at the end,
    and a fresh model's evaluation."""
    cfg = sft_config(seq_len=64, batch_size=8)
    mesh = sharding.make_mesh(cfg.mesh)
    before = make_evaluator(cfg, mesh, n=32)(registry.task(cfg, "", mesh).start().params)
    after = [row for row in metric_rows(sft_dir) if "eval/accuracy" in row][-1]
    return sft_dir, before, after


def test_sft_learns(sft_run):
    _, before, after = sft_run
    assert before["accuracy"] == 0.0
    assert after["eval/accuracy"] >= 0.25, after  # measured 0.31 (0 before)
    assert after["eval/perplexity"] < before["perplexity"] / 2
