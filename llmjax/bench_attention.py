"""Long-context benchmarks, dispatched by `python -m llmjax.bench attention|context` (llmjax/bench.py):

  attention  blockwise (flash) attention against the materialised reference, forward + backward of attention
             alone at each --seq_lens (default 1k, 4k, 16k): XLA's memory analysis of the compiled function and
             the median seconds per call; a reference that would not fit in half of the host's available memory
             is compiled (its memory analysis reported) but not run. Beside it, XLA's temporaries of the config's
             whole train step with each attention (compiled only).
  context    XLA's per-device memory of the train step at each --seq_lens (default 8192) on 8 fake CPU
             devices, the sequence split over context = 1, 2, 4, 8 (fsdp the rest), with each attention and each
             context-parallel strategy, beside the formula's activations and gradients (`llmjax.estimate`); one
             row a device, or --global_batch rows in every mesh. Compiled only, never run.

Memory is per device and in bytes; ratios are blockwise over the reference, or over context=1, in one process.
"""

import copy
import os
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import LlmjaxError
from llmjax.models import attention as attention_lib
from llmjax.sharding import mesh_shape
from llmjax.train import registry

IMPLEMENTATIONS = {"xla": attention_lib.reference, "blockwise": attention_lib.blockwise}


def available_bytes() -> int:
    """The host memory available now (Linux's MemAvailable), else its physical memory."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def attention_step(implementation: str, block: int):
    """Forward and backward of causal self-attention alone: the gradients of <o, do> with respect to q, k, v."""
    local = IMPLEMENTATIONS[implementation]
    if implementation == "blockwise":
        local = partial(local, block_q=block, block_k=block)

    def loss(q_BTNH, k_BTKH, v_BTKH, do_BTNH):
        B, T = q_BTNH.shape[:2]
        segment_BT = jnp.zeros((B, T), jnp.int32)
        index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        o_BTNH, _ = local(q_BTNH, k_BTKH, v_BTKH, segment_BT, segment_BT, index_BT, index_BT)
        return jnp.sum(o_BTNH.astype(jnp.float32) * do_BTNH.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    args, out, temp = stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.temp_size_in_bytes
    return {"temp_bytes": temp, "argument_bytes": args, "output_bytes": out, "peak_bytes": args + out + temp}


def bench_attention(cfg, seq_lens=(1024, 4096, 16384), repeats: int = 3, batch: int = 1,
                    train_step: bool = True) -> dict:
    """Attention alone with cfg.model's heads, head size, compute dtype and attn_block (`small`: 4 heads over 2
    kv heads of 64, blocks of 512), causal, `batch` rows; and (`train_step`) the whole train step's XLA
    temporaries."""
    m = cfg.model
    budget = available_bytes() // 2
    runs, ratios = [], []
    for T in seq_lens:
        rng = np.random.default_rng(T)
        shapes = ((batch, T, m.n_heads, m.head_dim), (batch, T, m.n_kv_heads, m.head_dim),
                  (batch, T, m.n_kv_heads, m.head_dim), (batch, T, m.n_heads, m.head_dim))
        by_impl = {}
        for name in IMPLEMENTATIONS:
            t = time.perf_counter()
            compiled = attention_step(name, m.attn_block).lower(
                *(jax.ShapeDtypeStruct(s, m.compute_dtype) for s in shapes)).compile()
            run = {"seq_len": T, "implementation": name, **_memory(compiled), "compile_s": time.perf_counter() - t,
                   "call_s_median": None, "call_s": [], "skipped": None}
            if run["peak_bytes"] > budget:
                run["skipped"] = (f"not run: XLA's peak {run['peak_bytes'] / 2**30:.1f} GiB is over half of the "
                                  f"{2 * budget / 2**30:.1f} GiB of host memory available")
            else:
                args = [jnp.asarray(rng.standard_normal(s), m.compute_dtype) for s in shapes]
                jax.block_until_ready(compiled(*args))  # warm-up
                for _ in range(repeats):
                    t = time.perf_counter()
                    jax.block_until_ready(compiled(*args))
                    run["call_s"].append(time.perf_counter() - t)
                run["call_s_median"] = statistics.median(run["call_s"])
                del args
            by_impl[name] = run
            runs.append(run)
        xla, blockwise = by_impl["xla"], by_impl["blockwise"]
        ratios.append({"seq_len": T, "temp_blockwise_over_xla": blockwise["temp_bytes"] / xla["temp_bytes"],
                       "peak_blockwise_over_xla": blockwise["peak_bytes"] / xla["peak_bytes"],
                       "time_blockwise_over_xla": (blockwise["call_s_median"] / xla["call_s_median"]
                                                   if xla["call_s_median"] and blockwise["call_s_median"] else None)})
    return {"batch": batch, "heads": m.n_heads, "kv_heads": m.n_kv_heads, "head_dim": m.head_dim,
            "block": m.attn_block, "causal": True, "dtype": m.compute_dtype, "repeats": repeats,
            "run_budget_bytes": budget, "runs": runs, "ratios": ratios,
            "train_step": train_step_memory(cfg, seq_lens) if train_step else []}


def _at_length(cfg, seq_len: int, batch: int, **model):
    run = copy.deepcopy(cfg)
    run.seq_len, run.batch_size, run.eval_every = seq_len, batch, 0
    run.model.max_seq_len = max(run.model.max_seq_len, seq_len)
    run.model.update(model)
    return run


def train_step_memory(cfg, seq_lens) -> list[dict]:
    """XLA's temporaries of cfg's train step at each length, xla against blockwise attention, one row a device.
    xla attention runs in one block (attn_causal_block=0): causal blocks would unroll T / block attention calls,
    which takes XLA:CPU many minutes to compile at 16k."""
    from llmjax.estimate import xla_memory  # defines flags on import (llmjax.bench imports it under its own)

    sizes = mesh_shape(cfg.mesh, jax.device_count())
    batch = sizes["data"] * sizes["expert"] * sizes["fsdp"]
    out = []
    for T in seq_lens:
        row = {"model": cfg.model.name, "seq_len": T, "batch_size": batch, "remat": cfg.model.remat}
        for name in IMPLEMENTATIONS:
            t = time.perf_counter()
            run = _at_length(cfg, T, batch, attention=name, attn_causal_block=0)
            row[f"{name}_temp_bytes"] = xla_memory(run)["temp"]
            row[f"{name}_compile_s"] = time.perf_counter() - t
        out.append(row | {"temp_blockwise_over_xla": row["blockwise_temp_bytes"] / row["xla_temp_bytes"]})
    return out


def use_cpu_devices(n: int) -> None:
    """n fake CPU devices for the `context` benchmark; call before anything touches a JAX backend. An XLA_FLAGS
    device count wins (then it must be n)."""
    jax.config.update("jax_platforms", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", n)


def bench_context(cfg, seq_lens=(8192,), contexts=(1, 2, 4, 8), batch: int = 0, attentions=tuple(IMPLEMENTATIONS),
                  strategies=("ring", "allgather")) -> dict:
    """The train step's per-device memory with the sequence split `context` ways over the host's fake CPU
    devices (fsdp = devices / context): XLA's memory analysis beside `estimate`'s. `batch` 0 puts one row on
    each device (batch = fsdp, so tokens per device fall as context grows); a fixed batch keeps the tokens per
    device equal across contexts."""
    n = jax.device_count()
    runs = []
    for T in seq_lens:
        for c in contexts:
            if n % c:
                raise LlmjaxError(f"context={c} does not divide the {n} devices; choose contexts that divide {n}")
            for attention in attentions:
                for strategy in strategies if c > 1 else (None,):
                    runs.append(_context_run(cfg, T, c, n, batch or n // c, attention, strategy))
    base = {(r["seq_len"], r["attention"]): r["xla_temp_bytes"] for r in runs if r["context"] == 1}
    for r in runs:
        if (r["seq_len"], r["attention"]) in base:
            r["temp_over_context_1"] = r["xla_temp_bytes"] / base[r["seq_len"], r["attention"]]
    return {"model": cfg.model.name, "devices": n, "remat": cfg.model.remat, "attn_block": cfg.model.attn_block,
            "attn_causal_block": cfg.model.attn_causal_block, "runs": runs}


def _context_run(cfg, T: int, c: int, n: int, batch: int, attention: str, strategy: str | None) -> dict:
    from llmjax.estimate import estimate, xla_memory  # defines flags on import (see train_step_memory)

    run = _at_length(cfg, T, batch, attention=attention, context_parallel=strategy or cfg.model.context_parallel)
    run.mesh.update(data=1, expert=1, fsdp=n // c, context=c, tensor=1)
    registry.validate(run, n)
    t = time.perf_counter()
    xla = xla_memory(run)
    est = estimate(run, n)
    act, grads = est["activation_bytes"], est["bytes"]["grads"]
    return {"seq_len": T, "context": c, "fsdp": n // c, "batch_size": batch, "tokens_per_device": batch * T // n,
            "attention": attention, "context_parallel": strategy, "xla_temp_bytes": xla["temp"],
            "xla_peak_bytes": xla["peak"], "estimate_activation_bytes": act["total"], "estimate_grads_bytes": grads,
            "estimate_over_xla_temp": (act["total"] + grads) / xla["temp"],
            "estimate_activations": {k: v for k, v in act.items() if k != "total"},
            "compile_s": time.perf_counter() - t}
