"""Will a run fit, and what will it cost? Parameters, FLOPs, memory per device and accelerator-hours from a
config alone (no devices, no allocation), optionally checked against XLA's own memory analysis of the real
train step compiled ahead of time on fake CPU devices. Pretraining, SFT and DPO; with LoRA (cfg.lora.targets)
the same config fully fine-tuned is shown beside it, so the saving reads off one table:

  python -m llmjax.estimate --config=configs/pretrain.py:model=llama3-8b --config.mesh.fsdp=8 \
      --config.batch_size=8 --config.seq_len=8192 --config.model.remat=full [--xla] [--json]
      [--devices=8] [--mfu=0.4] [--peak_tflops=989] [--tokens=1e12] [--device_gib=80]

FLOPs per token are the objective's own (its `flops_per_token`, on llmjax.metrics' 6 N + 12 L T attn_dim), so the
hours match the MFU the loop logs.

Memory per device, in bytes (p = param dtype size, c = compute dtype size; every leaf divided by the number
of devices its sharding spec splits it over, a dimension the mesh does not divide counting fully):
  parameters   sum over the layout's leaves of size / shards * p; with LoRA (cfg.lora) the frozen base and the
               adapters, r (in + out) per adapted matrix and layer
  gradients    the same over the trainable leaves (LoRA: the adapters alone), which the step differentiates, in
               the param dtype; twice with grad_accum > 1 (the running sum and the microbatch's)
  optimizer    2x gradients' leaves: optax's AdamW keeps mu and nu of the trainable leaves (plus scalar counts)
  reference    the language model once more where the step keeps a frozen reference (DPO with dpo.reference=live,
               PPO, GRPO) and fine-tunes fully; none with LoRA (the reference is the base with the adapters
               off) or with DPO's precomputed log-probs
  activations  s b T [L (saved(remat) + R) + layer] c  +  (s + 1) b T V' 4  +  weights
with b = rows per device per microbatch, T = seq_len per device (divided by the axes of rules.seq, context), s = 2
for DPO's pairs (chosen and rejected are two forwards, each logits held until the loss) and 1 otherwise, and per
token and layer (N', K', F', V' = heads, kv heads, MLP width, vocab per device under the tensor axis, the MLP width
of an MoE layer being its top_k experts' plus its shared expert's plus E router logits, averaged over the layers;
H = head_dim; S = the scores a query holds (`scored_keys`: seq_len under xla attention, the causal blocks' average
with them; 1 + block^2 / T under blockwise; 1 + T under ring attention); score elements are float32, counted as 4/c
elements of size c):
  full      D                                       the scan carry x_BTD, the only residual
  dots      2 D + (N' + 2 K') H + m F'              + q, k, v, the output projection, the MLP's first
                                                      matmul(s) (m = 2 for SwiGLU, 1 for GELU): every 2-D dot
  all_dots  dots + N' H + N' S 4/c                  + the attention scores and the attention-weighted values
                                                      (xla attention; under the others all_dots is dots:
                                                      llmjax.models.transformer.remat)
  none      4 D + (2 N' + 2 K') H + (2 m + 1) F' + 2 N' S 4/c    every intermediate of the block
R is LoRA's, 0 under `full`: every adapted projection keeps x A (r); under all_dots and none also (x A) B (its
output per device), which `dots` recomputes (llmjax.models.layers.dense makes it a batched dot).
`layer` is the `none` set plus one more score matrix: during the backward pass one layer's intermediates and
the scores' gradient are live whatever the policy. (s + 1) b T V' 4 is the float32 logits of each sequence and
one gradient; `weights` the compute-dtype copy of the parameters (when it differs from the param dtype) and,
under FSDP, one layer's weights gathered whole and its whole gradient (of its trainable leaves) x c.
"""

import copy
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from jax.sharding import AbstractMesh
from ml_collections import config_flags

from llmjax.cli import run_main
from llmjax.errors import LlmjaxError
from llmjax.models import lora, moe, transformer
from llmjax.sharding import AXES, make_mesh, mesh_shape, spec
from llmjax.train import common, loop, registry

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Config file to estimate.",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", None, "Devices (default: the mesh's product, or 1 with a -1 size).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilisation.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Peak TFLOP/s per device (989: H100 SXM dense bfloat16).")
_TOKENS = flags.DEFINE_float("tokens", None, "Training tokens (default: the input tokens of "
                             "cfg.steps steps).")
