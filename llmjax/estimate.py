"""Will a run fit, and what will it cost? Parameters, FLOPs, memory per device and accelerator-hours from a
config alone (no devices, no allocation), optionally checked against XLA's own memory analysis of the real
train step compiled ahead of time on fake CPU devices:

  python -m llmjax.estimate --config=configs/pretrain.py:model=llama3-8b --config.mesh.fsdp=8 \
      --config.batch_size=8 --config.seq_len=8192 --config.model.remat=full [--xla] [--json]
      [--devices=8] [--mfu=0.4] [--peak_tflops=989] [--tokens=1e12] [--device_gib=80]

FLOPs follow llmjax.metrics (6 N + 12 L T attn_dim per token), so the hours match the MFU the loop logs.

Memory per device, in bytes (p = param dtype size, c = compute dtype size; every leaf divided by the number
of devices its sharding spec splits it over, a dimension the mesh does not divide counting fully):
  parameters   sum over leaves of size / shards * p
  gradients    the same (gradients come back in the param dtype); twice with grad_accum > 1 (the running
               sum and the microbatch's)
  optimizer    2x parameters: optax's AdamW keeps mu and nu in the param dtype (plus scalar counts)
  activations  b T [L saved(remat) + layer] c  +  2 b T V' 4  +  weights
with b = rows per device per microbatch, T = seq_len, and per token and layer (N', K', F', V' = heads, kv
heads, d_ff, vocab per device under the tensor axis; H = head_dim; S = keys a query scores, T without causal
blocks, else the blocks' average; score elements are float32, counted as 4/c elements of size c):
  full      D                                       the scan carry x_BTD, the only residual
  dots      2 D + (N' + 2 K') H + m F'              + q, k, v, the output projection, the MLP's first
                                                      matmul(s) (m = 2 for SwiGLU, 1 for GELU): every 2-D dot
  all_dots  dots + N' H + N' S 4/c                  + the attention scores and the attention-weighted values
  none      4 D + (2 N' + 2 K') H + (2 m + 1) F' + 2 N' S 4/c    every intermediate of the block
`layer` is the `none` set plus one more score matrix: during the backward pass one layer's intermediates and
the scores' gradient are live whatever the policy. 2 b T V' 4 is the float32 logits and their gradient;
`weights` the compute-dtype copy of the parameters (when it differs from the param dtype) and, under FSDP,
one layer's weights gathered whole and its whole gradient (2 x one layer x c).
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
from llmjax.config import ConfigError
from llmjax.models import transformer
from llmjax.sharding import AXES, make_mesh, mesh_shape, spec
from llmjax.train import pretrain, registry

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Config file to estimate.",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", None, "Devices (default: the mesh's product, or 1 with a -1 size).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilisation.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Peak TFLOP/s per device (989: H100 SXM dense bfloat16).")
_TOKENS = flags.DEFINE_float("tokens", None, "Training tokens (default: steps x batch_size x seq_len).")
_DEVICE_GIB = flags.DEFINE_float("device_gib", 80.0, "Memory per device, GiB, for the fits/does-not-fit line.")
_XLA = flags.DEFINE_boolean("xla", False, "Also compile the train step (on --devices fake CPU devices when JAX "
                            "has only a CPU) and show XLA's sizes.")
_JSON = flags.DEFINE_boolean("json", False, "Print the numbers as JSON.")

GIB = 2**30
BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def abstract_mesh(cfg, n_devices: int) -> AbstractMesh:
    """The config's mesh without devices: enough for the sharding specs."""
    sizes = mesh_shape({a: cfg.mesh[a] for a in AXES}, n_devices)
    return AbstractMesh(tuple(sizes[a] for a in AXES), AXES)


def shards(logical: Sequence[str | None], shape: Sequence[int], rules: Mapping[str, str],
           mesh: AbstractMesh) -> int:
    """How many pieces llmjax.sharding's spec cuts an array into (replicas hold the same piece)."""
    entries = [e for e in spec(logical, rules, mesh, shape) if e]
    return math.prod(mesh.shape[a] for e in entries for a in ((e,) if isinstance(e, str) else e))


