"""Benchmarks that write JSON: python -m llmjax.bench train --config=configs/pretrain.py[:model=small]
[--steps=20] [--out=bench_train.json].

Speed is reported as ratios measured in one process: the model's FLOP/s over this device's own measured
matmul rate (JAX's, and NumPy's BLAS on the host), so numbers compare across machines and runs.
"""

import json
import platform
import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from llmjax import metrics
from llmjax.config import run_main, validate
from llmjax.train import pretrain, state

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Config file to benchmark.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after two warm-up steps.")
_OUT = flags.DEFINE_string("out", None, "JSON output path (default: bench_<what>.json).")


def bench_train(cfg) -> dict:
    """Steady-state time of the jitted, donated train step (batches made beforehand, so no input cost)."""
    task = pretrain.task(cfg)
    train_state = state.create(cfg, task.mesh, task.tx)
    step = task.jit_step(jax.tree.map(lambda x: x.sharding, train_state))
    batches = [task.batches(i) for i in range(_STEPS.value + 2)]
    t = time.perf_counter()
    train_state, m = step(train_state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    train_state, m = step(train_state, batches[1])
    jax.block_until_ready(m)
    times = []
    for batch in batches[2:]:
        t = time.perf_counter()
        train_state, m = step(train_state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens_per_s = cfg.batch_size * cfg.seq_len / step_s
    model_flops = tokens_per_s * task.flops_per_token
    dtype = cfg.model.compute_dtype
    jax_rate = metrics.matmul_flops_per_s("jax", n=2048, seconds=2.0, dtype=dtype)
    devices = jax.device_count() if jax.default_backend() != "cpu" else 1
    out = {
        "model": cfg.model.name, "params": pretrain.transformer.param_count(cfg.model),
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "remat": cfg.model.remat,
        "compute_dtype": dtype, "mesh": dict(cfg.mesh), "devices": jax.device_count(),
        "compile_s": compile_s, "step_s_median": step_s, "step_s_min": min(times),
        "compiles": step._cache_size(),  # 1: no recompiles after the first step
        "tokens_per_s": tokens_per_s, "flops_per_token": task.flops_per_token, "model_flops_per_s": model_flops,
        "jax_matmul_flops_per_s": jax_rate * devices, "mfu_vs_jax_matmul": model_flops / (jax_rate * devices),
    }
    if jax.default_backend() == "cpu":
        np_rate = metrics.matmul_flops_per_s("numpy", n=2048, seconds=2.0)
        out |= {"numpy_matmul_flops_per_s": np_rate, "mfu_vs_numpy_matmul": model_flops / np_rate}
    return out


BENCHES = {"train": bench_train}


def main(argv: list[str]) -> None:
    what = argv[1] if len(argv) > 1 else "train"
    if what not in BENCHES:
        raise app.UsageError(f"unknown benchmark {what!r}; choose one of {', '.join(BENCHES)}")
    cfg = _CONFIG.value
    validate(cfg, jax.device_count())
    result = {"benchmark": what, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "host": platform.node(), **BENCHES[what](cfg)}
    path = _OUT.value or f"bench_{what}.json"
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
