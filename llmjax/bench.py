"""Benchmarks that write JSON:
  python -m llmjax.bench train --config=configs/pretrain.py[:model=small] [--steps=16] [--out=bench_train.json]
  python -m llmjax.bench moe --config=configs/pretrain.py:model=moe-small  (MoE dropless and capacity vs the dense
      model of equal active parameters, tokens/s)
  python -m llmjax.bench generate --config=configs/pretrain.py  (KV cache vs recompute, 256 new tokens)
  python -m llmjax.bench engine --config=configs/pretrain.py  (the engine, continuous batching over a paged KV cache,
      vs the static sampler: tokens/s and KV bytes in flight on equal and skewed answer lengths;
      llmjax/bench_engine.py)
  python -m llmjax.bench dpo --config=configs/dpo.py  (live vs precomputed reference, pairs/s)
  python -m llmjax.bench ppo --config=configs/ppo.py --config.ppo.reward=tasks  (time split of one iteration)
  python -m llmjax.bench data --config=configs/pretrain.py  (grain pipeline tokens/s vs training tokens/s)
  python -m llmjax.bench import --config=configs/pretrain.py:model=llama-1b --config.model.n_layers=4 \
      --config.model.param_dtype=bfloat16  (peak host memory of a Hugging Face import, 1 GB of weights)
  python -m llmjax.bench attention [--seq_lens=1024,4096,16384]  (blockwise vs materialised attention: XLA's
      memory and seconds of forward + backward, and the train step's memory)
  python -m llmjax.bench context --config=configs/pretrain.py:model=tiny [--seq_lens=8192] [--contexts=1,2,4,8]
      [--global_batch=0]  (train-step memory per device on 8 fake CPU devices by context size; compiled only)
  (the last two: llmjax/bench_attention.py)

Speed is reported as ratios measured in one process: the model's FLOP/s over this device's own measured
matmul rate (JAX's, and NumPy's BLAS on the host), so numbers compare across machines and runs.
"""

import copy
import json
import os
import platform
import statistics
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llmjax import bench_attention, bench_engine, checkpoint, metrics, runs, sampling
from llmjax.cli import run_main
from llmjax.data import pipeline, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.models import moe, transformer
from llmjax.train import registry

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Config file to benchmark.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 16, "Steps to time, after the compiling one.")
_OUT = flags.DEFINE_string("out", None, "JSON output path (default: bench_<what>.json).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", None, "attention, context: sequence lengths (default 1024,4096,16384; "
                              "context: 8192).")
_CONTEXTS = flags.DEFINE_list("contexts", ["1", "2", "4", "8"], "context: the mesh.context sizes.")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 0, "context: the batch in every mesh (0: one row a device).")


def bench_train(cfg) -> dict:
    """Steady-state time of the jitted, donated train step (batches made beforehand, so no input cost).

    Step timings and matmul-rate measurements alternate in rounds, and each ratio divides medians, so a
    drift in the machine's speed (shared VMs) moves both sides together.
    """
    task = registry.task(cfg, "")
    train_state = task.start()
    step = task.jit_step(jax.tree.map(lambda x: x.sharding, train_state))
    batches = [task.source(train_state, i)[0] for i in range(_STEPS.value)]
    t = time.perf_counter()
    train_state, m = step(train_state, batches[0], *task.frozen)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    dtype, on_cpu = cfg.model.compute_dtype, jax.default_backend() == "cpu"
    times, jax_rates, np_rates = [], [], []
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        train_state, m = step(train_state, batch, *task.frozen)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
        if i % 3 == 2:
            jax_rates.append(metrics.matmul_flops_per_s("jax", n=2048, seconds=0.5, dtype=dtype))
            if on_cpu:
                np_rates.append(metrics.matmul_flops_per_s("numpy", n=2048, seconds=0.5))
    step_s = statistics.median(times)
    tokens_per_s = cfg.batch_size * cfg.seq_len / step_s
    model_flops = tokens_per_s * task.flops_per_token
    # Fake CPU devices share the host's cores, so the host's rate is the ceiling; accelerators add up.
    jax_rate = statistics.median(jax_rates) * (1 if on_cpu else jax.device_count())
    out = {
        "model": cfg.model.name, "params": transformer.param_count(cfg.model),
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "remat": cfg.model.remat,
        "attn_causal_block": cfg.model.attn_causal_block, "compute_dtype": dtype, "mesh": dict(cfg.mesh),
        "devices": jax.device_count(), "compile_s": compile_s, "step_s_median": step_s, "step_s_min": min(times),
        "compiles": step._cache_size(),  # 1: no recompiles after the first step
        "tokens_per_s": tokens_per_s, "flops_per_token": task.flops_per_token, "model_flops_per_s": model_flops,
        "jax_matmul_flops_per_s": jax_rate, "mfu_vs_jax_matmul": model_flops / jax_rate,
        **{k: float(v) for k, v in m.items() if k.startswith("moe_")},  # the last step's router statistics
    }
    if on_cpu:
        np_rate = statistics.median(np_rates)
        out |= {"numpy_matmul_flops_per_s": np_rate, "mfu_vs_numpy_matmul": model_flops / np_rate}
    return out


