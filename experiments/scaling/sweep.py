"""IsoFLOP sweep on the synthetic corpus: several small Llama-style models at each of a few compute budgets,
each trained to exactly its budget, then the Chinchilla fit (llmjax.scaling) and a plot.

  python -m experiments.scaling.sweep --out=experiments/scaling/results     # ~45 min on a 2-core CPU (2 seeds)

Budgets count FLOPs by the codebase's convention (llmjax.metrics: 6 N + 12 L T attn_dim per token), N being
the parameters that take part in matmuls (the unembedding included, the embedding lookup not). Every run
uses the same batch (16 x 64 tokens), learning rate and cosine schedule stretched to its own step count, so
the budget decides only the model size and the number of steps. The loss is measured on held-out batches
(another seed of the same tasks) and averaged over training seeds (--seeds) before the fit. Finished runs are
kept in runs.json and skipped when the sweep restarts.
"""

import json
import logging
import math
import os
import tempfile
import time

import jax
import ml_collections
from absl import flags

from experiments.scaling import plot
from llmjax import cli, config
from llmjax.data import synthetic
from llmjax.data.synthetic import HELD_OUT
from llmjax.models import presets, transformer
from llmjax.sharding import batch_sharding, make_mesh, no_constrain
from llmjax.train import common, pretrain, registry

_OUT = flags.DEFINE_string("out", "experiments/scaling/results", "Folder for runs.json, fit.json, isoflops.png.")
_BUDGETS = flags.DEFINE_list("budgets", ["1e11", "3e11", "1e12"], "Compute budgets in FLOPs.")
_SIZES = flags.DEFINE_list("sizes", ["8x1", "16x1", "16x2", "24x2", "32x2", "48x2", "64x3"],
                           "The ladder of model sizes, d_model x n_layers (d_ff ~ 8/3 d_model).")
_PER_BUDGET = flags.DEFINE_integer("per_budget", 5, "Sizes per budget: budget i trains sizes[i : i + per_budget].")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Rows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 64, "Tokens per row.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 32, "Held-out batches for the final loss.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Training seeds per point; the fit uses their mean loss.")


def model(d_model: int, n_layers: int, seq_len: int) -> dict:
    """A Llama-style model of the given width and depth (presets' defaults; the byte tokenizer's 262 tokens);
    heads of 16 dimensions, or 8 when the width is not a multiple of 16."""
    head_dim = 16 if d_model % 16 == 0 else 8
    return dict(presets.DEFAULTS, name=f"d{d_model}-l{n_layers}", vocab_size=262, d_model=d_model,
                n_layers=n_layers, n_heads=d_model // head_dim, n_kv_heads=d_model // head_dim, head_dim=head_dim,
                d_ff=16 * math.ceil(8 * d_model / 3 / 16), max_seq_len=seq_len, remat="all_dots")


def run_config(budget: float, d_model: int, n_layers: int, batch_size: int, seq_len: int) -> ml_collections.ConfigDict:
    """The pretraining config whose steps spend `budget` FLOPs (rounded to whole steps)."""
    cfg = config.base()
    cfg.model = ml_collections.ConfigDict(model(d_model, n_layers, seq_len))
    cfg.data.tokenizer = "byte"
    cfg.batch_size, cfg.seq_len = batch_size, seq_len
    cfg.steps = max(1, round(budget / (common.lm_flops(cfg) * batch_size * seq_len)))
    cfg.optim.warmup_steps = max(1, cfg.steps // 10)
    cfg.eval_every, cfg.log_every = 0, max(1, cfg.steps // 20)
    cfg.checkpoint.update(every=cfg.steps, keep=1, use_async=False)
    cfg.peak_flops = 1.0  # skip measuring the matmul rate; MFU is not what this sweep reports
    return cfg


def heldout_loss(cfg, params, n_batches: int) -> float:
    """Mean next-token loss per target token over held-out batches: the same batches for every run, from a
    seed no training run uses."""
    sharding = batch_sharding(make_mesh(cfg.mesh), cfg.rules)
    get = synthetic.batches(cfg, sharding, seed=HELD_OUT)
    summed = jax.jit(lambda p, b: pretrain.loss_fn(p, b, cfg, no_constrain, normalizer=1.0)[0])
    batches = [get(i) for i in range(n_batches)]
    return sum(float(summed(params, b)) for b in batches) / sum(float(b["loss_mask"].sum()) for b in batches)


def train_one(budget: float, d_model: int, n_layers: int, seed: int) -> dict:
    cfg = run_config(budget, d_model, n_layers, _BATCH.value, _SEQ.value)
    cfg.seed = seed
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        state = registry.train(cfg, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    wall_s = time.perf_counter() - t
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    fpt = common.lm_flops(cfg)
    return {"budget": budget, "d_model": d_model, "n_layers": n_layers, "seed": seed,
            "params": transformer.param_count(cfg.model), "matmul_params": transformer.matmul_param_count(cfg.model),
            "flops_per_token": fpt, "steps": cfg.steps, "tokens": tokens, "flops": fpt * tokens,
            "train_loss": rows[-1]["loss"], "heldout_loss": heldout_loss(cfg, state.params, _EVAL_BATCHES.value),
            "wall_s": wall_s}


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger("llmjax").setLevel(logging.WARNING)  # one line per run, not the loop's per-step log
    os.makedirs(_OUT.value, exist_ok=True)
    path = os.path.join(_OUT.value, "runs.json")
    runs = []
    if os.path.exists(path):
        with open(path) as f:
            runs = json.load(f)["runs"]
    sizes = [tuple(int(v) for v in s.split("x")) for s in _SIZES.value]
    start = time.perf_counter()
    for seed in (int(s) for s in _SEEDS.value):
        for i, budget in enumerate(float(b) for b in _BUDGETS.value):
            for d_model, n_layers in sizes[i:i + _PER_BUDGET.value]:
                key = (budget, d_model, n_layers, seed)
                if any((r["budget"], r["d_model"], r["n_layers"], r["seed"]) == key for r in runs):
                    continue
                runs.append(r := train_one(*key))
                print(f"C={budget:.3g} d={d_model} L={n_layers} seed={seed} N={r['matmul_params']} D={r['tokens']} "
                      f"steps={r['steps']} held-out loss={r['heldout_loss']:.4f} ({r['wall_s']:.0f} s)", flush=True)
                with open(path, "w") as f:
                    json.dump({"batch_size": _BATCH.value, "seq_len": _SEQ.value, "runs": runs}, f, indent=1)
    print(f"sweep: {time.perf_counter() - start:.0f} s for the runs not already in {path}")
    fit = plot.report(runs, _OUT.value)
    print(json.dumps({k: fit[k] for k in ("n_exponent", "d_exponent", "n_coef", "d_coef")}, indent=1))


if __name__ == "__main__":
    cli.run_main(main)
