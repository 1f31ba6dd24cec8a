"""The objectives by name (cfg.trainer), and the one way into training: validate the config, then run the
objective's task in the loop. The CLI (llmjax.main), the pipeline and code calling `train` from a notebook all
come through here, so no run trains on a config that has not been checked."""

import math

import jax
import ml_collections

from llmjax import optim
from llmjax.config import check_choices, check_ranges, lookup
from llmjax.data import mixture, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.models import lora, presets, ring, splash
from llmjax.sharding import AXES, make_mesh, mesh_shape
from llmjax.train import common, distill, dpo, loop, ppo, pretrain, reward
from llmjax.train.state import TrainState

OBJECTIVES: dict[str, common.Objective] = {o.name: o for o in (pretrain.OBJECTIVE, reward.OBJECTIVE, dpo.OBJECTIVE,
                                                                ppo.OBJECTIVE, distill.OBJECTIVE)}

# What a run's parameters mean, whatever its objective: a run in a workdir holding other values is refused.
MEANING = ("trainer", "model", "data.tokenizer")

CHOICES = {
    "model.norm": ("rms", "layer"), "model.pos": ("rope", "learned"), "model.mlp": ("swiglu", "gelu"),
    "model.bias": ("none", "qkv", "all"),
    "model.remat": ("none", "full", "dots", "all_dots"), "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"), "optim.schedule": ("cosine", "linear", "constant", "wsd"),
    "data.format": ("text", "chat"), "model.moe_dispatch": ("dropless", "capacity"),
    "model.rope_type": presets.ROPE_TYPES, "model.attention": presets.ATTENTION,
    "model.context_parallel": ring.STRATEGIES,
}

# The common numeric keys: (the interval the maths allows, what the value means). Each objective checks its own
# section the same way (llmjax.config.check_ranges).
RANGES = {
    "optim.lr": ("(0, inf)", "the peak learning rate: 0 trains nothing, below 0 is gradient ascent"),
    "optim.min_lr_ratio": ("[0, 1]", "the fraction of optim.lr the schedule decays to"),
    "optim.decay_fraction": ("(0, 1]", "the share of the run a wsd schedule decays over"),
    "optim.b1": ("[0, 1)", "Adam's first-moment decay"),
    "optim.b2": ("[0, 1)", "Adam's second-moment decay"),
    "optim.eps": ("(0, inf)", "Adam divides by sqrt(v) + eps"),
    "optim.weight_decay": ("[0, inf)", "below 0 it grows the weights"),
    "optim.clip_norm": ("(0, inf)", "the largest global gradient norm; 0 zeroes every gradient"),
    "loss.z_loss": ("[0, inf)", "the weight of log(Z)^2; below 0 it rewards a large normaliser"),
    "data.validation": ("[0, 1)", "the fraction of a files: source held out for evaluation"),
    "model.norm_eps": ("(0, inf)", "a norm divides by sqrt(variance + eps)"),
    "model.rope_theta": ("(0, inf)", "RoPE's base wavelength"),
    "model.attn_block": ("[1, inf)", "the queries and keys of one block of blockwise or splash attention"),
    "model.rope_original_max_len": ("[1, inf)", "the length RoPE scaling stretches from"),
    "model.rope_beta_fast": ("(0, inf)", "YaRN keeps dimensions turning more often over the original length"),
    "model.rope_beta_slow": ("(0, inf)", "YaRN fully interpolates dimensions turning less often"),
    "model.rope_attn_factor": ("[0, inf)", "what YaRN multiplies cos and sin by; 0 takes 0.1 ln(factor) + 1"),
    "model.init_std": ("(0, inf)", "0 starts every weight equal, which no gradient tells apart"),
    "model.moe_experts": ("[0, inf)", "experts per MoE layer; 0 is a dense model"),
    "model.moe_d_ff": ("[0, inf)", "each expert's MLP width; 0 takes model.d_ff"),
    "model.moe_shared_d_ff": ("[0, inf)", "the shared expert's width; 0 has none"),
    "model.moe_capacity_factor": ("(0, inf)", "an expert's slots as a multiple of an even share of the tokens"),
    "model.moe_balance_coef": ("[0, inf)", "the load-balancing loss's weight; below 0 it rewards collapse"),
    "model.moe_z_coef": ("[0, inf)", "the router z-loss's weight; below 0 it rewards large router logits"),
    "eval_every": ("[0, inf)", "steps between evaluations; 0 never evaluates"),
    "eval_prompts": ("[1, inf)", "held-out prompts per task (reward: pairs) an evaluation reads"),
    "eval_samples": ("[1, inf)", "answers per prompt for pass@k; 1 reports greedy accuracy alone"),
    "eval_temperature": ("(0, inf)", "the pass@k answers' sampling temperature; it divides the logits"),
    "peak_flops": ("[0, inf)", "FLOP/s per device for MFU; 0 measures this device"),
}