def bench_moe(cfg) -> dict:
    """bench_train of the MoE model with dropless and with capacity dispatch, and of its dense twin: the same model
    with one MLP as wide as the experts a token uses (top_k x moe_d_ff + moe_shared_d_ff), so equal active
    parameters and FLOPs per token."""
    m = cfg.model
    if not m.moe_experts:
        raise LlmjaxError(f"model {m.name!r} has no experts; benchmark an MoE model, e.g. :model=moe-small")
    runs = {}
    for name, changes in (("dense", moe.dense_twin(m)), ("dropless", dict(moe_dispatch="dropless")),
                          ("capacity", dict(moe_dispatch="capacity"))):
        run = copy.deepcopy(cfg)
        with run.unlocked():
            run.model.update(changes)
        runs[name] = bench_train(run) | {"active_params": transformer.active_param_count(run.model)}
    dense = runs["dense"]["tokens_per_s"]
    return {"runs": runs, "capacity_factor": m.moe_capacity_factor,
            **{f"{k}_tokens_per_s_vs_dense": runs[k]["tokens_per_s"] / dense for k in ("dropless", "capacity")}}


def _timed(fn, *args) -> tuple[float, object]:
    """Seconds of a second call (the first compiles), and its result."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t, out


def bench_generate(cfg, prompts: int = 8, prompt_len: int = 16, new: int = 256) -> dict:
    """Greedy decoding of `new` tokens for a batch of prompts: with the KV cache (prefill, then one token per
    step) against recomputing the whole sequence for every token. Both must produce the same tokens."""
    m = cfg.model
    params = jax.jit(partial(transformer.init, m))(jax.random.key(0))
    tokens_BP = jax.random.randint(jax.random.key(1), (prompts, prompt_len), 6, m.vocab_size)
    lengths_B = jnp.full((prompts,), prompt_len, jnp.int32)
    cached = sampling.sampler(m, max_new_tokens=new, eos_id=-1)

    @jax.jit
    def recompute(params, tokens_BP):
        L = prompt_len + new
        buf_BT = jnp.zeros((prompts, L), jnp.int32).at[:, :prompt_len].set(tokens_BP)
        positions_BT = jnp.broadcast_to(jnp.arange(L), (prompts, L))

        def body(i, buf_BT):  # causal attention: slots after i are never seen
            logits_BTV = transformer.forward(params, buf_BT, positions_BT, jnp.ones_like(buf_BT), m)[0]
            return buf_BT.at[:, prompt_len + i].set(jnp.argmax(logits_BTV[:, prompt_len + i - 1], axis=-1))

        return jax.lax.fori_loop(0, new, body, buf_BT)[:, prompt_len:]

    cache_s, out = _timed(cached, params, tokens_BP, lengths_B, jax.random.key(0))
    recompute_s, ref = _timed(recompute, params, tokens_BP)
    return {"model": m.name, "prompts": prompts, "prompt_len": prompt_len, "new_tokens": new,
            "same_tokens": bool((out["tokens"] == ref).all()),
            "cache_tokens_per_s": prompts * new / cache_s, "recompute_tokens_per_s": prompts * new / recompute_s,
            "speedup": recompute_s / cache_s}


def _save_fresh_run(cfg, workdir: str) -> None:
    """A freshly initialised model saved as a run, to stand in for the SFT checkpoint a trainer starts from."""
    run = copy.deepcopy(cfg)
    run.trainer, run.init_from = "pretrain", ""
    task = registry.task(run, workdir)
    runs.claim_workdir(workdir, run, task.parts, task.made, task.meaning)
    mngr = checkpoint.manager(workdir, run)
    checkpoint.save(mngr, 0, task.start())
    mngr.wait_until_finished()


def bench_dpo(cfg) -> dict:
    """Pairs/s of the DPO step with the reference run live each step against precomputed log-probs (whose
    one-off pass over the run's batches is reported apart). Starts from a fresh model saved as the SFT run."""
    cfg = copy.deepcopy(cfg)
    cfg.steps = _STEPS.value + 1
    out = {"model": cfg.model.name, "pairs_per_step": cfg.batch_size, "loss": cfg.dpo.loss}
    with tempfile.TemporaryDirectory() as tmp:
        cfg.init_from = os.path.join(tmp, "sft")
        _save_fresh_run(cfg, cfg.init_from)
        for reference in ("live", "precomputed"):
            cfg.dpo.reference = reference
            t = time.perf_counter()
            task = registry.task(cfg, os.path.join(tmp, reference))
            setup_s = time.perf_counter() - t
            train_state = task.start()
            step = task.jit_step(jax.tree.map(lambda x: x.sharding, train_state))
            batches = [task.source(train_state, i)[0] for i in range(cfg.steps)]
            times = []
            for batch in batches:
                t = time.perf_counter()
                train_state, m = step(train_state, batch, *task.frozen)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t)
            step_s = statistics.median(times[1:])
            out |= {f"{reference}_pairs_per_s": cfg.batch_size / step_s, f"{reference}_step_s": step_s,
                    f"{reference}_setup_s": setup_s}
    out["precomputed_speedup"] = out["live_step_s"] / out["precomputed_step_s"]
    return out


