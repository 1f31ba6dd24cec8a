"""Runs: a workdir refuses a run that would misread it, and a second live run; a part of a run's parameters is read
alone, checked against the reader's model and tokenizer; a LoRA run's base is resolved down a chain of LoRA runs."""

import errno
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import assert_same_values, file_bytes, ppo_config, reward_config, saved_run, tiny_config

from llmjax import config, runs
from llmjax.models import lora
from llmjax.sharding import make_mesh
from llmjax.train import registry


@pytest.mark.xdist_group("checkpoint_run")
def test_claim_refuses_a_different_model(step5_run):
    workdir, *_ = step5_run
    before = file_bytes(workdir)
    other = tiny_config(**{"model.d_model": 32, "model.n_layers": 3})
    with pytest.raises(config.LlmjaxError, match=r"\(model.d_model, model.n_layers differ\); pass a new --workdir"):
        runs.claim_workdir(workdir, other, {"lm": ()}, "pretrain", registry.meaning(other))
    assert file_bytes(workdir) == before
    assert "checkpoints/5/state/_METADATA" in before and "config.json" in before


@pytest.mark.xdist_group("checkpoint_run")
def test_load_params_checks_model_and_tokenizer(step5_run):
    workdir, cfg, _, saved = step5_run
    mesh = make_mesh(cfg.mesh)
    assert_same_values(runs.load_params(workdir, mesh, "lm", cfg.model, cfg.data.tokenizer), saved.params)
    with pytest.raises(config.LlmjaxError, match="parameters differ"):
        runs.load_params(workdir, mesh, "lm", tiny_config(**{"model.d_model": 32}).model)
    with pytest.raises(config.LlmjaxError, match=f"set --config.data.tokenizer={cfg.data.tokenizer}$"):
        runs.load_params(workdir, mesh, "lm", cfg.model, "other.model")


def test_claim_accepts_the_same_model_with_other_settings(tmp_path):
    for cfg in (tiny_config(steps=20), tiny_config(steps=40, **{"optim.lr": 1e-3})):
        runs.claim_workdir(str(tmp_path), cfg, {"lm": ()}, "pretrain", registry.meaning(cfg))
    with open(tmp_path / "config.json") as f:
        assert '"steps": 40' in f.read()


def test_lock_refuses_a_second_process_until_the_first_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom llmjax import runs\n"
                               f"with runs.locked({str(tmp_path)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(config.LlmjaxError, match=rf"in use by a live run \(pid {holder.pid} on "), \
                runs.locked(str(tmp_path)):
            pass
    finally:
        holder.kill()  # SIGKILL: nothing in the process runs to release the lock
        holder.wait()
    with runs.locked(str(tmp_path)):
        assert f"pid {os.getpid()}" in (tmp_path / "lock").read_text()


@pytest.mark.xdist_group("checkpoint_run")
@pytest.mark.parametrize("overrides, differ", [
    ({"trainer": "reward"}, r"holds a run of a different kind \(trainer differ\)"),
    ({"data.tokenizer": "byte"}, r"holds a run of a different kind \(data.tokenizer differ\)"),
])
def test_a_run_that_would_misread_the_workdir_writes_nothing(step5_run, tmp_path, overrides, differ):
    """Another objective (same model), or resuming with another tokenizer: refused before anything is written."""
    workdir = shutil.copytree(step5_run[0], tmp_path / "run")
    before = file_bytes(workdir)
    cfg = reward_config() if overrides.get("trainer") == "reward" else tiny_config(seed=7, **overrides)
    with pytest.raises(config.LlmjaxError, match=differ):
        registry.train(cfg, str(workdir))
    assert file_bytes(workdir) == before


def test_ppo_value_means_something_only_under_ppo(tmp_path):
    """GRPO has no value: a GRPO run resumed with another ppo.value is the same run; a PPO run is not."""
    for algorithm, refused in (("grpo", False), ("ppo", True)):
        workdir, run, changed = str(tmp_path / algorithm), ppo_config("/sft", algorithm), ppo_config("/sft", algorithm)
        run.ppo.value, changed.ppo.value = "separate", "shared"
        runs.claim_workdir(workdir, run, {}, "ppo", registry.meaning(run))
        if refused:
            with pytest.raises(config.LlmjaxError, match=r"different kind \(ppo.value differ\)"):
                runs.check_workdir(workdir, changed, registry.meaning(changed))
        else:
            runs.check_workdir(workdir, changed, registry.meaning(changed))


def test_an_unwritable_workdir_is_one_line(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(config.LlmjaxError, match=r"is not writable \(Read-only file system\); pass a --workdir"), \
            runs.locked(str(tmp_path / "run")):
        pass


@pytest.mark.slow  # two LoRA runs' starts compiled and saved
def test_a_lora_run_of_a_lora_run_folds_both_adapters(tmp_path):
    """A LoRA run started from another LoRA run: its base is the first run's adapters folded into theirs, found by
    walking init_from down to the run with whole weights."""
    saved_run(tiny_config(), str(tmp_path / "lm"), scale=2.0)
    merged = {}
    for name, base in (("first", "lm"), ("second", "first")):
        cfg = tiny_config(init_from=str(tmp_path / base), **{"lora.targets": "wq,w_up", "lora.rank": 2})
        state = registry.task(cfg, "").start()
        state = state.replace(params=jax.tree.map(  # adapters that change the model (B starts at zero)
            lambda w: {**w, "lora_b": w["lora_b"] + 0.05} if lora.is_adapted(w) else w, state.params,
            is_leaf=lora.is_adapted))
        saved_run(cfg, str(tmp_path / name), state=state)
        merged[name] = jax.device_get(lora.merge(state.params))
    mesh = make_mesh(tiny_config().mesh)
    loaded = {name: jax.device_get(runs.load_params(str(tmp_path / name), mesh)) for name in ("lm", "first", "second")}
    assert_same_values(loaded["second"], merged["second"])
    assert_same_values(loaded["first"], merged["first"])
    for above, below in (("second", "first"), ("first", "lm")):  # each level's adapters count
        assert np.abs(loaded[above]["layers"]["wq"] - loaded[below]["layers"]["wq"]).max() > 0
    assert runs.made(str(tmp_path / "second")) == "pretrain"
