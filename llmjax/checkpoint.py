"""Checkpoints with orbax: async saves every N steps and at the end, the last K kept, restore onto any mesh.

Orbax writes each step into a temporary directory and renames it only when complete, so a crash mid-save
leaves the previous checkpoint intact. A workdir is claimed by the run that wrote its config.json: a run
whose model differs refuses to touch it.
"""

import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from llmjax.config import ConfigError
from llmjax.models import heads, transformer
from llmjax.sharding import tree_shardings


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


# What a run's parameters hold, by name, at which path of its parameter tree. An objective lists its parts
# (`Task.parts`); a run that starts from another reads the part it needs, wherever that run keeps it.
PARTS = {
    "lm": ("a language model", transformer.specs),
    "scorer": ("a trunk with a scalar head (a reward model)", heads.specs),
}


def claim_workdir(workdir: str, cfg, parts: dict[str, tuple[str, ...]]) -> None:
    """Writes the resolved config and the run's parts, after checking that any run already in `workdir` has the
    same model."""
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
        with open(os.path.join(workdir, "parts.json"), "w") as f:
            json.dump({name: list(where) for name, where in parts.items()}, f)


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{workdir!r} holds no run (no config.json); point at a workdir written by llmjax.main")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def run_parts(workdir: str) -> dict[str, tuple[str, ...]]:
    """The parts a run's parameters hold ({"lm": ("policy",)} for a PPO run), as its objective listed them."""
    path = os.path.join(workdir, "parts.json")
    if not os.path.exists(path):
        raise ConfigError(f"{workdir!r} holds no parts.json (what its parameters are); it was not written by this "
                          "llmjax: retrain it, or import it")
    with open(path) as f:
        return {name: tuple(where) for name, where in json.load(f).items()}


def _param_shapes(model) -> tuple:
    return model.param_dtype, jax.tree.map(lambda s: s.shape, transformer.specs(model), is_leaf=transformer.is_spec)


def check_part(workdir: str, part: str = "lm", model=None, tokenizer: str | None = None,
               reader: str = "this run") -> None:
    """Refuses, before anything is loaded or compiled, a run that does not hold `part` ("lm": a language model;
    "scorer": a reward model's {"trunk", "head"}), naming what it holds and what `reader` needs; with `model`
    (and `tokenizer`), one whose part has other shapes than this run's model (or that read other token ids)."""
    cfg, parts = run_config(workdir), run_parts(workdir)
    if part not in parts:
        held = ", ".join(f"{PARTS[p][0]} ({p})" for p in parts)
        raise ConfigError(f"{workdir!r} is a {cfg.trainer} run holding {held}; {reader} needs {PARTS[part][0]} "
                          f"({part}): start from a run that has one")
    if model is not None and _param_shapes(cfg.model) != _param_shapes(model):
        raise ConfigError(f"{workdir!r} holds a {cfg.model.name!r} model whose parameters differ from this "
                          f"config's {model.name!r}; start from a run of the same model")
    if tokenizer is not None and cfg.data.tokenizer != tokenizer:
        raise ConfigError(f"{workdir!r} was trained with data.tokenizer={cfg.data.tokenizer!r}, this run reads "
                          f"{tokenizer!r}: its parameters would see other tokens; set --config.data.tokenizer="
                          f"{cfg.data.tokenizer}")
    if _latest(workdir) is None:
        raise ConfigError(f"{workdir!r} has no checkpoint yet; train it first")


def _reader(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(read_only=True))


def _latest(workdir: str) -> int | None:
    return _reader(workdir).latest_step()


def load_params(workdir: str, mesh: Mesh, part: str = "lm", model=None, tokenizer: str | None = None,
                reader: str = "this run") -> transformer.Params:
    """The `part` of the parameters of the latest checkpoint in `workdir` (see check_part), on `mesh` (sharded by
    that run's rules). Only that part is read: never the optimizer state, nor the rest of the parameters."""
    check_part(workdir, part, model, tokenizer, reader)
    cfg, parts, mngr = run_config(workdir), run_parts(workdir), _reader(workdir)
    specs = PARTS[part][1](cfg.model)
    shardings = tree_shardings(specs, cfg.rules, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.model.param_dtype), sharding=sh),
                          specs, shardings, is_leaf=transformer.is_spec)
    for key in reversed(parts[part]):
        target = {key: target}
    args = ocp.args.PyTreeRestore(item={"params": target}, restore_args=ocp.checkpoint_utils.construct_restore_args(
        {"params": target}), partial_restore=True)
    params = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=args)).state["params"]
    for key in parts[part]:
        params = params[key]
    return params