_DEVICE_GIB = flags.DEFINE_float("device_gib", 80.0, "Memory per device, GiB, for the fits/does-not-fit line.")
_XLA = flags.DEFINE_boolean("xla", False, "Also compile the train step (on --devices fake CPU devices when JAX "
                            "has only a CPU) and show XLA's sizes.")
_JSON = flags.DEFINE_boolean("json", False, "Print the numbers as JSON.")

GIB = 2**30
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def abstract_mesh(cfg, n_devices: int) -> AbstractMesh:
    """The config's mesh without devices: enough for the sharding specs."""
    sizes = mesh_shape(cfg.mesh, n_devices)
    return AbstractMesh(tuple(sizes[a] for a in AXES), AXES)


def shards(logical: Sequence[str | None], shape: Sequence[int], rules: Mapping[str, str],
           mesh: AbstractMesh) -> int:
    """How many pieces llmjax.sharding's spec cuts an array into (replicas hold the same piece)."""
    entries = [e for e in spec(logical, rules, mesh, shape) if e]
    return math.prod(mesh.shape[a] for e in entries for a in ((e,) if isinstance(e, str) else e))


def elements(specs, rules: Mapping[str, str], mesh: AbstractMesh, trainable_only: bool = False) -> int:
    """Elements of a layout's leaves (or of its trainable leaves) on one device."""
    return sum(math.prod(s.shape) // shards(s.axes, s.shape, rules, mesh)
               for s in jax.tree.leaves(specs, is_leaf=transformer.is_spec) if s.trainable or not trainable_only)


def layout(cfg) -> dict:
    """The step's parameters: the objective's (a policy and its value function, ...), adapted by cfg.lora."""
    return lora.apply(registry.get(cfg).layout(cfg), cfg)


def param_bytes(cfg, mesh: AbstractMesh) -> int:
    """Bytes of one copy of the parameters on one device."""
    return elements(layout(cfg), cfg.rules, mesh) * jnp.dtype(cfg.model.param_dtype).itemsize


def state_bytes(cfg, mesh: AbstractMesh) -> dict[str, int]:
    """Parameters, gradients, optimizer state and the frozen reference on one device (module docstring)."""
    p = jnp.dtype(cfg.model.param_dtype).itemsize
    train = elements(layout(cfg), cfg.rules, mesh, trainable_only=True) * p
    copied = registry.get(cfg).reference(cfg) and not lora.targets(cfg)  # LoRA's: its own base, adapters off
    return {"params": param_bytes(cfg, mesh), "grads": train * (2 if cfg.optim.grad_accum > 1 else 1),
            "optimizer": 2 * train, "reference": elements(transformer.specs(cfg.model), cfg.rules, mesh) * p * copied}


def sequences(cfg) -> int:
    """Forwards with gradients per batch row: 2 where a row is a pair run apart (DPO's chosen and rejected)."""
    return registry.get(cfg).sequences(cfg)


def scored_keys(cfg, mesh: AbstractMesh) -> float:
    """S, the score elements per query that attention holds (module docstring): xla scores every key of the
    sequence (with causal blocks, each block's keys up to its end); blockwise keeps the log-sum-exp and one
    block pair's scores at a time, as the fused kernels do on a whole sequence (cudnn's blocks counted as
    attn_block); ring attention over xla the log-sum-exp and one chunk's; all-gathered keys every key of the
    sequence."""
    m, T = cfg.model, cfg.seq_len
    chunk = T / shards(("seq",), (T,), cfg.rules, mesh)
    if m.attention == "blockwise" or m.attention in ("splash", "cudnn") and chunk == T:
        return 1 + min(m.attn_block, chunk) ** 2 / chunk
    if chunk < T:
        return T if m.context_parallel == "allgather" else 1 + chunk
    block = m.attn_causal_block
    if not block or block >= T:
        return float(T)
    ends = [*range(block, T, block), T]
    return sum((end - start) * end for start, end in zip([0, *ends[:-1]], ends, strict=True)) / T


def score_elements(cfg, mesh: AbstractMesh) -> float:
    """One token's attention scores in one layer (float32), counted in elements of the compute dtype."""
    m = cfg.model
    n = m.n_heads / shards(("heads",), (m.n_heads,), cfg.rules, mesh)
    return n * scored_keys(cfg, mesh) * 4 / jnp.dtype(m.compute_dtype).itemsize