def bench_ppo(cfg) -> dict:
    """One PPO iteration: generation tokens/s (answer tokens over the sampler's seconds), the update's tokens/s (the
    rollout's rows x epochs over its seconds), and the seconds split into generation, scoring with the reference
    log-probs, values and advantages, and the update; medians after the compiling iteration. The compile counts
    of the sampler and the update must stay 1 while the prompts' lengths vary from iteration to iteration. Starts
    from a fresh model saved as the SFT run, rewarded by cfg.ppo.reward (tasks unless it names a reward run)."""
    cfg = copy.deepcopy(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.init_from = os.path.join(tmp, "sft")
        _save_fresh_run(cfg, cfg.init_from)
        task = registry.task(cfg, tmp)
        rollout = task.source
        train_state = task.start()
        step = task.jit_step(jax.tree.map(lambda x: x.sharding, train_state))
        times = {"generate_s": [], "score_reference_advantages_s": [], "update_s": []}
        generated, prompt_lengths = [], set()
        for i in range(_STEPS.value + 1):
            records = rollout.prompts(i)
            t0 = time.perf_counter()
            sampled = rollout.sample(train_state.params, records, i)  # returns once the answers are on the host
            t1 = time.perf_counter()
            scores, _ = rollout.score(records, sampled)
            batch, _ = jax.block_until_ready(rollout.experience(train_state.params, sampled.rows, scores,
                                                               train_state.extra["kl_coef"]))
            t2 = time.perf_counter()
            train_state, m = jax.block_until_ready(step(train_state, batch))
            for name, dt in zip(times, (t1 - t0, t2 - t1, time.perf_counter() - t2), strict=True):
                times[name].append(dt)
            generated.append(int(sampled.lengths.sum()))
            prompt_lengths.add(max(len(rollout.tokenizer.encode(r["prompt"])) for r in records))
    out = {name: statistics.median(v[1:]) for name, v in times.items()}
    total = sum(out.values())
    rows, width = batch["inputs"].shape
    return {"model": cfg.model.name, "algorithm": cfg.ppo.algorithm, "reward": cfg.ppo.reward,
            "answers": cfg.batch_size, "prompts": len({r["prompt"] for r in rollout.prompts(0)}),
            "max_new_tokens": cfg.ppo.max_new_tokens, "iteration_s": total, **out,
            **{name.replace("_s", "_share"): v / total for name, v in out.items()},
            "generate_tokens_per_s": statistics.median(g / t for g, t in zip(generated[1:], times["generate_s"][1:],
                                                                              strict=True)),
            "update_tokens_per_s": rows * width * cfg.ppo.epochs / out["update_s"],
            "first_iteration_s": sum(v[0] for v in times.values()),
            "longest_prompts_seen": sorted(prompt_lengths), "sampler_compiles": rollout._generate._cache_size(),
            "update_compiles": step._cache_size()}


def bench_data(cfg, records: int = 20_000) -> dict:
    """Tokens/s of the grain pipeline (shuffle, tokenize, pack, batch) over task documents held in memory,
    next to the train step's tokens/s for the same config: input must never be the bottleneck."""
    rng = np.random.default_rng(0)
    docs = [{"text": tasks.sample(rng, cfg.data.tasks.split(",")).text} for _ in range(records)]
    it = pipeline.make_iterator(docs, tokenizer=get_tokenizer(cfg.data.tokenizer), seq_len=cfg.seq_len,
                                batch_size=cfg.batch_size, seed=cfg.seed)
    next(it)
    t, tokens = time.perf_counter(), 0
    while time.perf_counter() - t < 5.0:
        tokens += next(it)["inputs"].size
    pipeline_tokens_per_s = tokens / (time.perf_counter() - t)
    train = bench_train(cfg)
    return {"records": records, "tokenizer": cfg.data.tokenizer, "pipeline_tokens_per_s": pipeline_tokens_per_s,
            "train_tokens_per_s": train["tokens_per_s"],
            "pipeline_over_train": pipeline_tokens_per_s / train["tokens_per_s"]}


_LOAD = """import sys, jax
from llmjax import checkpoint
from llmjax.sharding import make_mesh
jax.block_until_ready(runs.load_params("hf:" + sys.argv[1], make_mesh(dict(data=1, fsdp=-1, tensor=1))))
"""
_WHOLE = """import sys, glob, jax
from safetensors.numpy import load_file
tensors = {}
for path in glob.glob(sys.argv[1] + "/*.safetensors"):
    tensors |= load_file(path)
jax.block_until_ready([jax.device_put(x) for x in tensors.values()])
"""


def _peak_rss(*command: str) -> int:
    """Peak resident bytes of `python *command`, run by a fresh process that reports only its one child's
    (Linux gives ru_maxrss in KiB)."""
    import subprocess
    import sys

    report = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", report, sys.executable, *command], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{command[:2]} failed: {done.stderr.strip().splitlines()[-1]}")
    return int(done.stdout) * 1024


