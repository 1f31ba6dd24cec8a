"""Context extension measured: a model pretrained at `short` tokens on the long-range passkey task (llmjax.data.tasks)
answers it at `long` tokens only where the key is as near the question as it saw in pretraining; the extension
stage (configs/extend.py: the same parameters at `long` tokens, RoPE scaled by each of `ropes`, a few hundred
steps) makes it answer from anywhere in the longer context. Every model is evaluated on held-out prompts of both
lengths, greedy accuracy by the distance between the key and the question; `scaled` rows are the pretrained
parameters under a variant's RoPE scaling before any extension step (what interpolation alone does). Writes
results.md and results.json into --workdir.

  python -m experiments.extension.run --workdir=runs/extension_exp          # small, CPU
  python -m experiments.extension.run --workdir=/tmp/e --model=tiny --steps=4 --extend_steps=2 --short=64 \\
      --long=128 --n=8

A finished stage (a run that reached its steps, an evaluation written) is not done again, so a killed experiment
resumes where it stopped.
"""

import json
import os
import time
from dataclasses import dataclass

from absl import flags

from experiments.pipeline.run import fmt, read_metrics
from llmjax import runs
from llmjax.cli import run_main
from llmjax.config import load
from llmjax.evaluate import make_evaluator
from llmjax.sharding import make_constrain, make_mesh
from llmjax.train import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT = 3  # tokens the chat template adds to a document (bos, user, end, assistant, eos against bos, eos)


@dataclass(frozen=True)
class Plan:
    model: str = "small"
    steps: int = 400  # pretraining
    extend_steps: int = 100
    short: int = 256
    long: int = 2048
    ropes: tuple[str, ...] = ("default", "linear", "yarn")
    digits: int = 1
    n: int = 64  # held-out prompts per evaluation
    lr: float = 1e-3  # the extension's

    def task(self, length: int) -> str:
        """The passkey task whose chat documents fill a row of `length` tokens."""
        return f"passkey_{length + 1 - CHAT}_{self.digits}"