def saved_per_token(cfg, mesh: AbstractMesh, remat: str) -> float:
    """Elements (of the compute dtype) one layer keeps per token for the backward pass (module docstring)."""
    m, r = cfg.model, cfg.rules
    n = m.n_heads / shards(("heads",), (m.n_heads,), r, mesh)
    k = m.n_kv_heads / shards(("kv_heads",), (m.n_kv_heads,), r, mesh)
    f = mlp_width(cfg, mesh)
    mlp_dots = 2 if m.mlp == "swiglu" else 1
    scores = score_elements(cfg, mesh)
    dots = 2 * m.d_model + (n + 2 * k) * m.head_dim + mlp_dots * f
    return {"full": m.d_model, "dots": dots, "all_dots": dots + n * m.head_dim + scores,
            "none": 4 * m.d_model + (2 * n + 2 * k) * m.head_dim + (2 * mlp_dots + 1) * f + 2 * scores}[remat]


def mlp_width(cfg, mesh: AbstractMesh) -> float:
    """F': the MLP hidden width a token has per device, averaged over layers; an MoE layer's is its top_k experts'
    (and shared expert's) widths plus the router's E logits."""
    m = cfg.model
    per_device = lambda f: f / shards(("mlp",), (f,), cfg.rules, mesh) if f else 0  # noqa: E731
    n_moe = transformer.moe_layers(m)
    routed = m.moe_top_k * per_device(m.moe_d_ff or m.d_ff) + per_device(m.moe_shared_d_ff) + m.moe_experts
    return ((m.n_layers - n_moe) * per_device(m.d_ff) + n_moe * routed) / m.n_layers


def expert_bytes(cfg, mesh: AbstractMesh) -> int:
    """Bytes of every routed expert's weights on one device: all experts stay in memory, though a token uses
    top_k of them."""
    layers = transformer.specs(cfg.model)["layers"]
    experts = {k: layers[k] for k in moe.EXPERT_AXES if k in layers}
    return elements(experts, cfg.rules, mesh) * jnp.dtype(cfg.model.param_dtype).itemsize


def adapter_elements(cfg, mesh: AbstractMesh) -> float:
    """R: what the adapters add to a layer's saved residuals per token (module docstring): x A (the rank,
    unsharded), and but under dots (x A) B (the projection's output, sharded as the activation is), of every
    adapted projection."""
    layers = transformer.specs(cfg.model)["layers"]
    total = 0.0
    for name in lora.targets(cfg):
        w, k = layers[name], lora.INPUT_DIMS.get(name, 1)
        axes = tuple("act_embed" if a == "embed" else a for a in w.axes[1 + k:])
        out = math.prod(w.shape[1 + k:]) / shards(axes, w.shape[1 + k:], cfg.rules, mesh)
        total += cfg.lora.rank + (out if transformer.remat(cfg.model) != "dots" else 0)
    return total


def weight_copies(cfg, mesh: AbstractMesh) -> float:
    """Bytes of weights the step materialises besides the parameters: the compute-dtype copy when it differs
    from the param dtype, and under FSDP one layer gathered whole for its matmuls plus the whole gradient of its
    trainable leaves before the reduce-scatter."""
    m = cfg.model
    c = jnp.dtype(m.compute_dtype).itemsize
    out = param_bytes(cfg, mesh) / jnp.dtype(m.param_dtype).itemsize * c if m.compute_dtype != m.param_dtype else 0
    if mesh.shape["fsdp"] > 1:
        rules = {k: ",".join(a for a in v.split(",") if a != "fsdp") for k, v in cfg.rules.items()}
        layers = lora.apply(transformer.specs(m), cfg)["layers"]
        out += (elements(layers, rules, mesh) + elements(layers, rules, mesh, trainable_only=True)) / m.n_layers * c
    return out


def activation_bytes(cfg, mesh: AbstractMesh) -> dict[str, float]:
    """Saved residuals of every layer, one layer's working set, the float32 logits (with gradient), and the
    weight copies (`weight_copies`)."""
    m, s = cfg.model, sequences(cfg)
    shape = (cfg.batch_size, cfg.seq_len)
    tokens = math.prod(shape) / shards(("batch", "seq"), shape, cfg.rules, mesh) / cfg.optim.grad_accum
    c = jnp.dtype(m.compute_dtype).itemsize
    vocab = m.vocab_size / shards(("vocab",), (m.vocab_size,), cfg.rules, mesh)
    adapters = adapter_elements(cfg, mesh) if m.remat != "full" else 0
    out = {"saved_layers": s * m.n_layers * tokens * (saved_per_token(cfg, mesh, transformer.remat(m)) + adapters) * c,
           "layer_workspace": tokens * (saved_per_token(cfg, mesh, "none") + score_elements(cfg, mesh)) * c,
           "logits": (s + 1) * tokens * vocab * 4, "weights": weight_copies(cfg, mesh)}
    return out | {"total": sum(out.values())}


