"""Checkpoints restore onto any mesh; a crash mid-save, or a disk with no room for the next save, leaves the last
good checkpoint usable (claiming and reading runs: tests/test_runs.py)."""

import collections
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_values, tiny_config
from jax.sharding import PartitionSpec

from llmjax import checkpoint, config
from llmjax.models import transformer
from llmjax.sharding import make_mesh
from llmjax.train import registry
from llmjax.train import state as state_lib

TENSOR2 = dict(data=1, fsdp=4, tensor=2)


def assert_sharding(x: jax.Array, sharding):
    assert x.sharding == sharding, (x.sharding, sharding)


@pytest.mark.xdist_group("checkpoint_run")
def test_restore_onto_another_mesh(step5_run):
    workdir, cfg, tx, saved = step5_run
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
def test_crash_mid_save_keeps_last_checkpoint(step5_run, tmp_path):
    workdir, cfg, tx, saved = step5_run
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