def pretrain_config(plan: Plan):
    """configs/pretrain.py at `short` tokens, model.max_seq_len too, on passkey documents of an eighth, a quarter, a
    half and all of a row (short documents give more keys a step to learn from), the loss on the answers (chat)."""
    tasks = ",".join(dict.fromkeys(plan.task(max(32, plan.short // k)) for k in (8, 4, 2, 1)))
    return load(f"{ROOT}/configs/pretrain.py:model={plan.model},steps={plan.steps}", seq_len=plan.short,
                **{"model.max_seq_len": plan.short, "data.tasks": tasks, "data.format": "chat",
                   "eval_every": max(1, plan.steps // 4), "eval_prompts": 32})


def extend_config(plan: Plan, base: str, rope: str):
    return load(f"{ROOT}/configs/extend.py:base={base},seq_len={plan.long},rope={rope},steps={plan.extend_steps},"
                f"lr={plan.lr},tasks={plan.task(plan.long)}", eval_prompts=32)  # the base's format: chat


def train(cfg, workdir: str, mesh) -> dict:
    """Trains cfg into workdir (resuming); its wall time, and its mean step time from the logged throughput, kept
    in workdir/timing.json once it has finished."""
    path = os.path.join(workdir, "timing.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    start = time.time()
    registry.train(cfg, workdir, mesh)
    rates = [r["tokens_per_s"] for r in read_metrics(workdir) if "tokens_per_s" in r][1:]  # the first compiles
    timing = {"minutes": (time.time() - start) / 60,
              "step_s": cfg.batch_size * cfg.seq_len / (sum(rates) / len(rates)) if rates else 0.0}
    with open(path, "w") as f:
        json.dump(timing, f)
    return timing


def evaluate(plan: Plan, cfg, params, length: int, path: str, mesh) -> dict:
    """Greedy accuracy on plan.n held-out prompts of `length` tokens (by distance), under cfg's model; cached."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    cfg = cfg.copy_and_resolve_references()
    cfg.data.tasks, cfg.seq_len = plan.task(length), length
    start = time.time()
    found = make_evaluator(cfg, mesh, make_constrain(mesh, cfg.rules), n=plan.n, batches=1)(params)
    name = plan.task(length)
    out = {k.replace(f"/{name}", ""): v for k, v in found.items() if k.startswith(f"accuracy/{name}")}
    out |= {"perplexity": found["perplexity"], "eval_minutes": (time.time() - start) / 60}
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    return out


def run(root: str, plan: Plan) -> dict:
    """Every stage in order (resuming): {"rows": one per (model, RoPE, evaluation length), "stages": each training
    run's timing}."""
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    base = os.path.join(root, "pretrain")
    cfg = pretrain_config(plan)
    print(f"== pretrain: {cfg.data.tasks} at {plan.short} tokens -> {base}", flush=True)
    stages = {"pretrain": train(cfg, base, mesh)}
    params = runs.load_params(base, mesh)
    rows = []

    def measure(name: str, rope: str, cfg, params, workdir: str) -> None:
        for length in (plan.short, plan.long):
            path = os.path.join(workdir, f"eval_{name}_{rope}_{length}.json")
            result = evaluate(plan, cfg, params, length, path, mesh)
            rows.append({"model": name, "rope": rope, "factor": cfg.model.rope_scaling, "length": length, **result})
            print(f"   {name} ({rope}) at {length} tokens: {fmt(result['accuracy'], True)}", flush=True)

    measure("pretrained", "default", cfg, params, base)
    for rope in plan.ropes:
        workdir = os.path.join(root, f"extend_{rope}")
        cfg = extend_config(plan, base, rope)
        if rope != "default":
            measure("scaled", rope, cfg, params, base)
        print(f"== extend: rope={rope} x{cfg.model.rope_scaling:g} at {plan.long} tokens -> {workdir}", flush=True)
        stages[f"extend_{rope}"] = train(cfg, workdir, mesh)
        measure("extended", rope, cfg, runs.load_params(workdir, mesh), workdir)
    return {"rows": rows, "stages": stages}


def table(results: dict) -> str:
    """Accuracy by distance, one row per model and length; then each training run's time."""
    rows = results["rows"]
    buckets = sorted({k.split("/")[1] for r in rows for k in r if k.count("/") == 1},
                     key=lambda b: int(b[1:].split("-")[0]))
    lines = ["| model | RoPE | prompt tokens | accuracy | " + " | ".join(f"key {b[1:]} back" for b in buckets)
             + " | perplexity |", "| --- | --- | ---: | ---: |" + " ---: |" * (len(buckets) + 1)]
    for r in rows:
        rope = r["rope"] + (f" x{r['factor']:g}" if r["rope"] != "default" else "")
        lines.append(f"| {r['model']} | {rope} | {r['length']} | {fmt(r['accuracy'], True)} | "
                     + " | ".join(fmt(r.get(f"accuracy/{b}"), True) for b in buckets) + f" | {r['perplexity']:.3f} |")
    lines += ["", "| run | step | minutes |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {t['step_s']:.2f} s | {t['minutes']:.1f} |" for name, t in results["stages"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    plan = Plan(f.model, f.steps, f.extend_steps, f.short, f.long, tuple(f.ropes), f.digits, f.n, f.lr)
    results = run(f.workdir, plan)
    with open(os.path.join(f.workdir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    with open(os.path.join(f.workdir, "results.md"), "w") as file:
        file.write(table(results))
    print(table(results))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "runs/extension_exp", "Where the runs and the results go.")
    flags.DEFINE_string("model", "small", "Model preset.")
    flags.DEFINE_integer("steps", 400, "Pretraining steps.")
    flags.DEFINE_integer("extend_steps", 100, "Steps of each extension.")
    flags.DEFINE_integer("short", 256, "Pretraining length (tokens a row).")
    flags.DEFINE_integer("long", 2048, "Extension length.")
    flags.DEFINE_list("ropes", ["default", "linear", "yarn"], "The extensions' RoPE scalings (default: none).")
    flags.DEFINE_integer("digits", 1, "Digits of the key.")
    flags.DEFINE_integer("n", 64, "Held-out prompts per evaluation.")
    flags.DEFINE_float("lr", 1e-3, "The extensions' peak learning rate.")
    run_main(main)
