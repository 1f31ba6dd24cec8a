"""Checkpoints with orbax: async saves every N steps and at the end, the last K kept, restore onto any mesh.

Orbax writes each step into a temporary directory and renames it only when complete, so a crash mid-save
leaves the previous checkpoint intact. A workdir is claimed by the run that wrote its config.json: a run
whose model differs refuses to touch it.
"""

import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from llmjax import optim
from llmjax.config import ConfigError
from llmjax.models import transformer
from llmjax.train import state as state_lib


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


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{workdir!r} holds no run (no config.json); point at a workdir written by llmjax.main")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _param_shapes(model) -> tuple:
    return model.param_dtype, jax.tree.map(lambda s: s.shape, transformer.specs(model), is_leaf=transformer.is_spec)


def load_params(workdir: str, mesh: Mesh, model=None, tokenizer: str | None = None) -> transformer.Params:
    """The parameters of the latest checkpoint in `workdir`, on `mesh` (sharded by that run's rules): a
    language model's, or a reward model's {"trunk", "head"}. With `model` (and `tokenizer`), first checks that
    the (trunk's) parameters have the same shapes as the run's (and that it read the same token ids)."""
    cfg = run_config(workdir)
    if model is not None and _param_shapes(cfg.model) != _param_shapes(model):
        raise ConfigError(f"{workdir!r} holds a {cfg.model.name!r} model whose parameters differ from this "
                          f"config's {model.name!r}; start from a run of the same model")
    if tokenizer is not None and cfg.data.tokenizer != tokenizer:
        raise ConfigError(f"{workdir!r} was trained with data.tokenizer={cfg.data.tokenizer!r}, this run reads "
                          f"{tokenizer!r}: its parameters would see other tokens; set --config.data.tokenizer="
                          f"{cfg.data.tokenizer}")
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    if mngr.latest_step() is None:
        raise ConfigError(f"{workdir!r} has no checkpoint yet; train it first")
    target = state_lib.abstract(cfg, mesh, optim.make(cfg, state_lib.param_specs(cfg)))
    return restore(mngr, target).params