def get(cfg) -> common.Objective:
    if cfg.trainer not in OBJECTIVES:
        raise LlmjaxError(f"trainer={cfg.trainer!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.trainer]


def _validate_model(cfg: ml_collections.ConfigDict) -> None:
    check_choices(cfg, CHOICES)
    m = cfg.model
    presets.rope(m)
    presets.windows(m)
    if m.attention == "cudnn" and jax.default_backend() != "gpu":
        raise LlmjaxError(f"model.attention='cudnn' runs on a GPU and this backend is {jax.default_backend()}; set "
                          "--config.model.attention=blockwise (or xla)")
    if m.attention == "splash" and jax.default_backend() != "tpu":
        raise LlmjaxError(f"model.attention='splash' runs on a TPU and this backend is {jax.default_backend()}; set "
                          "--config.model.attention=blockwise (or xla)")
    if m.attention == "splash" and m.attn_block % splash.LANES:
        raise LlmjaxError(f"model.attn_block={m.attn_block}: splash attention's blocks are multiples of "
                          f"{splash.LANES}; set --config.model.attn_block=512 (or another multiple)")
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
        if m[key] <= 0:
            raise LlmjaxError(f"model.{key}={m[key]} must be positive")
    try:
        vocab = get_tokenizer(cfg.data.tokenizer).vocab_size
    except (OSError, ValueError) as e:
        raise LlmjaxError(f"data.tokenizer: {e}") from None
    if vocab > m.vocab_size:
        raise LlmjaxError(f"data.tokenizer={cfg.data.tokenizer!r} has {vocab} tokens but model.vocab_size="
                          f"{m.vocab_size}; set --config.model.vocab_size={vocab} (or more)")
    if m.n_heads % m.n_kv_heads:
        raise LlmjaxError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
                          "grouped-query attention needs whole groups")
    if m.moe_experts:
        _validate_moe(m)


def _validate_moe(m) -> None:
    if m.mlp != "swiglu":
        raise LlmjaxError(f"model.moe_experts={m.moe_experts} with model.mlp={m.mlp!r}: experts are SwiGLU MLPs; "
                          "set --config.model.mlp=swiglu")
    if not 1 <= m.moe_top_k <= m.moe_experts:
        raise LlmjaxError(f"model.moe_top_k={m.moe_top_k}: each token goes to 1 .. moe_experts={m.moe_experts} "
                          "experts")
    if m.moe_every < 1 or m.n_layers % m.moe_every:
        raise LlmjaxError(f"model.moe_every={m.moe_every} does not divide model.n_layers={m.n_layers}; every "
                          "moe_every-th layer is MoE, so choose a divisor")
    if m.moe_shared_gate and not m.moe_shared_d_ff:
        raise LlmjaxError("model.moe_shared_gate=True gates a shared expert, but model.moe_shared_d_ff=0 makes none; "
                          "set --config.model.moe_shared_d_ff")


