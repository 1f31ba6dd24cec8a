"""Checkpoints with orbax: async saves every N steps and at the end, the last K kept, restore onto any mesh.

Orbax writes each step into a temporary directory and renames it only when complete, so a crash mid-save
leaves the previous checkpoint intact. A workdir is claimed by the run that wrote its config.json: a run whose
parameters would mean something else (another objective, model or tokenizer) is refused before it writes
anything, and a live run holds a lock on it that the OS drops when the process dies.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from llmjax import config
from llmjax.errors import LlmjaxError
from llmjax.hf import weights as hf_weights
from llmjax.models import heads, lora, transformer
from llmjax.sharding import tree_shardings
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


# What a run's parameters hold, by name, at which path of its parameter tree. An objective lists its parts
# (`Task.parts`); a run that starts from another reads the part it needs, wherever that run keeps it.
PARTS = {
    "lm": ("a language model", transformer.specs),
    "scorer": ("a trunk with a scalar head (a reward model)", heads.specs),
}


# What a run's parameters mean: a run in a workdir holding another value of one of these is refused.
MEANING = ("trainer", "model", "data.tokenizer", "ppo.algorithm", "ppo.value")


def _meaning(run: dict) -> dict:
    """The MEANING keys of a run's config (flattened); ppo.value only under PPO, as GRPO has no value."""
    under_ppo = run.get("ppo.algorithm") == "ppo"
    return {k: v for k, v in run.items()
            if any(k == m or k.startswith(m + ".") for m in MEANING) and (k != "ppo.value" or under_ppo)}


def check_workdir(workdir: str, cfg) -> None:
    """Refuses, writing nothing, a workdir holding a run whose parameters would mean something else to this one
    (MEANING: another objective, model, tokenizer or parameter layout)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = _meaning(hf_weights.flat(json.load(f)))
    new = _meaning(hf_weights.flat(json.loads(cfg.to_json_best_effort())))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        what = "model" if all(k.startswith("model.") for k in diff) else "kind"
        raise LlmjaxError(f"workdir {workdir!r} holds a run of a different {what} ({', '.join(diff)} differ); pass a "
                          f"new --workdir, or the same {what} to resume")


@contextlib.contextmanager
def locked(workdir: str):
    """An exclusive lock on workdir/lock while a run writes there; a second run is refused in one line. The OS
    releases the lock when the process dies, so a crashed run never leaves it stuck. Only process 0 locks: a
    pod's processes share one workdir."""
    if jax.process_index() != 0:
        yield
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        f = open(os.path.join(workdir, "lock"), "a+")  # noqa: SIM115 (held for the run's whole life)
    except OSError as e:
        raise LlmjaxError(f"workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir on a writable "
                          "disk") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise LlmjaxError(f"workdir {workdir!r} is in use by a live run ({holder}); wait for it to end, or pass "
                          "another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def claim_workdir(workdir: str, cfg, parts: dict[str, tuple[str, ...]]) -> None:
    """Writes the resolved config and the run's parts, after check_workdir. Each file is replaced whole: a pod's
    other processes check config.json while process 0 writes it, and a half-written one would stop them."""
    check_workdir(workdir, cfg)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        files = {"config.json": cfg.to_json_best_effort(indent=2),
                 "parts.json": json.dumps({name: list(where) for name, where in parts.items()})}
        for name, text in files.items():
            path = os.path.join(workdir, name)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)


def check_new(path: str, what: str) -> None:
    """Refuses a destination that holds anything: llmjax never writes over files it did not make."""
    if os.path.exists(path) and os.listdir(path):
        raise LlmjaxError(f"{what} {path!r} is not empty; llmjax never writes over files it did not make: pass a new "
                          "path")


@contextlib.contextmanager
def staged(out: str):
    """A folder that appears whole or not at all: yields a staging folder beside `out` (on process 0; None on the
    others, which only gather), renamed to `out` when the block ends without an error."""
    check_new(out, "--out")
    if jax.process_index() != 0:
        yield None
        return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(out))
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would keep the result from everyone else
    try:
        yield tmp
        if os.path.exists(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_run(workdir: str, cfg, parts: dict[str, tuple[str, ...]], params: Callable[[], dict],
              files: Callable[[str], None] = lambda staging: None) -> None:
    """A parameters-only run (an import, a merge) in the new `workdir`: config.json, parts.json, `files(dir)`
    (process 0) and one checkpoint of `params()`. It is written into a staging folder beside `workdir`, named
    after it so that every process of a pod writes there (and a crashed attempt's leftover is replaced), then
    renamed: the run appears whole or not at all."""
    workdir = os.path.abspath(workdir)
    staging = os.path.join(os.path.dirname(workdir), f".{os.path.basename(workdir)}.staging")
    if jax.process_index() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        files(staging)
    multihost_utils.sync_global_devices("llmjax write_run: staging made")
    claim_workdir(staging, cfg, parts)
    mngr = manager(staging, cfg)
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params()})))
    mngr.wait_until_finished()
    mngr.close()
    multihost_utils.sync_global_devices("llmjax write_run: saved")
    if jax.process_index() == 0:
        if os.path.exists(workdir):
            os.rmdir(workdir)  # callers refuse a workdir that is not empty
        os.rename(staging, workdir)


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


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir; for a Hugging Face folder (`hf:DIR`, read as a run holding
    a language model), the config its import would write."""
    if workdir.startswith("hf:"):
        cfg = config.base(workdir)
        cfg.trainer = "import"
        return cfg
    return config.saved(workdir)


def run_parts(workdir: str) -> dict[str, tuple[str, ...]]:
    """The parts a run's parameters hold ({"lm": ("policy",)} for a PPO run), as its objective listed them."""
    if workdir.startswith("hf:"):
        return {"lm": ()}
    path = os.path.join(workdir, "parts.json")
    if not os.path.exists(path):
        raise LlmjaxError(f"{workdir!r} holds no parts.json (what its parameters are); it was not written by this "
                          "llmjax: retrain it, or import it")
    with open(path) as f:
        return {name: tuple(where) for name, where in json.load(f).items()}