def estimate(cfg: ml_collections.ConfigDict, n_devices: int, mfu: float = 0.4, peak_tflops: float = 989.0,
             tokens: float | None = None) -> dict:
    """Every number the CLI prints, as a dict (bytes are per device)."""
    objective = registry.get(cfg)
    if objective.sequences is None:
        modelled = [o.name for o in registry.OBJECTIVES.values() if o.sequences]
        raise LlmjaxError(f"trainer={objective.name!r}: the estimate models steps that are one forward and backward "
                          f"over the batch ({', '.join(modelled)}); use one of their configs")
    mesh = abstract_mesh(cfg, n_devices)
    tokens = float(cfg.steps * cfg.batch_size * cfg.seq_len * sequences(cfg)) if tokens is None else float(tokens)
    fpt = objective.flops_per_token(cfg)
    act = activation_bytes(cfg, mesh)
    memory = state_bytes(cfg, mesh) | {"activations": act["total"]}
    hours = fpt * tokens / (peak_tflops * 1e12 * mfu) / 3600
    return {
        "model": cfg.model.name, "trainer": objective.name, "devices": n_devices, "mesh": dict(mesh.shape),
        "remat": cfg.model.remat, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
        "lora": {"targets": lora.targets(cfg), "rank": cfg.lora.rank} if lora.targets(cfg) else None,
        "params": transformer.param_count(cfg.model), "active_params": transformer.active_param_count(cfg.model),
        "expert_bytes": expert_bytes(cfg, mesh),
        "trainable_params": sum(math.prod(s.shape) for s in jax.tree.leaves(layout(cfg), is_leaf=transformer.is_spec)
                                if s.trainable),
        "matmul_params": transformer.matmul_param_count(cfg.model), "flops_per_token": fpt, "tokens": tokens,
        "total_flops": fpt * tokens, "mfu": mfu, "peak_tflops": peak_tflops, "accelerator_hours": hours,
        "wall_hours": hours / n_devices, "bytes": memory | {"total": sum(memory.values())},
        "activation_bytes": act,
    }


def train_step(cfg, mesh) -> tuple[loop.Task, dict]:
    """The objective's step as the registry builds it for a run (llmjax.train.common.build: the LoRA mask, DPO's
    reference), with abstract parameters, frozen inputs and batch: nothing is read from other runs, and the batch
    is a synthetic one's shapes (a files: source's batches have the same)."""
    shaped = copy.deepcopy(cfg)
    shaped.data.source, shaped.eval_every = "synthetic", 0
    task = common.build(registry.get(cfg), shaped, "", mesh, abstract=True)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), task.source(None, 0)[0])
    return task, batch


def xla_memory(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """XLA's per-device sizes for the train step (`train_step`), compiled ahead of time on this process's
    devices exactly as the loop jits it (state donated), from abstract inputs: nothing is allocated.

    `state` is the arguments less the batch (parameters, optimizer state, step, a frozen reference); `peak` =
    arguments + outputs - donated aliases + temporaries.
    """
    task, batch = train_step(cfg, make_mesh(cfg.mesh))
    step = task.jit_step(jax.tree.map(lambda x: x.sharding, task.abstract))
    stats = step.lower(task.abstract, batch, *task.frozen).compile().memory_analysis()
    batch_bytes = sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(batch))
    args, out, alias, temp = (stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.alias_size_in_bytes,
                              stats.temp_size_in_bytes)
    return {"arguments": args, "outputs": out, "aliased": alias, "temp": temp, "state": args - batch_bytes,
            "peak": args + out - alias + temp}


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f} B"


# (row, the estimate's terms it sums, the XLA size it is checked against, what that size is)
ROWS = (("parameters", ("params",), None, ""), ("gradients", ("grads",), None, ""),
        ("optimizer state", ("optimizer",), None, ""), ("reference", ("reference",), None, ""),
        ("activations", ("activations",), None, ""),
        ("params + opt + reference", ("params", "optimizer", "reference"), "state", "XLA: arguments - batch"),
        ("gradients + activations", ("grads", "activations"), "temp", "XLA: temporaries"),
        ("total", ("total",), "peak", "XLA: args + outputs - aliased + temp"))


