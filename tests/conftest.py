"""Every test sees 8 fake CPU devices, so sharded runs can be compared with single-device ones. The suite runs
in pytest-xdist workers (setup.cfg); tests that share the tiny pipeline, or the reward model, run in one worker,
so it is built once."""

import os

import jax
import pytest
from helpers import one_device, reward_config, tiny_config

jax.config.update("jax_num_cpu_devices", 8)
# one compilation cache per worker: jax writes its entries without a lock
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache",
                                                            os.environ.get("PYTEST_XDIST_WORKER", "main")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

from experiments.pipeline import run  # noqa: E402  (after the device count is set)
from llmjax.train import registry  # noqa: E402  (after the device count is set)

TRAINED_RUNS = {"sft_dir", "rm_dir", "pipeline_dir"}  # fixtures that train: a test that needs one is slow


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "pipeline_dir" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("pipeline"))
        elif "rm_dir" in item.fixturenames:  # one worker trains the reward model for all its users
            item.add_marker(pytest.mark.xdist_group("rm"))
        if TRAINED_RUNS & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory) -> str:
    """A tiny model fine-tuned on `sort` in the chat format (about 30% greedy accuracy): the starting point,
    reference and trunk for the reward, DPO and PPO tests."""
    workdir = str(tmp_path_factory.mktemp("sft"))
    cfg = tiny_config(steps=150, eval_every=150, eval_prompts=32,
                      **{"data.format": "chat", "data.tasks": "sort", "optim.lr": 3e-3})
    registry.train(cfg, workdir, one_device())
    return workdir


@pytest.fixture(scope="session")
def rm_dir(sft_dir, tmp_path_factory) -> str:
    """A tiny reward model on the SFT trunk (its held-out pairwise accuracy in metrics.jsonl)."""
    workdir = str(tmp_path_factory.mktemp("rm"))
    registry.train(reward_config(sft_dir, steps=120, eval_every=120, eval_prompts=128), workdir, one_device())
    return workdir


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory) -> str:
    """The pipeline experiment on `tiny`, two steps a stage: every stage's checkpoint, results and plot."""
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    run.run(workdir, "tiny", 0.002, jax.devices()[:1])
    return workdir


@pytest.fixture(scope="module")
def step5_run(tmp_path_factory):
    """A workdir claimed by the tiny model, holding its state at step 5, written on an fsdp=8 mesh (checkpoint and
    runs tests). Its users run in one worker (xdist_group "checkpoint_run"), which writes it once a module."""
    from llmjax import checkpoint, optim, runs
    from llmjax.models import transformer
    from llmjax.sharding import make_mesh
    from llmjax.train import state as state_lib

    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = tiny_config(seed=7)
    tx = optim.make(cfg, transformer.specs(cfg.model))
    state = state_lib.create(transformer.specs(cfg.model), cfg, make_mesh(cfg.mesh), tx)
    state = state.replace(step=jax.numpy.full_like(state.step, 5))
    runs.claim_workdir(workdir, cfg, {"lm": ()}, "pretrain", registry.meaning(cfg))
    mngr = checkpoint.manager(workdir, cfg)
    assert checkpoint.save(mngr, 5, state)
    mngr.wait_until_finished()
    mngr.close()
    return workdir, cfg, tx, state
