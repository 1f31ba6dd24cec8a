"""SFT: prompts carry no loss, records with empty responses are counted (all of them: refused), and a short run
learns the chat format."""

import json
import logging
import re

import jax
import numpy as np
import pytest
from helpers import metric_rows, one_device, tiny_config

from llmjax import config, sharding
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


def files_config(tmp_path, responses: list[str]):
    """SFT on a files: source of one record per response."""
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "s.jsonl").write_text("".join(json.dumps({"prompt": f"sort {i} = ", "response": r}) + "\n"
                                            for i, r in enumerate(responses)))
    return sft_config(**{"data.source": f"files:{folder}", "data.data_dir": str(tmp_path / "tfds"),
                         "data.validation": 0.0})


def test_empty_responses_are_counted_and_warned(tmp_path, caplog):
    """An empty response teaches only its eos: the run says how many records have one."""
    with caplog.at_level(logging.WARNING, logger="llmjax"):
        registry.task(files_config(tmp_path, ["", "12", " \n", "21", "123", "321"]), "")
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmjax" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and re.search(r"data.source='files:.*': 2 of 6 records have an empty response "
                                            r"\(only its eos is learnt\); they train on nothing", warnings[0])


def test_only_empty_responses_are_refused(tmp_path):
    with pytest.raises(config.LlmjaxError, match=r"all 3 records have an empty response .* learns nothing; give each "
                                                 r"prompt a response$"):
        registry.task(files_config(tmp_path, ["", " ", ""]), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def sft_run(sft_dir):
    """The session's short SFT run from scratch on one task (tests/conftest.py), with its evaluation at the end,
    and a fresh model's evaluation."""
    cfg = sft_config(seq_len=64, batch_size=8)
    mesh = one_device()  # sft_dir's mesh: its evaluator is compiled already
    before = make_evaluator(cfg, mesh, n=32)(registry.task(cfg, "", mesh).start().params)
    after = [row for row in metric_rows(sft_dir) if "eval/accuracy" in row][-1]
    return sft_dir, before, after


def test_sft_learns(sft_run):
    _, before, after = sft_run
    assert before["accuracy"] == 0.0
    assert after["eval/accuracy"] >= 0.25, after  # measured 0.31 (0 before)
    assert after["eval/perplexity"] < before["perplexity"] / 2
