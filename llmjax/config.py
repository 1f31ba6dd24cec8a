"""Run configuration: the shared base every configs/*.py file starts from, and its validation.

Configs are plain Python returning a ConfigDict (`get_config(arg)`); `arg` is the `:k=v,...` suffix of
`--config=configs/x.py:k=v`, parsed by `parse_arg`. `validate` catches every mistake we can name before
anything is compiled, and says which key is wrong and how to fix it.
"""

import importlib.util
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping

import ml_collections
from absl import app, flags
from absl import logging as absl_logging

from llmjax.data import tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.losses import DPO_LOSSES
from llmjax.models import presets


class ConfigError(ValueError):
    """A config mistake, reported as one line naming the key and the fix."""


BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
    """Parses "k=v,k2=v2" into the defaults' keys, converting each value to its default's type."""
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"config argument {item!r} is not k=v; write e.g. model=small,steps=200")
        if key not in defaults:
            raise ConfigError(f"config argument {key!r} is unknown; valid keys: {', '.join(defaults)}")
        kind = type(defaults[key])
        try:
            out[key] = BOOLS[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"config argument {key}={value!r} is not a {kind.__name__}") from e
    return ml_collections.ConfigDict(out)


def override(cfg: ml_collections.ConfigDict, dotted: str, value) -> None:
    """Sets a dotted key ("optim.lr"), as --config.optim.lr=... does on the command line."""
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = cfg[part]
    cfg[last] = value


