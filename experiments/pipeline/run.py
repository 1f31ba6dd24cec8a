"""The whole pipeline, each stage starting from the previous stage's checkpoint: on the synthetic tasks,
pretrain -> SFT -> reward model -> DPO, PPO rewarded by that reward model, PPO and GRPO rewarded by the tasks'
checkers; and on a prompts file of arithmetic word problems (experiments/rl/word_problems.py, written into
--workdir), SFT on some of them, then GRPO rewarded by `math` against the others' answers. Each RL stage's start
(its parent) is evaluated on the stage's own held-out prompts too, so the table shows what RL changed. Writes
results.md and results.json (each stage's held-out metrics) and pipeline.png into --workdir.

  python -m experiments.pipeline.run --workdir=runs/pipeline                       # small preset, CPU
  python -m experiments.pipeline.run --workdir=/tmp/pipe --model=tiny --scale=0.1   # a quick look

Every stage is the same command a researcher would type (its config file, its run command in the docstring);
a stage whose workdir is complete is not trained again, so a killed pipeline resumes where it stopped.
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import flags

from experiments.rl import word_problems
from llmjax import runs
from llmjax.cli import run_main
from llmjax.config import load
from llmjax.data import prompts
from llmjax.evaluate import make_evaluator
from llmjax.sharding import make_mesh
from llmjax.train import registry

# name, config file[:args], the stage it starts from, overrides ({stage} names another stage's workdir, {problems}
# and {problems_sft} the word problems' files, {data_dir} where their prepared copies go)
MATH = {"data.data_dir": "{data_dir}"}
STAGES = (
    ("pretrain", "configs/pretrain.py", None, {}),
    ("sft", "configs/sft.py", "pretrain", {}),
    ("reward", "configs/reward.py", "sft", {}),
    ("dpo", "configs/dpo.py", "sft", {"dpo.nll_weight": 1.0}),
    ("ppo", "configs/ppo.py", "sft", {"ppo.reward": "{reward}"}),
    ("ppo_tasks", "configs/ppo.py:reward=tasks", "sft", {}),
    ("grpo", "configs/ppo.py:algorithm=grpo,reward=tasks", "sft", {}),
    ("sft_math", "configs/sft.py:steps=400", "sft", {**MATH, "data.source": "files:{problems_sft}", "seq_len": 160}),
    ("grpo_math", "configs/ppo.py:algorithm=grpo,reward=math,steps=200", "sft_math", {
        **MATH, "data.source": "files:{problems}", "data.validation": 0.05, "data.tasks": "add", "batch_size": 128,
        "eval_every": 100, "ppo.tasks": "", "ppo.max_prompt_len": 144, "ppo.max_new_tokens": 8}),
)
PROBLEMS, TOP = 5000, 9  # word problems in each file (RL prompts, 5% held out; SFT records), their largest count
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stage_config(spec: str, model: str, scale: float, overrides: dict) -> ml_collections.ConfigDict:
    """A config file's get_config, with model and scaled steps as its arguments, then the overrides."""
    path, _, arg = spec.partition(":")
    path = os.path.join(ROOT, path)
    steps = max(2, round(load(f"{path}:{arg}").steps * scale))
    cfg = load(f"{path}:" + ",".join(filter(None, (arg, f"model={model}", f"steps={steps}"))), **overrides)
    if cfg.eval_every:
        cfg.eval_every = min(cfg.eval_every, steps)
    cfg.checkpoint.every = min(cfg.checkpoint.every, steps)
    return cfg


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summarise(name: str, rows: list[dict], seconds: float) -> dict:
    """A stage's row of the table: its last held-out evaluation, and for PPO/GRPO the mean reward of the first
    and last quarter of its iterations and the KL to the reference at the end."""
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    last = {k[5:]: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval/")}
    out = {"stage": name, "steps": max(r["step"] for r in rows), "minutes": seconds / 60}
    if name == "reward":
        out |= {"rm_accuracy": last.get("accuracy"), "rm_margin": last.get("margin")}
    else:
        out |= {"perplexity": last.get("perplexity"), "accuracy": last.get("accuracy")}
        out |= {f"accuracy/{k.split('/')[1]}": v for k, v in last.items() if k.startswith("accuracy/")}
    if any("score" in r for r in rows):
        scores = [r["score"] for r in rows if "score" in r]
        n = max(1, len(scores) // 4)
        out |= {"reward_start": float(np.mean(scores[:n])), "reward_end": float(np.mean(scores[-n:])),
                "kl_to_ref": float(np.mean([r["kl_to_ref"] for r in rows if "kl_to_ref" in r][-n:]))}
    if name == "dpo":
        out["kl_to_ref"] = [r["kl"] for r in rows if "kl" in r][-1]
    return out


def own_accuracy(cfg, metrics: dict | list[dict], when: str) -> dict:
    """{"own_<when>": mean held-out accuracy on the RL stage's own prompts}: its ppo.tasks (or data.tasks), or its
    prompt source; from evaluator metrics, or the last evaluation of a run's metrics rows."""
    if isinstance(metrics, list):
        metrics = {k[5:]: v for k, v in [r for r in metrics if "eval/accuracy" in r][-1].items() if k[:5] == "eval/"}
    sets = (cfg.ppo.tasks or cfg.data.tasks).split(",") if cfg.data.source == "synthetic" else [
        prompts.name(cfg.data.source)]
    return {f"own_{when}": float(np.mean([metrics[f"accuracy/{s}"] for s in sets])), "own_prompts": ", ".join(sets)}


def fmt(value, pct: bool = False) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}%" if pct else f"{value:.3g}"


def table(results: list[dict], focus: list[str]) -> str:
    """The markdown table; `focus` names the tasks the RL stages are prompted with, whose mean accuracy gets its
    own column (each stage evaluates the same number of prompts per task)."""
    lines = ["| stage | steps | held-out perplexity | task accuracy | accuracy on " + ", ".join(focus) +
             " | RL: accuracy on its prompts (start → end) | RM pair accuracy | mean reward (start → end) | "
             "KL to reference | minutes |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |"]
    for r in results:
        reward = f"{r['reward_start']:.3f} → {r['reward_end']:.3f}" if "reward_start" in r else ""
        own = (f"{r['own_prompts']}: {fmt(r['own_start'], True)} → {fmt(r['own_end'], True)}" if "own_start" in r
               else "")
        per_task = [r.get(f"accuracy/{t}") for t in focus]
        focused = None if None in per_task else sum(per_task) / len(per_task)
        lines.append(f"| {r['stage']} | {r['steps']} | {fmt(r.get('perplexity'))} | {fmt(r.get('accuracy'), True)} | "
                     f"{fmt(focused, True)} | {own} | {fmt(r.get('rm_accuracy'), True)} | {reward} | "
                     f"{fmt(r.get('kl_to_ref'))} | {r['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], runs: dict[str, list[dict]], focus: list[str], path: str) -> None:
    """Held-out accuracy per stage (all tasks, and the RL stages' tasks) next to each RL run's mean reward and KL
    to the reference per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rl = [name for name, rows in runs.items() if any("score" in r for r in rows)]
    fig, axes = plt.subplots(1, 1 + len(rl), figsize=(4.8 * (1 + len(rl)), 4))
    left, *right = np.atleast_1d(axes)
    scored = [r for r in results if r.get("accuracy") is not None]
    x = np.arange(len(scored))
    left.bar(x - 0.2, [100 * r["accuracy"] for r in scored], 0.4, label="all tasks")
    left.bar(x + 0.2, [100 * np.mean([r.get(f"accuracy/{t}", np.nan) for t in focus]) for r in scored], 0.4,
             label=", ".join(focus))
    left.set_xticks(x, [r["stage"] for r in scored], rotation=30)
    left.set(ylabel="held-out accuracy (%)", title="exact-match accuracy by stage (greedy)")
    left.legend(loc="upper left")
    for ax, name in zip(right, rl, strict=True):
        rows = [r for r in runs[name] if "score" in r]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["score"] for r in rows], color="tab:blue", alpha=0.35)
        window = max(1, len(rows) // 10)
        ax.plot(steps[window - 1:], np.convolve([r["score"] for r in rows], np.ones(window) / window, "valid"),
                color="tab:blue", label="mean reward")
        ax.set(xlabel="iteration", ylabel="mean reward" + (" (reward model)" if name == "ppo" else " (verifiers)"),
               title=f"{name}: reward and KL to the reference")
        kl = ax.twinx()
        kl.plot(steps, [r["kl_to_ref"] for r in rows], color="tab:red", label="KL to reference")
        kl.set_ylabel("KL to reference (nats per answer)", color="tab:red")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(root: str, model: str, scale: float, devices: list | None = None) -> dict:
    """Trains every stage into root/<stage> (or finds it trained) on `devices` (default all), then writes the table
    and plot; returns what results.json holds. Every stage's config is validated before the first one trains."""
    devices = devices or jax.devices()
    paths = {name: os.path.join(root, name) for name, *_ in STAGES}
    paths |= {name: os.path.join(root, file) for name, file in (("problems", "problems.jsonl"), ("data_dir", "tfds"),
                                                                 ("problems_sft", "problems_sft.jsonl"))}
    if not os.path.exists(paths["problems_sft"]) and jax.process_index() == 0:
        os.makedirs(root, exist_ok=True)
        word_problems.write(paths["problems"], PROBLEMS, seed=0, sft_path=paths["problems_sft"], top=TOP)
    configs = {}
    for name, spec, parent, overrides in STAGES:
        cfg = stage_config(spec, model, scale, {k: v.format(**paths) if isinstance(v, str) else v
                                                for k, v in overrides.items()})
        if parent:
            cfg.init_from = paths[parent]
        registry.validate(cfg, len(devices))
        configs[name] = cfg
    rl = next(cfg for cfg in configs.values() if cfg.trainer == "ppo")
    focus = (rl.ppo.tasks or rl.data.tasks).split(",")
    results, logged = [], {}
    for name, cfg in configs.items():
        print(f"== {name}: {cfg.trainer} from {cfg.init_from or 'scratch'} -> {paths[name]}", flush=True)
        t = time.perf_counter()
        mesh = make_mesh(cfg.mesh, devices)
        registry.train(cfg, paths[name], mesh)
        logged[name] = read_metrics(paths[name])
        results.append(summarise(name, logged[name], time.perf_counter() - t))
        if cfg.trainer == "ppo":  # the start, on the same held-out prompts: what RL changed
            start = make_evaluator(cfg, mesh, n=cfg.eval_prompts, on_prompts=registry.get(cfg).prompts)(
                runs.load_params(cfg.init_from, mesh))
            results[-1] |= own_accuracy(cfg, start, "start") | own_accuracy(cfg, logged[name], "end")
        print(table(results[-1:], focus), flush=True)
    out = {"model": model, "scale": scale, "focus": focus, "stages": results}
    if jax.process_index() == 0:
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump(out, f, indent=2)
        with open(os.path.join(root, "results.md"), "w") as f:
            f.write(table(results, focus))
        plot(results, logged, focus, os.path.join(root, "pipeline.png"))
    return out


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    out = run(f.workdir, f.model, f.scale)
    print(table(out["stages"], out["focus"]))


if __name__ == "__main__":  # flags only for the command line: the tests import run()
    flags.DEFINE_string("workdir", "runs/pipeline", "Where every stage's run and the results go.")
    flags.DEFINE_string("model", "small", "Model preset for every stage.")
    flags.DEFINE_float("scale", 1.0, "Multiplies every stage's steps (0.1: a quick look).")
    run_main(main)
