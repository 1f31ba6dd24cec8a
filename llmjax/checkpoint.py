"""Checkpoints with orbax: async saves every N steps and at the end, the last K kept, restore onto any mesh.

Orbax writes each step into a temporary directory and renames it only when complete, so a crash mid-save
leaves the previous checkpoint intact. This module is the only one that speaks orbax; reading and claiming runs
(their config, parts and parameters) is llmjax.runs'.
"""

import errno
import os
import re
import shutil

import grain
import jax
import orbax.checkpoint as ocp

from llmjax.errors import LlmjaxError


def manager(workdir: str, cfg) -> ocp.CheckpointManager:
    c = cfg.checkpoint
    options = ocp.CheckpointManagerOptions(max_to_keep=c.keep, enable_async_checkpointing=c.use_async, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator=None) -> bool:
    """Starts an asynchronous save of `state` (and a grain iterator's position) as `step`."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return mngr.save(step, args=ocp.args.Composite(**args), force=True)


def restore(mngr: ocp.CheckpointManager, target, step: int | None = None, data_iterator=None):
    """Restores onto `target`'s shardings (a tree of jax.ShapeDtypeStruct), whatever mesh wrote it; a given
    grain iterator is moved to where the saved one was."""
    step = mngr.latest_step() if step is None else step
    args = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return mngr.restore(step, args=ocp.args.Composite(**args)).state


def _full(workdir: str, step, detail: str) -> LlmjaxError:
    root = os.path.join(workdir, "checkpoints")
    complete = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    intact = f"checkpoint {max(complete)} is intact" if complete else "no checkpoint was written yet"
    return LlmjaxError(f"disk full at step {step} ({detail}) in {workdir!r}; {intact}: free space and rerun to resume")


def check_space(mngr: ocp.CheckpointManager, workdir: str, state, step: int) -> None:
    """Stops before a save that cannot fit: cleaner than orbax failing in its writer threads (which disk_full
    still reports, for a disk that others fill meanwhile). Waits for the save in flight, as orbax's next save
    would, so that the space it takes is counted."""
    mngr.wait_until_finished()
    need = sum(x.nbytes for x in jax.tree.leaves(state))
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise _full(workdir, step, f"{free / 2**20:.1f} MiB free, a checkpoint takes {need / 2**20:.1f} MiB")


def disk_full(error: Exception, workdir: str) -> LlmjaxError | None:
    """What to tell a user whose disk filled during a save (orbax reports it at the next save or wait), else
    None: the step that failed, and the newest complete checkpoint, intact since orbax writes into a temporary
    directory."""
    if not isinstance(error, OSError | ValueError) or not (
            getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)):
        return None
    failed = re.search(r"(\d+)\.orbax-checkpoint-tmp", str(error))
    return _full(workdir, failed[1] if failed else "?", "no space left while saving")


def _reader(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(read_only=True))


def latest_step(workdir: str) -> int | None:
    return _reader(workdir).latest_step()


def restore_params(workdir: str, target: dict):
    """The parameters of `target`'s shape (a subtree of the saved ones) from the latest checkpoint, onto its
    shardings: only what it names is read, never the optimizer state."""
    mngr = _reader(workdir)
    args = ocp.args.PyTreeRestore(item={"params": target}, restore_args=ocp.checkpoint_utils.construct_restore_args(
        {"params": target}), partial_restore=True)
    return mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=args)).state["params"]


def save_params(workdir: str, cfg, params: dict) -> None:
    """One checkpoint (step 0) holding parameters alone: a parameters-only run's."""
    mngr = manager(workdir, cfg)
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
    mngr.wait_until_finished()
    mngr.close()
