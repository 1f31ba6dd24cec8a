"""Run configuration: the shared base every configs/*.py file starts from.

Configs are plain Python returning a ConfigDict (`get_config(arg)`); `arg` is the `:k=v,...` suffix of
`--config=configs/x.py:k=v`, parsed by `parse_arg`. Checking a config is the objectives' business
(`llmjax.train.registry.validate`; `check_ranges` is the interval check they share), so this module imports
nothing of the library but the model presets (and, for a Hugging Face model, llmjax.hf.families).
"""

import importlib.util
import json
import os
import re
from collections.abc import Callable

import ml_collections

from llmjax.errors import LlmjaxError
from llmjax.models import presets

BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
    """Parses "k=v,k2=v2" into the defaults' keys, converting each value to its default's type."""
    out = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise LlmjaxError(f"config argument {item!r} is not k=v; write e.g. model=small,steps=200")
        if key not in defaults:
            raise LlmjaxError(f"config argument {key!r} is unknown; valid keys: {', '.join(defaults)}")
        kind = type(defaults[key])
        try:
            out[key] = BOOLS[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError) as e:
            raise LlmjaxError(f"config argument {key}={value!r} is not a {kind.__name__}") from e
    return ml_collections.ConfigDict(out)


def lookup(cfg: ml_collections.ConfigDict, dotted: str):
    """The value of a dotted key ("optim.lr")."""
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def override(cfg: ml_collections.ConfigDict, dotted: str, value) -> None:
    """Sets a dotted key ("optim.lr"), as --config.optim.lr=... does on the command line."""
    parent, _, last = dotted.rpartition(".")
    (lookup(cfg, parent) if parent else cfg)[last] = value


