"""Checkpoints with orbax: async saves every N steps and at the end, the last K kept, restore onto any mesh.

Orbax writes each step into a temporary directory and renames it only when complete, so a crash mid-save
leaves the previous checkpoint intact. A workdir is claimed by the run that wrote its config.json: a run
whose model differs refuses to touch it.
"""

import json
import os

import jax
import orbax.checkpoint as ocp

from llmjax.config import ConfigError


def manager(workdir: str, cfg) -> ocp.CheckpointManager:
    c = cfg.checkpoint
    options = ocp.CheckpointManagerOptions(max_to_keep=c.keep, enable_async_checkpointing=c.use_async, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state) -> bool:
    """Starts an asynchronous save of `state` as `step` (the loop decides when)."""
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)


def restore(mngr: ocp.CheckpointManager, target, step: int | None = None):
    """Restores onto `target`'s shardings (a tree of jax.ShapeDtypeStruct), whatever mesh wrote it."""
    step = mngr.latest_step() if step is None else step
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state


def claim_workdir(workdir: str, cfg) -> None:
    """Writes the resolved config, after checking that any run already in `workdir` has the same model."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("model")
        if old != json.loads(cfg.model.to_json()):
            diff = sorted(k for k in set(old or {}) | set(cfg.model) if (old or {}).get(k) != cfg.model.get(k))
            raise ConfigError(f"workdir {workdir!r} holds a run of a different model (model.{', model.'.join(diff)} "
                              "differ); pass a new --workdir, or the same model config to resume")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
