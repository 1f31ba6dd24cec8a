"""Checkpoints restore onto any mesh; a workdir refuses a run that would misread it, and a second live run; a
crash mid-save, or a disk with no room for the next save, leaves the last good checkpoint usable."""

import collections
import errno
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ppo_config, reward_config, tiny_config
from jax.sharding import PartitionSpec

from llmjax import checkpoint, config, optim, runs
from llmjax.models import transformer
from llmjax.sharding import make_mesh
from llmjax.train import registry
from llmjax.train import state as state_lib

TENSOR2 = dict(data=1, fsdp=4, tensor=2)


def files(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def assert_same_values(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def assert_sharding(x: jax.Array, sharding):
    assert x.sharding == sharding, (x.sharding, sharding)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir claimed by the tiny model, holding its state at step 5, written on an fsdp=8 mesh. Its users run
    in one worker (xdist_group "checkpoint_run"), which writes it once."""
    workdir = str(tmp_path_factory.mktemp("run"))
    cfg = tiny_config(seed=7)
    tx = optim.make(cfg, transformer.specs(cfg.model))
    state = state_lib.create(transformer.specs(cfg.model), cfg, make_mesh(cfg.mesh), tx)
    state = state.replace(step=jnp.full_like(state.step, 5))
    runs.claim_workdir(workdir, cfg, {"lm": ()}, "pretrain", registry.meaning(cfg))
    mngr = checkpoint.manager(workdir, cfg)
    assert checkpoint.save(mngr, 5, state)
    mngr.wait_until_finished()
    mngr.close()
    return workdir, cfg, tx, state


@pytest.mark.xdist_group("checkpoint_run")
def test_restore_onto_another_mesh(run):
    workdir, cfg, tx, saved = run
    cfg = tiny_config(seed=7, mesh=TENSOR2)
    mesh = make_mesh(cfg.mesh)
    target = state_lib.abstract(transformer.specs(cfg.model), cfg, mesh, tx)
    mngr = checkpoint.manager(workdir, cfg)
    restored = checkpoint.restore(mngr, target)
    mngr.close()

    assert_same_values(restored, saved)
    jax.tree.map(lambda x, t: assert_sharding(x, t.sharding), restored, target)
    assert restored.params["layers"]["wq"].sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)

    tokens = jax.random.randint(jax.random.key(0), (8, 32), 0, cfg.model.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(32), tokens.shape)
    forward = jax.jit(lambda p: transformer.forward(p, tokens, positions, jnp.ones_like(tokens), cfg.model)[0])
    np.testing.assert_allclose(forward(restored.params), forward(saved.params), rtol=1e-6, atol=1e-6)


@pytest.mark.xdist_group("checkpoint_run")
def test_claim_refuses_a_different_model(run):
    workdir, *_ = run
    before = files(workdir)
    other = tiny_config(**{"model.d_model": 32, "model.n_layers": 3})
    with pytest.raises(config.LlmjaxError, match=r"\(model.d_model, model.n_layers differ\); pass a new --workdir"):
        runs.claim_workdir(workdir, other, {"lm": ()}, "pretrain", registry.meaning(other))
    assert files(workdir) == before
    assert "checkpoints/5/state/_METADATA" in before and "config.json" in before


@pytest.mark.xdist_group("checkpoint_run")
def test_load_params_checks_model_and_tokenizer(run):
    workdir, cfg, _, saved = run
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


@pytest.mark.xdist_group("checkpoint_run")
def test_crash_mid_save_keeps_last_checkpoint(run, tmp_path):
    workdir, cfg, tx, saved = run
    workdir = shutil.copytree(workdir, tmp_path / "run")
    # What orbax 0.12.8 leaves when killed while saving step 10 (atomicity._get_tmp_directory): the step's
    # "<step>.orbax-checkpoint-tmp" directory, its metadata written first, the item still half written.
    ckpts = workdir / "checkpoints"
    partial = ckpts / "10.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
    shutil.copytree(ckpts / "5" / "state" / "d", partial / "d")
    shutil.copy(ckpts / "5" / "_CHECKPOINT_METADATA", partial.parent)
    (partial / "manifest.ocdbt").write_bytes(b"\0" * 10)

    mesh = make_mesh(cfg.mesh)
    mngr = checkpoint.manager(str(workdir), cfg)
    assert mngr.latest_step() == 5 and mngr.all_steps() == [5]
    restored = checkpoint.restore(mngr, state_lib.abstract(transformer.specs(cfg.model), cfg, mesh, tx))
    assert_same_values(restored, saved)
    # The resumed run saves step 10 again, over the leftover.
    assert checkpoint.save(mngr, 10, restored)
    mngr.wait_until_finished()
    mngr.close()
    assert sorted(os.listdir(ckpts)) == ["10", "5"]
    mngr = checkpoint.manager(str(workdir), cfg)
    assert_same_values(checkpoint.restore(mngr, state_lib.abstract(transformer.specs(cfg.model), cfg, mesh, tx)), saved)
    mngr.close()


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
def test_a_run_that_would_misread_the_workdir_writes_nothing(run, tmp_path, overrides, differ):
    """Another objective (same model), or resuming with another tokenizer: refused before anything is written."""
    workdir = shutil.copytree(run[0], tmp_path / "run")
    before = files(workdir)
    cfg = reward_config() if overrides.get("trainer") == "reward" else tiny_config(seed=7, **overrides)
    with pytest.raises(config.LlmjaxError, match=differ):
        registry.train(cfg, str(workdir))
    assert files(workdir) == before


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


def test_a_save_that_cannot_fit_stops_before_writing(tmp_path, monkeypatch):
    """A disk with too little room left: the run stops at the checkpoint step, naming the last intact one."""
    free = iter([1e9, 1e9, 1.0])  # room for checkpoints 2 and 4, none for 6
    monkeypatch.setattr(shutil, "disk_usage", lambda path: collections.namedtuple("Usage", "free")(next(free)))
    with pytest.raises(config.LlmjaxError, match=r"^disk full at step 6 \(0.0 MiB free, a checkpoint takes .* MiB\) "
                       r"in .*; checkpoint 4 is intact: free space and rerun to resume$"):
        registry.train(tiny_config(steps=10, **{"checkpoint.every": 2}), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_a_save_that_fails_for_space_is_reported_in_one_line(tmp_path):
    (tmp_path / "checkpoints" / "6").mkdir(parents=True)
    error = ValueError(f'RESOURCE_EXHAUSTED: Error writing "x" at "{tmp_path}/checkpoints/8.orbax-checkpoint-tmp/'
                       'state": No space left on device [os_error_code=\'28\']')
    message = str(checkpoint.disk_full(error, str(tmp_path)))
    assert message.startswith("disk full at step 8 (no space left while saving)")
    assert "checkpoint 6 is intact" in message
    assert checkpoint.disk_full(ValueError("another problem"), str(tmp_path)) is None