def param_bytes(cfg, mesh: AbstractMesh) -> int:
    """Bytes of one copy of the parameters on one device."""
    leaves = jax.tree.leaves(transformer.specs(cfg.model), is_leaf=transformer.is_spec)
    elements = sum(math.prod(s.shape) // shards(s.axes, s.shape, cfg.rules, mesh) for s in leaves)
    return elements * jnp.dtype(cfg.model.param_dtype).itemsize


def scored_keys(seq_len: int, causal_block: int) -> float:
    """Keys per query that attention scores: all T, or with causal blocks each block's keys up to its end."""
    if not causal_block or causal_block >= seq_len:
        return float(seq_len)
    ends = [*range(causal_block, seq_len, causal_block), seq_len]
    return sum((end - start) * end for start, end in zip([0, *ends[:-1]], ends, strict=True)) / seq_len


def score_elements(cfg, mesh: AbstractMesh) -> float:
    """One token's attention scores in one layer (float32), counted in elements of the compute dtype."""
    m = cfg.model
    n = m.n_heads / shards(("heads",), (m.n_heads,), cfg.rules, mesh)
    return n * scored_keys(cfg.seq_len, m.attn_causal_block) * 4 / jnp.dtype(m.compute_dtype).itemsize


def saved_per_token(cfg, mesh: AbstractMesh, remat: str) -> float:
    """Elements (of the compute dtype) one layer keeps per token for the backward pass (module docstring)."""
    m, r = cfg.model, cfg.rules
    n = m.n_heads / shards(("heads",), (m.n_heads,), r, mesh)
    k = m.n_kv_heads / shards(("kv_heads",), (m.n_kv_heads,), r, mesh)
    f = m.d_ff / shards(("mlp",), (m.d_ff,), r, mesh)
    mlp_dots = 2 if m.mlp == "swiglu" else 1
    scores = score_elements(cfg, mesh)
    dots = 2 * m.d_model + (n + 2 * k) * m.head_dim + mlp_dots * f
    return {"full": m.d_model, "dots": dots, "all_dots": dots + n * m.head_dim + scores,
            "none": 4 * m.d_model + (2 * n + 2 * k) * m.head_dim + (2 * mlp_dots + 1) * f + 2 * scores}[remat]


def weight_copies(cfg, mesh: AbstractMesh) -> float:
    """Bytes of weights the step materialises besides the parameters: the compute-dtype copy when it differs
    from the param dtype, and under FSDP one layer gathered whole for its matmuls plus its whole gradient
    before the reduce-scatter."""
    m = cfg.model
    c = jnp.dtype(m.compute_dtype).itemsize
    out = param_bytes(cfg, mesh) / jnp.dtype(m.param_dtype).itemsize * c if m.compute_dtype != m.param_dtype else 0
    if mesh.shape["fsdp"] > 1:
        rules = {k: ",".join(a for a in v.split(",") if a != "fsdp") for k, v in cfg.rules.items()}
        layer = sum(math.prod(s.shape) // shards(s.axes, s.shape, rules, mesh) for s in
                    jax.tree.leaves(transformer.specs(m)["layers"], is_leaf=transformer.is_spec)) / m.n_layers
        out += 2 * layer * c
    return out


def activation_bytes(cfg, mesh: AbstractMesh) -> dict[str, float]:
    """Saved residuals of every layer, one layer's working set, the float32 logits (with gradient), and the
    weight copies (`weight_copies`)."""
    m = cfg.model
    rows = cfg.batch_size / shards(("batch",), (cfg.batch_size,), cfg.rules, mesh) / cfg.optim.grad_accum
    tokens = rows * cfg.seq_len
    c = jnp.dtype(m.compute_dtype).itemsize
    vocab = m.vocab_size / shards(("vocab",), (m.vocab_size,), cfg.rules, mesh)
    out = {"saved_layers": m.n_layers * tokens * saved_per_token(cfg, mesh, m.remat) * c,
           "layer_workspace": tokens * (saved_per_token(cfg, mesh, "none") + score_elements(cfg, mesh)) * c,
           "logits": 2 * tokens * vocab * 4, "weights": weight_copies(cfg, mesh)}
    return out | {"total": sum(out.values())}


def estimate(cfg: ml_collections.ConfigDict, n_devices: int, mfu: float = 0.4, peak_tflops: float = 989.0,
             tokens: float | None = None) -> dict:
    """Every number the CLI prints, as a dict (bytes are per device)."""
    mesh = abstract_mesh(cfg, n_devices)
    tokens = float(cfg.steps * cfg.batch_size * cfg.seq_len) if tokens is None else float(tokens)
    fpt = pretrain.flops_per_token(cfg)
    params = param_bytes(cfg, mesh)
    act = activation_bytes(cfg, mesh)
    memory = {"params": params, "grads": params * (2 if cfg.optim.grad_accum > 1 else 1), "optimizer": 2 * params,
              "activations": act["total"]}
    hours = fpt * tokens / (peak_tflops * 1e12 * mfu) / 3600
    return {
        "model": cfg.model.name, "devices": n_devices, "mesh": dict(mesh.shape), "remat": cfg.model.remat,
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "params": transformer.param_count(cfg.model),
        "matmul_params": transformer.matmul_param_count(cfg.model), "flops_per_token": fpt, "tokens": tokens,
        "total_flops": fpt * tokens, "mfu": mfu, "peak_tflops": peak_tflops, "accelerator_hours": hours,
        "wall_hours": hours / n_devices, "bytes": memory | {"total": sum(memory.values())},
        "activation_bytes": act,
    }


def _abstract_batch(cfg, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=sharding) for k in BATCH_KEYS}