def _param_shapes(model) -> tuple:
    return model.param_dtype, jax.tree.map(lambda s: s.shape, transformer.specs(model), is_leaf=transformer.is_spec)


def check_part(workdir: str, part: str = "lm", model=None, tokenizer: str | None = None,
               reader: str = "this run") -> tuple[ml_collections.ConfigDict, dict[str, tuple[str, ...]]]:
    """Refuses, before anything is loaded or compiled, a run that does not hold `part` ("lm": a language model;
    "scorer": a reward model's {"trunk", "head"}), naming what it holds and what `reader` needs; with `model`
    (and `tokenizer`), one whose part has other shapes than this run's model (or that read other token ids).
    Returns the run's config and parts."""
    cfg, parts = run_config(workdir), run_parts(workdir)
    if part not in parts:
        held = ", ".join(f"{PARTS[p][0]} ({p})" for p in parts)
        raise LlmjaxError(f"{workdir!r} is a {cfg.trainer} run holding {held}; {reader} needs {PARTS[part][0]} "
                          f"({part}): start from a run that has one")
    if model is not None and _param_shapes(cfg.model) != _param_shapes(model):
        raise LlmjaxError(f"{workdir!r} holds a {cfg.model.name!r} model whose parameters differ from this "
                          f"config's {model.name!r}; start from a run of the same model")
    if tokenizer is not None and cfg.data.tokenizer != tokenizer:
        raise LlmjaxError(f"{workdir!r} was trained with data.tokenizer={cfg.data.tokenizer!r}, this run reads "
                          f"{tokenizer!r}: its parameters would see other tokens; set --config.data.tokenizer="
                          f"{cfg.data.tokenizer}")
    if not workdir.startswith("hf:") and _reader(workdir).latest_step() is None:
        raise LlmjaxError(f"{workdir!r} has no checkpoint yet; train it first")
    return cfg, parts


def _reader(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(read_only=True))


def load_params(workdir: str, mesh: Mesh, part: str = "lm", model=None, tokenizer: str | None = None,
                reader: str = "this run") -> transformer.Params:
    """The `part` of the parameters of the latest checkpoint in `workdir` (see check_part), on `mesh` (sharded by
    that run's rules). Only that part is read: never the optimizer state, nor the rest of the parameters. A LoRA
    run's checkpoint holds its adapters (and heads): they come folded into the base model it points to."""
    cfg, parts = check_part(workdir, part, model, tokenizer, reader)
    if workdir.startswith("hf:"):
        return hf_weights.load(hf_weights.Reader(workdir[3:]), cfg.model, cfg.rules, mesh)
    params, adapted = saved_params(workdir, mesh, part)
    return lora.merge(lora.restore(params, _base(workdir, cfg, mesh), cfg)) if adapted else params


def saved_params(workdir: str, mesh: Mesh, part: str = "lm") -> tuple[transformer.Params, bool]:
    """The `part` of the parameters as the latest checkpoint holds it, and whether the run is a LoRA run (whose
    checkpoint holds its adapters and heads, with None where the frozen base goes)."""
    cfg, parts = run_config(workdir), run_parts(workdir)
    mngr = _reader(workdir)
    specs = lora.apply(PARTS[part][1](cfg.model), cfg) if "lora" in cfg else PARTS[part][1](cfg.model)
    mask = state_lib.trainable(specs)
    shardings = tree_shardings(specs, cfg.rules, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.model.param_dtype), sharding=sh),
                          specs, shardings, is_leaf=transformer.is_spec)
    target = state_lib.split(target, mask)[0]
    for key in reversed(parts[part]):
        target = {key: target}
    args = ocp.args.PyTreeRestore(item={"params": target}, restore_args=ocp.checkpoint_utils.construct_restore_args(
        {"params": target}), partial_restore=True)
    params = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=args)).state["params"]
    for key in parts[part]:
        params = params[key]
    return params, mask is not None


def _base(workdir: str, cfg, mesh: Mesh) -> transformer.Params:
    """The language model a LoRA run adapted: its init_from's (a reward run's trunk)."""
    try:
        if "lm" in run_parts(cfg.init_from):
            return load_params(cfg.init_from, mesh, "lm", cfg.model, cfg.data.tokenizer)
        return load_params(cfg.init_from, mesh, "scorer", cfg.model, cfg.data.tokenizer)["trunk"]
    except LlmjaxError as e:
        raise LlmjaxError(f"{workdir!r} is a LoRA run, whose checkpoints hold only adapters; its base "
                          f"{cfg.init_from!r} cannot be read: {e}") from None
