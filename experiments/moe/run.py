"""A mixture of experts against its dense twin (equal active parameters, so equal FLOPs per token) on the Python
standard library's source in bytes (configs/stdlib.py): held-out loss at equal steps, and each expert's share of
the routed tokens with the load-balancing loss on and off. Writes results.json and utilisation.png into --out.

  python -m experiments.moe.run --out=experiments/moe/results                      # moe-small on all of the stdlib
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.moe.run --out=/tmp/moe --model=moe-tiny \
      --subdir=email --steps=1500 --seq_len=128   # the committed results: about 5 minutes on 2 CPU cores
"""

import json
import math
import os

import jax
import ml_collections
import numpy as np
from absl import flags

from configs import stdlib
from experiments.pipeline.run import read_metrics
from llmjax import runs, sharding
from llmjax.cli import run_main
from llmjax.config import override
from llmjax.data import pipeline
from llmjax.models import moe, transformer
from llmjax.train import registry

# name, model overrides: the MoE as its preset has it, the same without the load-balancing loss, its dense twin
RUNS = (("moe", {}), ("moe_no_balance", {"moe_balance_coef": 0.0}), ("dense", None))


def run_config(model: str, steps: int, subdir: str, data_dir: str, changes: dict | None,
               **overrides) -> ml_collections.ConfigDict:
    """configs/stdlib.py for `model` with `changes` to its keys (None: its dense twin), evaluated once at the end."""
    cfg = stdlib.get_config(f"subdir={subdir},validation=0.2,model={model},steps={steps}")
    cfg.data.data_dir = data_dir
    cfg.eval_every = cfg.checkpoint.every = steps
    cfg.model.update(moe.dense_twin(cfg.model) if changes is None else changes)
    for key, value in overrides.items():
        override(cfg, key, value)
    return cfg


def utilisation(cfg, workdir: str, mesh, batches: int = 8) -> np.ndarray:
    """Each expert's share of the routed copies of held-out tokens, per MoE layer, times E (1 = an even share)."""
    params = runs.load_params(workdir, mesh)
    fwd = jax.jit(lambda p, b: transformer.forward(p, b["inputs"], b["positions"], b["segment_ids"], cfg.model,
                                                   sharding.make_constrain(mesh, cfg.rules)).moe["load"])
    held_out = pipeline.validation_batches(cfg, sharding.batch_sharding(mesh, cfg.rules), batches)
    return np.mean([np.asarray(fwd(params, b)) for b in held_out], axis=0) * cfg.model.moe_experts


def train(name: str, cfg, out: str, devices=None) -> dict:
    """One run on `devices` (default all; skipped when its workdir is complete): its held-out loss (nats per byte)
    and utilisation."""
    workdir = os.path.join(out, name)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    if not os.path.exists(os.path.join(workdir, "done")):
        registry.train(cfg, workdir, mesh)
        open(os.path.join(workdir, "done"), "w").close()
    rows = read_metrics(workdir)
    last = [r for r in rows if "eval/perplexity" in r][-1]
    result = {"name": name, "model": cfg.model.name, "steps": cfg.steps, "params": transformer.param_count(cfg.model),
              "active_params": transformer.active_param_count(cfg.model),
              "heldout_loss": math.log(last["eval/perplexity"]),
              "tokens_per_s": float(np.median([r["tokens_per_s"] for r in rows if "tokens_per_s" in r]))}
    if cfg.model.moe_experts:
        result["utilisation"] = utilisation(cfg, workdir, mesh).tolist()
    return result


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    shown = [r for r in results.values() if "utilisation" in r]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.4), sharey=True)
    for ax, r in zip(np.atleast_1d(axes), shown, strict=True):
        load_LE = np.asarray(r["utilisation"])
        x = np.arange(load_LE.shape[1])
        for i, layer in enumerate(load_LE):
            ax.bar(x + (i - (len(load_LE) - 1) / 2) * 0.8 / len(load_LE), layer, 0.8 / len(load_LE),
                   label=f"MoE layer {i}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set(title=f"{r['name']}: held-out {r['heldout_loss']:.3f} nats/byte", xlabel="expert", xticks=x)
    np.atleast_1d(axes)[0].set_ylabel("share of routed tokens x E (1 = even)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"dense twin (equal active parameters): held-out {results['dense']['heldout_loss']:.3f} nats/byte")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv) -> None:
    f = flags.FLAGS
    os.makedirs(f.out, exist_ok=True)
    results = {name: train(name, run_config(f.model, f.steps, f.subdir, os.path.join(f.out, "tfds"), changes,
                                            batch_size=f.batch_size, seq_len=f.seq_len), f.out)
               for name, changes in RUNS}
    with open(os.path.join(f.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    plot(results, os.path.join(f.out, "utilisation.png"))
    for r in results.values():
        load = np.asarray(r.get("utilisation", [[np.nan]]))
        print(f"{r['name']:15s} held-out {r['heldout_loss']:.4f} nats/byte, {r['active_params']:,} active of "
              f"{r['params']:,}, {r['tokens_per_s']:,.0f} tokens/s, utilisation min {load.min():.3f} max "
              f"{load.max():.3f}")


if __name__ == "__main__":
    flags.DEFINE_string("out", "experiments/moe/results", "Folder for the runs, results.json and utilisation.png.")
    flags.DEFINE_string("model", "moe-small", "An MoE preset.")
    flags.DEFINE_integer("steps", 600, "Steps of every run.")
    flags.DEFINE_string("subdir", "", "A package of the standard library, or all of it.")
    flags.DEFINE_integer("batch_size", 16, "Rows per step.")
    flags.DEFINE_integer("seq_len", 256, "Bytes per row.")
    run_main(main)