def load(spec: str, **overrides) -> ml_collections.ConfigDict:
    """A config file's get_config, as `--config=spec` reads it ("configs/sft.py:model=tiny"), then dotted-key
    overrides (`load(spec, **{"optim.lr": 3e-4})`): for notebooks and scripts that have no command line."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist (relative paths start at {os.getcwd()!r})")
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    for key, value in overrides.items():
        override(cfg, key, value)
    return cfg


def model_config(name: str) -> ml_collections.ConfigDict:
    try:
        return ml_collections.ConfigDict(presets.preset(name))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def base(model: str = "small") -> ml_collections.ConfigDict:
    """Everything a run needs; trainer configs change what differs."""
    c = ml_collections.ConfigDict()
    c.trainer = "pretrain"   # which llmjax.train module's train(cfg, workdir) runs
    c.seed = 0
    c.steps = 300
    c.batch_size = 16        # global, across all devices and processes
    c.seq_len = 256
    c.model = model_config(model)
    c.data = dict(
        source="synthetic",  # synthetic (the built-in tasks) | files:PATH (txt/jsonl/py) | tfds:NAME (in data_dir)
        data_dir="~/tensorflow_datasets", validation=0.01,  # files: the fraction held out for evaluation
        tasks="reverse,add,sort,copy,lookup",
        # byte | synthetic (sentencepiece, trained on the tasks; see llmjax/data/tokenizer.py) | PATH.model. Set here,
        # so a run started from another's parameters (init_from) reads the same token ids whatever its config.
        tokenizer="synthetic",
        format="text",  # text: documents as plain text | chat: (prompt, response) through the chat template
    )
    c.init_from = ""         # a workdir whose latest checkpoint's parameters start this run (fresh optimizer)
    c.optim = dict(
        lr=3e-3, warmup_steps=30, schedule="cosine",  # cosine | linear | constant (after warmup)
        min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
        grad_accum=1,  # microbatches per step; the batch is split, gradients summed, one update
    )
    c.loss = dict(z_loss=0.0)
    # Mesh axes; one size may be -1 (the rest of the devices).
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    # Logical axis -> comma-separated mesh axes ("" = replicated). The model only names logical axes.
    c.rules = dict(
        batch="data,fsdp", embed="fsdp", vocab="tensor", heads="tensor", kv_heads="tensor", mlp="tensor",
        layers="", seq="", head_dim="", act_embed="",
    )
    c.checkpoint = dict(every=100, keep=3, use_async=True)
    c.log_every = 10
    c.eval_every = 100       # held-out perplexity and task accuracy every N steps and at the end; 0 = never
    c.eval_prompts = 64      # sampled prompts per task for accuracy
    c.peak_flops = 0.0       # per device FLOP/s for MFU; 0 = measure this device's float32 matmul rate
    c.distributed = False    # call jax.distributed.initialize() (also done when JAX_COORDINATOR_ADDRESS is set)
    return c


def mesh_shape(mesh: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Resolves the one -1 entry; raises ConfigError when the sizes cannot cover the devices exactly."""
    sizes = dict(mesh)
    free = [k for k, v in sizes.items() if v == -1]
    bad = [k for k, v in sizes.items() if v == 0 or v < -1]
    if bad or len(free) > 1:
        raise ConfigError(f"mesh sizes {sizes}: use positive sizes and at most one -1; e.g. --config.mesh.fsdp=-1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % fixed:
            raise ConfigError(f"mesh {sizes}: {n_devices} devices are not divisible by {fixed}; "
                              f"change the mesh sizes so their product divides {n_devices}")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(f"mesh {sizes} has {fixed} devices but {n_devices} are present; make the product "
                          f"of mesh sizes {n_devices}, or set one to -1 (e.g. --config.mesh.fsdp=-1)")
    return sizes


CHOICES = {
    "model.norm": ("rms", "layer"), "model.pos": ("rope", "learned"), "model.mlp": ("swiglu", "gelu"),
    "model.remat": ("none", "full", "dots", "all_dots"), "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"), "optim.schedule": ("cosine", "linear", "constant"),
    "data.format": ("text", "chat"),
}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def validate(cfg: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
    """Checks the config against itself and the devices; returns the resolved mesh shape."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {allowed}; set --config.{key}=...")
    m = cfg.model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                "max_seq_len"):
        if m[key] <= 0:
            raise ConfigError(f"model.{key}={m[key]} must be positive")
    try:
        vocab = get_tokenizer(cfg.data.tokenizer).vocab_size
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if vocab > m.vocab_size:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} has {vocab} tokens but model.vocab_size="
                          f"{m.vocab_size}; set --config.model.vocab_size={vocab} (or more)")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
                          "grouped-query attention needs whole groups")
    sizes = mesh_shape(cfg.mesh, n_devices)
    for axis in ("n_heads", "n_kv_heads"):
        if m[axis] % sizes["tensor"]:
            raise ConfigError(f"model.{axis}={m[axis]} is not divisible by mesh.tensor={sizes['tensor']}; "
                              "choose a tensor size that divides both n_heads and n_kv_heads")
    if cfg.seq_len > m.max_seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
                          "lower --config.seq_len or raise --config.model.max_seq_len")
    dp = sizes["data"] * sizes["fsdp"]
    for key in ("optim.grad_accum", "log_every", "checkpoint.every", "checkpoint.keep", "batch_size", "seq_len"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be at least 1")
    per_step = dp * cfg.optim.grad_accum
    if cfg.batch_size % per_step:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by data*fsdp*grad_accum="
                          f"{sizes['data']}*{sizes['fsdp']}*{cfg.optim.grad_accum}; use a multiple of {per_step}")
    if cfg.steps <= 0 or not 0 <= cfg.optim.warmup_steps <= cfg.steps:
        raise ConfigError(f"steps={cfg.steps}, optim.warmup_steps={cfg.optim.warmup_steps}: need "
                          "0 <= warmup_steps <= steps; set --config.optim.warmup_steps")
    scheme, _, rest = cfg.data.source.partition(":")
    if cfg.data.source != "synthetic" and not (scheme in ("files", "tfds") and rest):
        raise ConfigError(f"data.source={cfg.data.source!r}: use synthetic, files:PATH or tfds:NAME")
    _validate_tasks("data.tasks", cfg.data.tasks)
    if "dpo" in cfg:
        if cfg.dpo.loss not in DPO_LOSSES or cfg.dpo.reference not in ("live", "precomputed"):
            raise ConfigError(f"dpo.loss={cfg.dpo.loss!r} / dpo.reference={cfg.dpo.reference!r}: choose a loss from "
                              f"{DPO_LOSSES} and a reference from ('live', 'precomputed')")
        if not cfg.init_from:
            raise ConfigError("DPO starts from an SFT run: set --config.init_from=WORKDIR")
    if cfg.trainer == "reward" and ("reward" not in cfg or cfg.reward.read not in ("last", "eos")
                                    or cfg.reward.responses < 2):
        raise ConfigError("a reward run needs reward.read in ('last', 'eos') and reward.responses >= 2 (responses "
                          "ranked per prompt); start from configs/reward.py")
    if cfg.trainer == "ppo":
        _validate_ppo(cfg, dp)
    for logical, axes in cfg.rules.items():
        unknown = [a for a in axes.split(",") if a and a not in sizes]
        if unknown:
            raise ConfigError(f"rules.{logical}={axes!r} names mesh axes {unknown}; mesh axes are {list(sizes)}")
    return sizes


def _validate_tasks(key: str, names: str) -> None:
    unknown = [n for n in names.split(",") if n not in tasks.TASKS]
    if unknown:
        raise ConfigError(f"{key}={names!r} names unknown tasks {unknown}; choose from {','.join(tasks.TASKS)}")


def _validate_ppo(cfg, dp: int) -> None:
    p = cfg.get("ppo")
    if p is None:
        raise ConfigError("a ppo run needs the ppo section; start from configs/ppo.py")
    for key, allowed in (("algorithm", ("ppo", "grpo")), ("value", ("separate", "shared")),
                         ("kl_estimator", ("k1", "k2", "k3"))):
        if p[key] not in allowed:
            raise ConfigError(f"ppo.{key}={p[key]!r} is not one of {allowed}; set --config.ppo.{key}=...")
    if not cfg.init_from:
        raise ConfigError("PPO starts from an SFT run (the policy and its frozen reference): set --config.init_from")
    if cfg.data.source != "synthetic":
        raise ConfigError("PPO prompts come from the synthetic tasks for now: set --config.data.source=synthetic")
    if p.tasks:
        _validate_tasks("ppo.tasks", p.tasks)
    group = p.group_size if p.algorithm == "grpo" else 1
    if p.algorithm == "grpo" and group < 2:
        raise ConfigError(f"ppo.group_size={group}: GRPO normalises over K >= 2 samples per prompt")
    if cfg.batch_size % (p.minibatches * group) or cfg.batch_size // p.minibatches % dp:
        raise ConfigError(f"batch_size={cfg.batch_size} must split into ppo.minibatches={p.minibatches} minibatches "
                          f"that divide over data*fsdp={dp} devices (and whole groups of ppo.group_size={group})")
    if p.epochs < 1 or p.max_new_tokens < 1 or p.temperature <= 0:
        raise ConfigError("ppo.epochs and ppo.max_new_tokens must be >= 1 and ppo.temperature > 0")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with mistakes in the config file or its overrides raised as one ConfigError:
    ml_collections wraps them (the config file's own ConfigError, or an AttributeError for a misspelt
    --config.key) in errors whose messages carry whole tracebacks."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as e:
        chain, link = [], e
        while link is not None:
            chain.append(link)
            link = link.__cause__ or link.__context__
        config_errors = [x for x in chain if isinstance(x, ConfigError)]
        if config_errors:  # the innermost one is ours; outer ones carry its traceback as text
            raise ConfigError(str(config_errors[-1])) from None
        if isinstance(e, AttributeError | KeyError):  # ml_collections: a --config.key override that does not exist
            bad = re.findall(r"\w+", str(e))[:1]
            hint = re.search(r'Did you mean "(\w+)"', str(e))
            raise ConfigError(f"--config override: no config key named {bad[0] if bad else str(e)!r}"
                              + (f"; did you mean {hint[1]!r}?" if hint else "; check the key's spelling")) from None
        raise ConfigError(f"bad flags: {e}") from None


def run_main(main: Callable[[list[str]], None]) -> None:
    """absl's app.run for our entry points: a ConfigError prints as one line and exits with status 2 (no
    traceback); library INFO chatter (orbax) is hidden, llmjax's own progress logs are kept."""

    def wrapped(argv):
        absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("llmjax").setLevel(logging.INFO)
        main(argv)

    try:
        app.run(wrapped, flags_parser=_parse_flags)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