def bench_import(cfg) -> dict:
    """Peak host memory of reading a Hugging Face folder of cfg's model (random weights, exported first) into
    sharded arrays, of the whole `python -m llmjax.hf import`, and of the naive way (every file loaded whole,
    then put on the device), each in a fresh process. On a CPU the
    devices' memory is the host's, so the parameters themselves count once; the overhead is the rest."""
    from llmjax.hf.convert import export_run

    with tempfile.TemporaryDirectory() as tmp:
        run, folder = os.path.join(tmp, "run"), os.path.join(tmp, "hf")
        _save_fresh_run(cfg, run)
        export_run(run, folder)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
        out = {"model": cfg.model.name, "params": transformer.param_count(cfg.model), "dtype": cfg.model.param_dtype,
               "safetensors_bytes": size}
        for name, command in (("jax_only", ("-c", "import jax, llmjax.hf.convert; jax.devices()")),
                              ("load", ("-c", _LOAD, folder)),
                              ("import", ("-m", "llmjax.hf", "import", f"--hf_dir={folder}",
                                          f"--workdir={os.path.join(tmp, 'imported')}")),
                              ("whole_files", ("-c", _WHOLE, folder))):
            out[f"{name}_peak_rss_bytes"] = _peak_rss(*command)
    for name in ("load", "import", "whole_files"):
        overhead = out[f"{name}_peak_rss_bytes"] - out["jax_only_peak_rss_bytes"] - size
        out[f"{name}_overhead_over_model"] = overhead / size
    return out


def bench_long_attention(cfg) -> dict:
    return bench_attention.bench_attention(cfg, [int(t) for t in _SEQ_LENS.value or (1024, 4096, 16384)])


def bench_context(cfg) -> dict:
    return bench_attention.bench_context(cfg, [int(t) for t in _SEQ_LENS.value or (8192,)],
                                         [int(c) for c in _CONTEXTS.value], _GLOBAL_BATCH.value)


BENCHES = {"train": bench_train, "moe": bench_moe, "generate": bench_generate, "engine": bench_engine.bench_engine,
           "dpo": bench_dpo, "ppo": bench_ppo, "data": bench_data, "import": bench_import,
           "attention": bench_long_attention, "context": bench_context}


def _import_estimate() -> None:
    """Imports llmjax.estimate (its xla_memory compiles the train step for `attention` and `context`), which
    defines a --config flag of its own on import: ours is set aside while it does, then put back, and it is shown
    no command line, from which it would define --config.* overrides that are ours too."""
    import sys

    ours, argv = flags.FLAGS["config"], sys.argv
    delattr(flags.FLAGS, "config")
    sys.argv = argv[:1]
    try:
        import llmjax.estimate  # noqa: F401
    finally:
        sys.argv = argv
        if "config" in flags.FLAGS:
            delattr(flags.FLAGS, "config")
        flags.FLAGS["config"] = ours


def main(argv: list[str]) -> None:
    what = argv[1] if len(argv) > 1 else "train"
    if what not in BENCHES:
        raise app.UsageError(f"unknown benchmark {what!r}; choose one of {', '.join(BENCHES)}")
    if what == "context":
        bench_attention.use_cpu_devices(8)  # before anything touches a backend
    if what in ("attention", "context"):
        _import_estimate()
    cfg = _CONFIG.value
    registry.validate(cfg, jax.device_count())
    result = {"benchmark": what, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "host": platform.node(), **BENCHES[what](cfg)}
    path = _OUT.value or f"bench_{what}.json"
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main)