def load(spec: str, **overrides) -> ml_collections.ConfigDict:
    """A config file's get_config, as `--config=spec` reads it ("configs/sft.py:model=tiny"), then dotted-key
    overrides (`load(spec, **{"optim.lr": 3e-4})`): for notebooks and scripts that have no command line."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise LlmjaxError(f"config file {path!r} does not exist (relative paths start at {os.getcwd()!r})")
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    for key, value in overrides.items():
        override(cfg, key, value)
    return cfg


def _interval(text: str) -> Callable[[float], bool]:
    """A membership test for an interval written as in maths: "(0, inf)", "[0, 1)", "[1, inf)"."""
    left, lo, hi, right = re.fullmatch(r"([\[(])([^,]+), ([^\])]+)([\])])", text).groups()
    lo, hi = float(lo), float(hi)
    return lambda x: (lo <= x if left == "[" else lo < x) and (x <= hi if right == "]" else x < hi)


def check_ranges(cfg: ml_collections.ConfigDict, ranges: dict[str, tuple[str, str]]) -> None:
    """Refuses the first key outside its interval: `ranges` maps a dotted key to (interval, what the value means),
    e.g. {"optim.lr": ("(0, inf)", "0 trains nothing, below 0 is gradient ascent")}. Checked before anything
    compiles, as a value the maths forbids would train on nothing, diverge, or crash mid-run."""
    for key, (interval, meaning) in ranges.items():
        value = lookup(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not _interval(interval)(value):
            raise LlmjaxError(f"{key}={value!r} is outside {interval} ({meaning}); set --config.{key} within it")


def check_choices(cfg: ml_collections.ConfigDict, choices: dict[str, tuple]) -> None:
    """Refuses the first key whose value is not one of its choices (`choices`: dotted key -> allowed values)."""
    for key, allowed in choices.items():
        if lookup(cfg, key) not in allowed:
            raise LlmjaxError(f"{key}={lookup(cfg, key)!r} is not one of {allowed}; set --config.{key}=...")


def saved(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote into its workdir (with the model keys added since, as it ran)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise LlmjaxError(f"{workdir!r} holds no run (no config.json); point at a workdir written by llmjax.main")
    with open(path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    cfg.model = presets.complete(cfg.model)
    return cfg


def model_config(name: str) -> ml_collections.ConfigDict:
    """A preset's model, a Hugging Face folder's (`hf:DIR`), or that of the run in the workdir `name`."""
    if name.startswith("hf:"):
        from llmjax.hf import families  # it reads this module's LlmjaxError

        return ml_collections.ConfigDict(families.model_config(families.read_config(name[3:]), name[3:]))
    if name not in presets.PRESETS and os.path.isdir(name):
        return saved(name).model
    try:
        return ml_collections.ConfigDict(presets.preset(name))
    except ValueError as e:
        raise LlmjaxError(f"{e}, a Hugging Face folder (hf:DIR) or a run's workdir") from None


def base(model: str = "small") -> ml_collections.ConfigDict:
    """Everything a run needs; trainer configs change what differs. `model` names a preset, or a model to start
    from: a Hugging Face folder (`hf:DIR`) or a run's workdir, whose architecture, tokenizer and parameters
    (init_from) the run then takes."""
    c = ml_collections.ConfigDict()
    c.trainer = "pretrain"   # the objective (llmjax.train.registry): pretrain (also SFT) | reward | dpo | ppo
    c.seed = 0
    c.steps = 300
    c.batch_size = 16        # global, across all devices and processes
    c.seq_len = 256
    c.model = model_config(model)
    c.data = dict(
        # synthetic (the built-in tasks) | files:PATH (txt/jsonl/py) | tfds:NAME (in data_dir) | mixture: the
        # sources of `mixture` (name -> dict(source, format, epochs)) drawn by `weights`, "a=0.8, b=0.2" or in
        # stages "0: a=0.8, b=0.2; 90%: a=1" (llmjax.data.mixture)
        source="synthetic", mixture={}, weights="",
        data_dir="~/tensorflow_datasets", validation=0.01,  # files: the fraction held out for evaluation
        tasks="reverse,add,sort,copy,lookup",
        # byte | synthetic (sentencepiece, trained on the tasks; see llmjax/data/tokenizer.py) | PATH.model | hf:DIR
        # (a Hugging Face tokenizer.json and tokenizer_config.json, with its chat template). Set here,
        # so a run started from another's parameters (init_from) reads the same token ids whatever its config.
        tokenizer="synthetic",
        format="text",  # text: documents as plain text | chat: (prompt, response) through the chat template
    )
    c.init_from = ""         # a workdir (or hf:DIR) whose latest parameters start this run (fresh optimizer)
    c.optim = dict(
        lr=3e-3, warmup_steps=30, schedule="cosine",  # cosine | linear | constant (after warmup) | wsd
        decay_fraction=0.2,  # wsd: the share of the run (its end) over which lr decays to lr * min_lr_ratio
        min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
        grad_accum=1,  # microbatches per step; the batch is split, gradients summed, one update
        max_nonfinite=5,  # a step with a non-finite loss or gradients is skipped; this many in a row stop the run
    )
    c.loss = dict(z_loss=0.0)
    # LoRA (llmjax.models.lora): low-rank adapters on these projections (wq,wk,wv,wo,w_gate,w_up,w_down or w_fc,
    # w_proj; "all"), the rest of the model frozen; "" = full fine-tuning. The scale is alpha / rank; init draws A
    # (kaiming: uniform 1/sqrt(in) | gaussian: std 1/rank), B starts at zero so step 0 is the base model. dropout:
    # on the adapters' input, in training steps only.
    c.lora = dict(targets="", rank=8, alpha=16.0, init="kaiming", dropout=0.0)
    # Mesh axes; one size may be -1 (the rest of the devices). context splits every sequence (context parallelism).
    c.mesh = dict(data=1, expert=1, fsdp=-1, context=1, tensor=1)
    # Logical axis -> comma-separated mesh axes ("" = replicated). The model only names logical axes; seq is the
    # sequence of activations and of the KV cache.
    c.rules = dict(
        batch="data,expert,fsdp", embed="fsdp", vocab="tensor", heads="tensor", kv_heads="tensor", mlp="tensor",
        experts="expert", layers="", seq="context", head_dim="", act_embed="",
    )
    if model not in presets.PRESETS:
        c.data.tokenizer = model if model.startswith("hf:") else saved(model).data.tokenizer
        c.init_from = model
    c.checkpoint = dict(every=100, keep=3, use_async=True)
    c.log_every = 10
    c.eval_every = 100       # held-out perplexity and task accuracy every N steps and at the end; 0 = never
    c.eval_prompts = 64      # held-out prompts per task (and of an RL run's prompt source) for greedy accuracy
    c.eval_samples = 1       # > 1: also this many answers per prompt, sampled at eval_temperature, for pass@k
    c.eval_temperature = 1.0
    c.peak_flops = 0.0       # per device FLOP/s for MFU; 0 = measure this device's float32 matmul rate
    c.distributed = False    # call jax.distributed.initialize() (also done when JAX_COORDINATOR_ADDRESS is set)
    return c