def xla_memory(cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """XLA's per-device sizes for the pretraining step, compiled ahead of time on this process's devices
    exactly as the loop jits it (state donated), from abstract inputs: nothing is allocated.

    `state` is the arguments less the batch (parameters, optimizer state, step); `peak` = arguments +
    outputs - donated aliases + temporaries.
    """
    cfg = copy.deepcopy(cfg)
    cfg.eval_every = 0  # the evaluator would compile a sampler we do not need
    task = registry.task(cfg, "", make_mesh(cfg.mesh))
    step = task.jit_step(jax.tree.map(lambda x: x.sharding, task.abstract))
    train_state = task.abstract
    batch = _abstract_batch(cfg, task.batch_sharding)
    stats = step.lower(train_state, batch).compile().memory_analysis()
    batch_bytes = sum(4 * math.prod(s.sharding.shard_shape(s.shape)) for s in batch.values())
    args, out, alias, temp = (stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.alias_size_in_bytes,
                              stats.temp_size_in_bytes)
    return {"arguments": args, "outputs": out, "aliased": alias, "temp": temp, "state": args - batch_bytes,
            "peak": args + out - alias + temp}


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f} B"


def _report(est: dict, xla: dict | None, device_gib: float) -> str:
    b, m, act = est["bytes"], est["mesh"], est["activation_bytes"]
    rows = est["batch_size"] // (m["data"] * m["fsdp"])
    lines = [
        f"{est['model']}: {est['devices']} devices, mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}, "
        f"batch {est['batch_size']} x {est['seq_len']} ({rows} x {est['seq_len']} per device), remat={est['remat']}",
        f"parameters          {est['params']:,} ({est['matmul_params']:,} in matmuls)",
        f"FLOPs per token     {est['flops_per_token']:.4g}",
        f"training            {est['tokens']:.4g} tokens, {est['total_flops']:.4g} FLOPs",
        f"accelerator-hours   {est['accelerator_hours']:,.4g} at {est['mfu']:.0%} MFU of {est['peak_tflops']:g} "
        f"TFLOP/s ({est['wall_hours']:,.4g} h on {est['devices']} devices)",
        f"{'memory per device':<26}{'estimate':>13}" + (f"{'XLA':>13}  ratio" if xla else ""),
    ]

    def row(name: str, value: float, ref: float | None = None, note: str = "") -> None:
        ratio = f"{_size(ref):>13}  {value / ref:5.2f}" if ref is not None else ""
        lines.append(f"  {name:<24}{_size(value):>13}{ratio}{note}")

    row("parameters", b["params"])
    row("optimizer state", b["optimizer"])
    if xla:
        row("params + optimizer", b["params"] + b["optimizer"], xla["state"], "   XLA: arguments - batch")
    row("gradients", b["grads"])
    row("activations", b["activations"], note=f"   layers {_size(act['saved_layers'])}, one layer "
        f"{_size(act['layer_workspace'])}, logits {_size(act['logits'])}, weights {_size(act['weights'])}")
    if xla:
        row("gradients + activations", b["grads"] + b["activations"], xla["temp"], "   XLA: temporaries")
    row("total", b["total"], xla["peak"] if xla else None, "   XLA: args + outputs - aliased + temp" if xla else "")
    worst = max(b["total"], xla["peak"] if xla else 0)
    verdict = "fits" if worst <= device_gib * GIB else "does NOT fit"
    lines.append(f"{verdict} in {device_gib:g} GiB per device ({worst / (device_gib * GIB):.0%} used"
                 + (", the larger of estimate and XLA)" if xla else ")"))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    if cfg.trainer != "pretrain":
        raise ConfigError(f"trainer={cfg.trainer!r}: the estimate models the next-token step (pretraining and SFT); "
                          "use configs/pretrain.py or configs/sft.py")
    sizes = dict(cfg.mesh)
    n = _DEVICES.value or (math.prod(sizes.values()) if -1 not in sizes.values() else 1)
    if _XLA.value and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", n)  # before anything touches a backend
    registry.validate(cfg, n)
    est = estimate(cfg, n, _MFU.value, _PEAK.value, _TOKENS.value)
    xla = None
    if _XLA.value:
        if jax.device_count() != n:
            sys.exit(f"--xla needs {n} devices and JAX has {jax.device_count()}; on a CPU drop XLA_FLAGS's device "
                     "count or make it match --devices")
        xla = xla_memory(cfg)
    print(json.dumps(est | {"xla": xla}, indent=1) if _JSON.value else _report(est, xla, _DEVICE_GIB.value))


if __name__ == "__main__":
    run_main(main)