def _report(runs: list[tuple[str, dict, dict | None]], device_gib: float) -> str:
    """The config's estimate (the last run), and the memory table of every run (label, estimate, XLA) side by
    side."""
    est, xla = runs[-1][1], runs[-1][2]
    m, act, lo = est["mesh"], est["activation_bytes"], est["lora"]
    rows = est["batch_size"] // (m["data"] * m["expert"] * m["fsdp"])
    lines = [
        f"{est['model']} ({est['trainer']}): {est['devices']} devices, mesh data={m['data']} expert={m['expert']} "
        f"fsdp={m['fsdp']} context={m['context']} tensor={m['tensor']}, batch {est['batch_size']} x "
        f"{est['seq_len']} ({rows} x {est['seq_len'] // m['context']} per device), "
        f"remat={est['remat']}",
        f"parameters          {est['params']:,} ({est['matmul_params']:,} in a token's matmuls)",
        *([f"experts             {est['active_params']:,} parameters active per token; all experts hold "
           f"{_size(est['expert_bytes'])} per device"] if est["active_params"] != est["params"] else []),
        *([f"trainable           {est['trainable_params']:,}: LoRA rank {lo['rank']} on {','.join(lo['targets'])}"]
          if lo else []),
        f"FLOPs per token     {est['flops_per_token']:.4g}",
        f"training            {est['tokens']:.4g} tokens, {est['total_flops']:.4g} FLOPs",
        f"accelerator-hours   {est['accelerator_hours']:,.4g} at {est['mfu']:.0%} MFU of {est['peak_tflops']:g} "
        f"TFLOP/s ({est['wall_hours']:,.4g} h on {est['devices']} devices)",
        f"{'memory per device':<26}" + "".join(f"{label:>13}" + (f"{'XLA':>13}  ratio" if x else "")
                                               for label, _, x in runs),
    ]
    for name, terms, key, note in ROWS:
        if (key in ("state", "temp") and not xla) or (terms == ("reference",) and not any(
                e["bytes"]["reference"] for _, e, _ in runs)):
            continue
        cells = ""
        for _, e, x in runs:
            value = sum(e["bytes"][t] for t in terms)
            cells += f"{_size(value):>13}"
            if x:
                cells += f"{_size(x[key]):>13}  {value / x[key]:5.2f}" if key else " " * 20
        lines.append(f"  {name:<24}{cells}".rstrip() + (f"   {note}" if note and xla else ""))
    lines.append(f"  activations: layers {_size(act['saved_layers'])}, one layer {_size(act['layer_workspace'])}, "
                 f"logits {_size(act['logits'])}, weights {_size(act['weights'])}")
    worst = max(est["bytes"]["total"], xla["peak"] if xla else 0)
    verdict = "fits" if worst <= device_gib * GIB else "does NOT fit"
    lines.append(f"{verdict} in {device_gib:g} GiB per device ({worst / (device_gib * GIB):.0%} used"
                 + (", the larger of estimate and XLA)" if xla else ")"))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    sizes = dict(cfg.mesh)
    n = _DEVICES.value or (math.prod(sizes.values()) if -1 not in sizes.values() else 1)
    if _XLA.value and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", n)  # before anything touches a backend
    registry.validate(cfg, n)
    if _XLA.value and jax.device_count() != n:
        sys.exit(f"--xla needs {n} devices and JAX has {jax.device_count()}; on a CPU drop XLA_FLAGS's device "
                 "count or make it match --devices")
    runs = [("estimate", cfg)]
    if lora.targets(cfg):  # the same run fully fine-tuned, beside it
        full = copy.deepcopy(cfg)
        full.lora.targets = ""
        runs = [("full", full), (f"LoRA r={cfg.lora.rank}", cfg)]
    runs = [(label, estimate(c, n, _MFU.value, _PEAK.value, _TOKENS.value), xla_memory(c) if _XLA.value else None)
            for label, c in runs]
    if not _JSON.value:
        print(_report(runs, _DEVICE_GIB.value))
        return
    out = runs[-1][1] | {"xla": runs[-1][2]}
    if len(runs) > 1:
        out["full_finetuning"] = runs[0][1] | {"xla": runs[0][2]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    run_main(main)
