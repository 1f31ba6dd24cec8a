"""Pretraining on a mixture of the synthetic tasks and the Python standard library (configs/mixture.py), with and
without an annealing stage: the same run, warmup-stable-decay to 0 over its last 20%, either reading the same
mixture to the end (`steady`), or while the learning rate decays the tasks alone (`annealed`) or upweighted to 95%
(`upweighted`): Llama 3's recipe of annealing on high-quality data. Each is evaluated on every source's held-out
bytes and on the tasks' held-out prompts. Writes results.md, results.json and mixture.png into --workdir.

  python -m experiments.mixture.run --workdir=runs/mixture_exp                           # small, CPU
  python -m experiments.mixture.run --workdir=/tmp/m --model=tiny --steps=40 --subdir=email --validation=0.2

A run whose workdir is finished is not trained again, so a killed experiment resumes where it stopped.
"""

import json
import os

from absl import flags

from experiments.pipeline.run import fmt, read_metrics
from llmjax.cli import run_main
from llmjax.config import load
from llmjax.sharding import make_mesh
from llmjax.train import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = {"steady": "anneal_tasks=0", "annealed": "anneal_tasks=1", "upweighted": "anneal_tasks=0.95"}


def run(root: str, model: str, steps: int, subdir: str = "", validation: float = 0.02) -> list[dict]:
    """Trains both variants into root/<variant>; returns each one's final evaluation and data read."""
    results = []
    for name, arg in VARIANTS.items():
        cfg = load(f"{ROOT}/configs/mixture.py:{arg},model={model},steps={steps},subdir={subdir},"
                   f"validation={validation}")
        cfg.eval_every = max(1, steps // 6)
        workdir = os.path.join(root, name)
        print(f"== {name}: data.weights={cfg.data.weights!r} -> {workdir}", flush=True)
        registry.train(cfg, workdir, make_mesh(cfg.mesh))
        rows = read_metrics(workdir)
        last = [r for r in rows if "eval/perplexity" in r][-1]
        data = [r for r in rows if "data/tasks/tokens" in r][-1]
        results.append({"variant": name, "weights": cfg.data.weights, "steps": last["step"],
                        **{k[5:]: v for k, v in last.items() if k.startswith("eval/")},
                        **{k: v for k, v in data.items() if k.startswith("data/")}})
    return results


def table(results: list[dict]) -> str:
    tasks = sorted(k.split("/")[1] for k in results[0] if k.startswith("accuracy/"))
    lines = ["| run | data.weights | tokens: tasks / stdlib | stdlib epochs | perplexity: tasks | stdlib | "
             "task accuracy | " + " | ".join(tasks) + " |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
             + " ---: |" * len(tasks)]
    for r in results:
        lines.append(f"| {r['variant']} | `{r['weights']}` | {r['data/tasks/tokens']:,.0f} / "
                     f"{r['data/stdlib/tokens']:,.0f} | {r['data/stdlib/epochs']:.3f} | "
                     f"{r['perplexity/tasks']:.3f} | {r['perplexity/stdlib']:.3f} | {fmt(r['accuracy'], True)} | "
                     + " | ".join(fmt(r[f"accuracy/{t}"], True) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot(root: str, path: str) -> None:
    """Held-out perplexity of each source and task accuracy over the steps, both variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, style in zip(VARIANTS, ("-", "--", ":"), strict=True):
        evals = [r for r in read_metrics(os.path.join(root, name)) if "eval/perplexity" in r]
        steps = [r["step"] for r in evals]
        for ax, key in zip(axes, ("perplexity/tasks", "perplexity/stdlib", "accuracy"), strict=True):
            scale = 100 if key == "accuracy" else 1
            ax.plot(steps, [scale * r[f"eval/{key}"] for r in evals], style, marker="o", label=name)
            ax.set(xlabel="step", title=f"held-out {key.replace('/', ': ')}",
                   ylabel="%" if key == "accuracy" else "perplexity per byte")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    results = run(f.workdir, f.model, f.steps, f.subdir, f.validation)
    with open(os.path.join(f.workdir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    with open(os.path.join(f.workdir, "results.md"), "w") as file:
        file.write(table(results))
    plot(f.workdir, os.path.join(f.workdir, "mixture.png"))
    print(table(results))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "runs/mixture_exp", "Where both runs and the results go.")
    flags.DEFINE_string("model", "small", "Model preset.")
    flags.DEFINE_integer("steps", 600, "Steps of each run.")
    flags.DEFINE_string("subdir", "", "A package of the standard library instead of all of it (a quick look).")
    flags.DEFINE_float("validation", 0.02, "The share of the library's files held out.")
    run_main(main)
