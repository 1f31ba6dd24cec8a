"""Runs: a workdir as other code reads and claims it. A run's `config.json` (its resolved config), `parts.json`
(how it was made, and what its parameters hold where) and its latest checkpoint's parameters, one part at a time.

A workdir is claimed by the run that wrote its config.json: a run whose parameters would mean something else
(another objective, model or tokenizer, or keys its objective names) is refused before it writes anything, and a
live run holds a lock on it that the OS drops when the process dies. Parameters-only runs (an import, a merge)
appear whole or not at all. Nothing here knows an objective: callers say which keys give parameters their meaning
and which parts a run holds.
"""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from llmjax import checkpoint, config
from llmjax.errors import LlmjaxError
from llmjax.hf import weights as hf_weights
from llmjax.models import heads, lora, transformer
from llmjax.sharding import tree_shardings

# What a run's parameters hold, by name, at which path of its parameter tree. An objective lists its parts;
# a run that starts from another reads the part it needs, wherever that run keeps it.
PARTS = {
    "lm": ("a language model", transformer.specs),
    "scorer": ("a trunk with a scalar head (a reward model)", heads.specs),
}


def _meaning(run: dict, keys: Sequence[str]) -> dict:
    """The values of `keys` (and of every key below them) in a flattened config."""
    return {k: v for k, v in run.items() if any(k == m or k.startswith(m + ".") for m in keys)}


def check_workdir(workdir: str, cfg, meaning: Sequence[str]) -> None:
    """Refuses, writing nothing, a workdir holding a run whose parameters would mean something else to this one:
    another value of one of the `meaning` keys (the objective, model, tokenizer, parameter layout)."""
    if not os.path.exists(os.path.join(workdir, "config.json")):
        return
    old = _meaning(hf_weights.flat(json.loads(config.saved(workdir).to_json_best_effort())), meaning)
    new = _meaning(hf_weights.flat(json.loads(cfg.to_json_best_effort())), meaning)
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


def claim_workdir(workdir: str, cfg, parts: dict[str, tuple[str, ...]], made: str,
                  meaning: Sequence[str] = ()) -> None:
    """Writes the resolved config, and in parts.json how the run was `made` (an objective's name, import, merge)
    and its parts, after check_workdir. Each file is replaced whole: a pod's other processes check config.json
    while process 0 writes it, and a half-written one would stop them."""
    check_workdir(workdir, cfg, meaning)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        record = {"made": made, "parts": {name: list(where) for name, where in parts.items()}}
        files = {"config.json": cfg.to_json_best_effort(indent=2), "parts.json": json.dumps(record)}
        for name, text in files.items():
            write_whole(os.path.join(workdir, name), text)


def write_whole(path: str, text: str) -> None:
    """The file whole or not at all: a kill mid-write leaves the old one (or none), never half of it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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


def write_run(workdir: str, cfg, parts: dict[str, tuple[str, ...]], made: str, params: Callable[[], dict],
              files: Callable[[str], None] = lambda staging: None) -> None:
    """A parameters-only run (`made` by an import, a merge) in the new `workdir`: config.json, parts.json,
    `files(dir)` (process 0) and one checkpoint of `params()`. It is written into a staging folder beside
    `workdir`, named after it so that every process of a pod writes there (and a crashed attempt's leftover is
    replaced), then renamed: the run appears whole or not at all."""
    workdir = os.path.abspath(workdir)
    staging = os.path.join(os.path.dirname(workdir), f".{os.path.basename(workdir)}.staging")
    if jax.process_index() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        files(staging)
    multihost_utils.sync_global_devices("llmjax write_run: staging made")
    claim_workdir(staging, cfg, parts, made)
    checkpoint.save_params(staging, cfg, params())
    multihost_utils.sync_global_devices("llmjax write_run: saved")
    if jax.process_index() == 0:
        if os.path.exists(workdir):
            os.rmdir(workdir)  # callers refuse a workdir that is not empty
        os.rename(staging, workdir)


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir; for a Hugging Face folder (`hf:DIR`, read as a run holding
    a language model), the config its import would write."""
    return config.base(workdir) if workdir.startswith("hf:") else config.saved(workdir)