def validate(cfg: ml_collections.ConfigDict, n_devices: int) -> dict[str, int]:
    """Checks the config against itself, the devices and its objective; returns the resolved mesh shape."""
    objective = get(cfg)
    _validate_model(cfg)
    m = cfg.model
    unknown = sorted(set(cfg.mesh) - set(AXES))
    if unknown:
        raise LlmjaxError(f"mesh names {unknown}; the mesh axes are {', '.join(AXES)}")
    sizes = mesh_shape(cfg.mesh, n_devices)
    if m.moe_experts % sizes["expert"]:
        raise LlmjaxError(f"model.moe_experts={m.moe_experts} is not divisible by mesh.expert={sizes['expert']}; "
                          "each device of the expert axis holds a whole share of the experts")
    for axis in ("n_heads", "n_kv_heads"):
        if m[axis] % sizes["tensor"]:
            raise LlmjaxError(f"model.{axis}={m[axis]} is not divisible by mesh.tensor={sizes['tensor']}; "
                              "choose a tensor size that divides both n_heads and n_kv_heads")
    if cfg.seq_len > m.max_seq_len:
        raise LlmjaxError(f"seq_len={cfg.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
                          "lower --config.seq_len or raise --config.model.max_seq_len")
    for key in ("optim.grad_accum", "optim.max_nonfinite", "log_every", "checkpoint.every", "checkpoint.keep",
                "batch_size", "seq_len"):
        if lookup(cfg, key) < 1:
            raise LlmjaxError(f"{key}={lookup(cfg, key)} must be at least 1")
    per_step = sizes["data"] * sizes["expert"] * sizes["fsdp"] * cfg.optim.grad_accum
    if cfg.batch_size % per_step:
        raise LlmjaxError(f"batch_size={cfg.batch_size} is not divisible by data*expert*fsdp*grad_accum="
                          f"{sizes['data']}*{sizes['expert']}*{sizes['fsdp']}*{cfg.optim.grad_accum}; use a multiple "
                          f"of {per_step}")
    if cfg.steps <= 0 or not 0 <= cfg.optim.warmup_steps <= cfg.steps:
        raise LlmjaxError(f"steps={cfg.steps}, optim.warmup_steps={cfg.optim.warmup_steps}: need "
                          "0 <= warmup_steps <= steps; set --config.optim.warmup_steps")
    check_ranges(cfg, RANGES)
    if cfg.optim.schedule == "wsd" and optim.wsd_decay_steps(cfg) > cfg.steps - cfg.optim.warmup_steps:
        raise LlmjaxError(f"optim.schedule=wsd decays over {optim.wsd_decay_steps(cfg)} steps (optim.decay_fraction="
                          f"{cfg.optim.decay_fraction}), more than the {cfg.steps - cfg.optim.warmup_steps} after "
                          "warmup; lower --config.optim.decay_fraction or --config.optim.warmup_steps")
    scheme, _, rest = cfg.data.source.partition(":")
    if cfg.data.source not in ("synthetic", "mixture") and not (scheme in ("files", "tfds") and rest):
        raise LlmjaxError(f"data.source={cfg.data.source!r}: use synthetic, files:PATH, tfds:NAME or mixture")
    mixture.validate(cfg)
    tasks.check_names("data.tasks", cfg.data.tasks)
    answers = "lm" in objective.parts and (objective.prompts or mixture.synthetic_view(cfg) is not None)
    if cfg.eval_samples > 1 and not answers:
        raise LlmjaxError(f"eval_samples={cfg.eval_samples}: pass@k samples answers to the synthetic tasks or an RL "
                          "run's prompts, and this run's evaluation answers none; set --config.eval_samples=1")
    for logical, axes in cfg.rules.items():
        unknown = [a for a in axes.split(",") if a and a not in sizes]
        if unknown:
            raise LlmjaxError(f"rules.{logical}={axes!r} names mesh axes {unknown}; mesh axes are {list(sizes)}")
    split = math.prod(sizes[a] for a in set(cfg.rules.seq.split(",")) if a)
    if m.attention == "splash" and split > 1:
        raise LlmjaxError(f"model.attention='splash' attends over whole sequences, and rules.seq={cfg.rules.seq!r} "
                          f"splits them over {split} devices (context parallelism); set "
                          "--config.model.attention=blockwise")
    lora.check(cfg)
    if lora.targets(cfg) and not cfg.init_from:
        raise LlmjaxError(f"lora.targets={cfg.lora.targets!r}: LoRA adapts a trained model, which its checkpoints "
                          "point to rather than hold; set --config.init_from=RUN (or model=hf:DIR)")
    objective.validate(cfg, sizes)
    return sizes


def meaning(cfg) -> tuple[str, ...]:
    """The config keys whose values a run resumed in a workdir must share with the run there."""
    return (*MEANING, *get(cfg).meaning(cfg))


def task(cfg, workdir: str, mesh=None) -> loop.Task:
    """The validated config's objective as the loop's Task (on `mesh`, default the config's)."""
    validate(cfg, len(mesh.devices.flat) if mesh is not None else jax.device_count())
    return common.build(get(cfg), cfg, workdir, mesh or make_mesh(cfg.mesh))._replace(meaning=meaning(cfg))


def train(cfg, workdir: str, mesh=None) -> TrainState:
    """Trains cfg's objective to cfg.steps in `workdir` (resuming what is there; on `mesh`, default the config's
    over every device): what `python -m llmjax.main` runs."""
    return loop.run(cfg, workdir, task(cfg, workdir, mesh))