def _record(workdir: str) -> dict:
    if workdir.startswith("hf:"):
        return {"made": "import", "parts": {"lm": []}}
    path = os.path.join(workdir, "parts.json")
    if not os.path.exists(path):
        raise LlmjaxError(f"{workdir!r} holds no parts.json (what its parameters are); it was not written by this "
                          "llmjax: retrain it, or import it")
    with open(path) as f:
        record = json.load(f)
    if "parts" not in record:  # written before parts.json said how the run was made: the parts alone
        record = {"made": run_config(workdir).get("trainer", "unknown"), "parts": record}
    return record


def run_parts(workdir: str) -> dict[str, tuple[str, ...]]:
    """The parts a run's parameters hold ({"lm": ("policy",)} for a policy beside a value model), as its objective
    listed them."""
    return {name: tuple(where) for name, where in _record(workdir)["parts"].items()}


def made(workdir: str) -> str:
    """How a run was made: its objective's name, "import" or "merge"."""
    return _record(workdir)["made"]


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
        raise LlmjaxError(f"{workdir!r} is a {made(workdir)} run holding {held}; {reader} needs {PARTS[part][0]} "
                          f"({part}): start from a run that has one")
    if model is not None and _param_shapes(cfg.model) != _param_shapes(model):
        raise LlmjaxError(f"{workdir!r} holds a {cfg.model.name!r} model whose parameters differ from this "
                          f"config's {model.name!r}; start from a run of the same model")
    if tokenizer is not None and cfg.data.tokenizer != tokenizer:
        raise LlmjaxError(f"{workdir!r} was trained with data.tokenizer={cfg.data.tokenizer!r}, this run reads "
                          f"{tokenizer!r}: its parameters would see other tokens; set --config.data.tokenizer="
                          f"{cfg.data.tokenizer}")
    if not workdir.startswith("hf:") and checkpoint.latest_step(workdir) is None:
        raise LlmjaxError(f"{workdir!r} has no checkpoint yet; train it first")
    return cfg, parts


def load_params(workdir: str, mesh: Mesh, part: str = "lm", model=None, tokenizer: str | None = None,
                reader: str = "this run") -> transformer.Params:
    """The `part` of the parameters of the latest checkpoint in `workdir` (see check_part), on `mesh` (sharded by
    that run's rules). Only that part is read: never the optimizer state, nor the rest of the parameters. A LoRA
    run's checkpoint holds its adapters (and heads): they come folded into its base, found by following init_from
    down to the first run that holds whole weights (a LoRA run may start from another), then folded back up."""
    cfg, _ = check_part(workdir, part, model, tokenizer, reader)
    levels = []  # (config, part, parameters as saved) of each LoRA run on the way down
    params, adapted = saved_params(workdir, mesh, part)
    while adapted:
        levels.append((cfg, part, params))
        base = cfg.init_from
        try:
            part = "lm" if "lm" in run_parts(base) else "scorer"
            cfg, _ = check_part(base, part, cfg.model, cfg.data.tokenizer)
        except LlmjaxError as e:
            raise LlmjaxError(f"{workdir!r} is a LoRA run, whose checkpoints hold only adapters; its base {base!r} "
                              f"cannot be read: {e}") from None
        params, adapted = saved_params(base, mesh, part)
    for run_cfg, above, saved in reversed(levels):  # the language model below, adapted by the run above it
        params = lora.merge(lora.restore(saved, params["trunk"] if part == "scorer" else params, run_cfg))
        part = above
    return params


def saved_params(workdir: str, mesh: Mesh, part: str = "lm") -> tuple[transformer.Params, bool]:
    """The `part` of the parameters as the latest checkpoint holds it (a Hugging Face folder's weights), and
    whether the run is a LoRA run (whose checkpoint holds its adapters and heads, with None where the frozen base
    goes)."""
    cfg, parts = run_config(workdir), run_parts(workdir)
    if workdir.startswith("hf:"):
        return hf_weights.load(hf_weights.Reader(workdir[3:]), cfg.model, cfg.rules, mesh), False
    specs = lora.apply(PARTS[part][1](cfg.model), cfg) if "lora" in cfg else PARTS[part][1](cfg.model)
    dtype = jnp.dtype(cfg.model.param_dtype)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh) if s.trainable else None,
                          specs, tree_shardings(specs, cfg.rules, mesh), is_leaf=transformer.is_spec)
    adapted = not all(s.trainable for s in jax.tree.leaves(specs, is_leaf=transformer.is_spec))
    for key in reversed(parts[part]):
        target = {key: target}
    params = checkpoint.restore_params(workdir, target)
    for key in parts[part]:
        params = params[key]
    return params, adapted
