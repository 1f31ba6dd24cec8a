"""Iterative post-training, the Llama 3 recipe: each round samples N answers per prompt from the current policy
(best-of-N, llmjax.rejection_sample), scores them, fine-tunes on each prompt's best (SFT), then on its best and worst
(DPO, whose reference is the round's SFT model), and evaluates greedy accuracy and pass@k on one held-out set, the
same every round; each round asks fresh prompts. With --grpo, one GRPO run from the same start that samples as many
answers as all the rounds together, evaluated alike, is the yardstick.

  python -m experiments.rounds.run --workdir=runs/rounds --start=runs/distill_exp/sft --grpo
  python -m experiments.rounds.run --workdir=runs/rounds_math/rounds --start=runs/rounds_math/start --grpo \\
      --prompts=runs/rounds_math/problems.jsonl --reward=math --tasks=add --max_new_tokens=8 --eval_prompts=256

(README.md: how runs/rounds_math/start and its problems were made, and the results.)

Round r writes WORKDIR/round_r/{prompts.jsonl, samples.jsonl (the kept best), pairs.jsonl, sft/, dpo/, eval.json};
round_0/eval.json is the start's. Each piece is skipped when complete (files are written whole, a run is complete
at its last step), so an experiment killed between rounds or inside one resumes where it stopped. Each step prints
the command a user would type for it, then runs it in this process. Writes results.md, results.json and rounds.png
into WORKDIR.
"""

import dataclasses
import json
import math
import os
import shlex
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import flags

from experiments.pipeline.run import fmt, stage_config
from llmjax import checkpoint, config, runs
from llmjax import rejection_sample as rs
from llmjax.cli import run_main
from llmjax.data import chat, prompts
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.evaluate import make_evaluator
from llmjax.sharding import make_constrain, make_mesh
from llmjax.train import registry

# A tenth of configs/sft.py's rate: a fresh optimizer's first steps at 1e-3 undo the model (round 1 of `small` lost
# 20 points of sort accuracy); RPO (DPO plus the chosen answers' NLL) gently, as plain DPO lowers accuracy
SFT_DEFAULTS = {"optim.lr": 1e-4}
DPO_DEFAULTS = {"dpo.nll_weight": 1.0, "optim.lr": 3e-5}
GRPO_PROMPTS = 32  # prompts per GRPO iteration (configs/ppo.py's batch of 256 answers at 8 per prompt)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The experiment's settings (its flags)."""

    start: str                      # round 0's policy: an SFT run
    rounds: int = 3
    n: int = 8                      # answers sampled per prompt
    num_prompts: int = 1024         # fresh prompts per round
    prompts: str = "synthetic"      # or a .jsonl of prompt records (e.g. {prompt, answer})
    tasks: str = ""                 # synthetic tasks asked and evaluated ("": the start's data.tasks)
    validation: float = 0.05        # the share of a prompts file held out for evaluation
    reward: str = "tasks"           # a reward model run or a llmjax.rewards spec
    min_score: float | None = 1.0   # keep a prompt's best only if it scores this (1: verifiers' right answers)
    max_new_tokens: int = 12
    temperature: float = 1.0
    sft_steps: int = 64             # 0: no SFT
    dpo_steps: int = 0              # 0: no DPO (on `small` it lowered accuracy after SFT, README)
    lora: str = ""                  # lora.targets of both stages ("": full fine-tuning)
    sft_config: tuple[str, ...] = ()  # key=value overrides of every SFT stage
    dpo_config: tuple[str, ...] = ()  # and of every DPO stage
    eval_prompts: int = 128         # held-out prompts per set
    samples: int = 8                # answers per held-out prompt for pass@k
    grpo: bool = False              # also one GRPO run sampling as many answers as the rounds


def typed(cfg, pairs: tuple[str, ...], flag: str) -> dict:
    """key=value overrides, each value of its key's type in `cfg`, as --config.key=value parses it."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise LlmjaxError(f"--{flag}={pair!r} has no '='; write KEY=VALUE, e.g. optim.lr=1e-4")
        try:
            old = config.lookup(cfg, key)
            out[key] = config.BOOLS[text.lower()] if isinstance(old, bool) else type(old)(text)
        except (KeyError, AttributeError, ValueError):
            raise LlmjaxError(f"--{flag}={pair!r}: not KEY=VALUE of an existing config key and a value of its "
                              "type; write e.g. optim.lr=1e-4") from None
    return out


def round_records(plan: Plan, data_cfg) -> tuple[list[list[dict]], list[dict]]:
    """Each round's prompt records, and the pool GRPO draws from (a prompts file's train split): synthetic prompts
    drawn with the round's seed, or consecutive slices of one shuffle of the file's train split."""
    if plan.prompts == "synthetic":
        rounds = [rs.synthetic_records(plan.tasks, plan.num_prompts, seed=r) for r in range(1, plan.rounds + 1)]
        return rounds, [r for records in rounds for r in records]
    pool = [dict(r) for r in prompts.records(data_cfg, "train")]
    order = np.random.default_rng(0).permutation(len(pool))
    return [[pool[order[i % len(pool)]] for i in range(r * plan.num_prompts, (r + 1) * plan.num_prompts)]
            for r in range(plan.rounds)], pool


class Stage(NamedTuple):
    """A training stage: round_r/sft, round_r/dpo or grpo."""

    name: str
    workdir: str
    command: str  # what a user would type
    cfg: ml_collections.ConfigDict


def stage(name: str, spec: str, start: str, overrides: dict, workdir: str) -> Stage:
    """A config file's stage from the start's model (config argument model=START), then the overrides."""
    path, _, arg = spec.partition(":")
    args = [f"--config={path}:model={start},{arg}", *(f"--config.{k}={v}" for k, v in overrides.items()),
            f"--workdir={workdir}"]
    return Stage(name, workdir, " ".join(["python -m llmjax.main", *map(shlex.quote, args)]),
                 stage_config(spec, start, 1.0, overrides))


def stages(plan: Plan, root: str, width: int, longest: int) -> list[Stage]:
    """Every training stage in order: each round's SFT and DPO (those with steps), then GRPO (with --grpo)."""
    base = stage_config("configs/sft.py", plan.start, 1.0, {})
    data = {"data.data_dir": os.path.join(root, "tfds"), "data.validation": 0.0, "eval_every": 0, "seq_len": width}
    if plan.lora:
        data["lora.targets"] = plan.lora
    sft_user = typed(base, plan.sft_config, "sft_config")
    dpo_user = typed(stage_config("configs/dpo.py", plan.start, 1.0, {}), plan.dpo_config, "dpo_config")
    out, policy = [], plan.start
    for r in range(1, plan.rounds + 1):
        here = os.path.join(root, f"round_{r}")
        for name, spec, steps, source, extra in (
                ("sft", "configs/sft.py", plan.sft_steps, "samples.jsonl", SFT_DEFAULTS | sft_user),
                ("dpo", "configs/dpo.py", plan.dpo_steps, "pairs.jsonl", DPO_DEFAULTS | dpo_user)):
            if steps:
                overrides = {"init_from": policy, "data.source": "files:" + os.path.join(here, source), **data,
                             **extra}
                out.append(stage(f"round_{r}/{name}", f"{spec}:steps={steps}", plan.start, overrides,
                                 os.path.join(here, name)))
                policy = out[-1].workdir
    if plan.grpo:
        batch = GRPO_PROMPTS * plan.n
        steps = plan.rounds * plan.num_prompts * plan.n // batch
        spec = f"configs/ppo.py:algorithm=grpo,steps={steps}" + (f",reward={plan.reward}" * ("," not in plan.reward))
        overrides = {"init_from": plan.start, "ppo.reward": plan.reward, "ppo.tasks": "", "data.tasks": plan.tasks,
                     "batch_size": batch, "ppo.group_size": plan.n, "ppo.max_new_tokens": plan.max_new_tokens,
                     "ppo.max_prompt_len": max(40, longest), "ppo.temperature": plan.temperature, "eval_every": 0}
        if plan.prompts != "synthetic":
            overrides |= {"data.source": f"files:{plan.prompts}", "data.validation": plan.validation,
                          "data.data_dir": os.path.join(root, "tfds")}
        out.append(stage("grpo", spec, plan.start, overrides, os.path.join(root, "grpo")))
    return out


def complete(workdir: str, steps: int) -> bool:
    """Whether the run in `workdir` has saved its last step (then it is left untouched)."""
    return os.path.isdir(os.path.join(workdir, "checkpoints")) and checkpoint.latest_step(workdir) == steps


def write_json(path: str, value) -> None:
    runs.write_whole(path, json.dumps(value, indent=2))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def table(out: dict) -> str:
    """One row per policy (round 0 is the start, GRPO last): held-out greedy accuracy, pass@1 and pass@k, overall
    and per set, then what the round trained on: its samples' mean and best-of-N reward, the answers kept, the pairs."""
    k, n = out["plan"]["samples"], out["plan"]["n"]
    rows = out["rounds"] + ([out["grpo"]] if out["grpo"] else [])
    sets = [key.split("/", 1)[1] for key in rows[0] if key.startswith("accuracy/")]
    head = ["round", "greedy", "pass@1", f"pass@{k}", *(f"{s}: greedy / pass@1 / pass@{k}" for s in sets),
            f"trained on: mean reward → best of {n}", "kept", "pairs", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for row in rows:
        data = (f"{row['reward/sample']:.3f} → {row['reward/best_of_n']:.3f}" if "reward/sample" in row else
                f"GRPO, {row['answers']:,} answers" if "answers" in row else "")
        kept = f"{row['kept']} / {row['prompts']}" if "kept" in row else ""
        lines.append("| " + " | ".join([
            str(row["round"]), *(fmt(row.get(m), True) for m in ("accuracy", "pass@1", f"pass@{k}")),
            *(" / ".join(fmt(row.get(f"{m}/{s}"), True) for m in ("accuracy", "pass@1", f"pass@{k}")) for s in sets),
            data, kept, str(row.get("pairs", "")), f"{row['minutes']:.1f}"]) + " |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: str) -> None:
    """Held-out accuracy (greedy, pass@1, pass@k) per round on the rounds' own prompts (all tasks, or a prompts
    file's held-out records), GRPO's as stars at the last round (as many sampled answers); and the mean and best-of-N
    reward of each round's samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, grpo, plan = out["rounds"], out["grpo"], out["plan"]
    own = "" if plan["prompts"] == "synthetic" else "/" + prompts.name(f"files:{plan['prompts']}")
    x = [r["round"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("accuracy", "o-"), ("pass@1", "s--"), (f"pass@{plan['samples']}", "^:")):
        line, = left.plot(x, [100 * r[key + own] for r in rows], style, label="greedy" if key == "accuracy" else key)
        if grpo:
            left.scatter([x[-1]], [100 * grpo[key + own]], marker="*", s=150, color=line.get_color(), zorder=3)
    if grpo:
        left.scatter([], [], marker="*", s=150, color="gray", label=f"GRPO ({grpo['answers']:,} answers)")
    left.set(xlabel="round", ylabel=f"held-out accuracy (%){own.replace('/', ', ')}",
             title="accuracy of each round's policy", xticks=x)
    left.legend()
    right.plot(x[1:], [r["reward/sample"] for r in rows[1:]], "o-", label="one sample")
    right.plot(x[1:], [r["reward/best_of_n"] for r in rows[1:]], "^-", label=f"best of {out['plan']['n']}")
    right.set(xlabel="round", ylabel="mean reward", title="the round's samples (of the previous policy)", xticks=x[1:])
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(root: str, plan: Plan, devices: list | None = None) -> dict:
    """Every round into root/round_r (or finds it done), then the table, plot and results.json; returns what
    results.json holds. Every stage's config and the reward are checked before anything samples or trains."""
    devices = devices or jax.devices()
    if plan.rounds < 1 or plan.n < 2 or plan.num_prompts < 1 or not (plan.sft_steps or plan.dpo_steps):
        raise LlmjaxError(f"rounds={plan.rounds}, n={plan.n}, num_prompts={plan.num_prompts}, sft_steps="
                          f"{plan.sft_steps}, dpo_steps={plan.dpo_steps}: a round needs rounds >= 1, n >= 2, a prompt "
                          "and SFT or DPO steps")
    if plan.prompts != "synthetic" and not os.path.isfile(plan.prompts):
        raise LlmjaxError(f"--prompts={plan.prompts!r} does not exist; pass a .jsonl of {{\"prompt\", ...}} "
                          "records, or --prompts=synthetic")
    start_cfg = rs.policy_config(plan.start)
    plan = dataclasses.replace(plan, tasks=plan.tasks or start_cfg.data.tasks)
    eval_cfg = runs.run_config(plan.start)
    eval_cfg.data.update(source="synthetic" if plan.prompts == "synthetic" else f"files:{plan.prompts}",
                         tasks=plan.tasks, validation=plan.validation, data_dir=os.path.join(root, "tfds"))
    rounds, pool = round_records(plan, eval_cfg)
    tokenizer = get_tokenizer(start_cfg.data.tokenizer)
    longest = max(len(chat.prompt_ids(tokenizer, r["prompt"])) for r in pool)
    width = max(64, 32 * math.ceil((longest + plan.max_new_tokens + 1) / 32))
    planned = stages(plan, root, width, longest)
    for planned_stage in planned:
        registry.validate(planned_stage.cfg, len(devices))
    rs.make_scorer(plan.reward, pool)  # a reward that cannot score these prompts is told now
    mesh = make_mesh(start_cfg.mesh, devices)
    evaluate = make_evaluator(eval_cfg, mesh, make_constrain(mesh, eval_cfg.rules), n=plan.eval_prompts, fmt="chat",
                              samples=plan.samples, temperature=plan.temperature, on_prompts=True)

    def evaluated(policy: str, path: str, t: float, **extra) -> dict:
        if not os.path.exists(path):
            args = dict(workdir=policy, source=eval_cfg.data.source, tasks=plan.tasks, validation=plan.validation,
                        data_dir=eval_cfg.data.data_dir, format="chat", n=plan.eval_prompts, samples=plan.samples,
                        temperature=plan.temperature)
            print("$ python -m llmjax.evaluate " + " ".join(shlex.quote(f"--{k}={v}") for k, v in args.items()),
                  flush=True)
            metrics = evaluate(runs.load_params(policy, mesh))
            write_json(path, metrics | extra | {"minutes": (time.perf_counter() - t) / 60})
        return {"policy": policy} | read_json(path)

    def trained(name: str) -> str:
        found = next(s for s in planned if s.name == name)
        print(f"$ {found.command}", flush=True)
        if complete(found.workdir, found.cfg.steps):
            print(f"# {name} is complete", flush=True)
        else:
            registry.train(found.cfg, found.workdir, make_mesh(found.cfg.mesh, devices))
        return found.workdir

    os.makedirs(os.path.join(root, "round_0"), exist_ok=True)
    results = [{"round": 0} | evaluated(plan.start, os.path.join(root, "round_0", "eval.json"), time.perf_counter())]
    policy = plan.start
    for r, records in enumerate(rounds, 1):
        t, here = time.perf_counter(), os.path.join(root, f"round_{r}")
        os.makedirs(here, exist_ok=True)
        paths = {k: os.path.join(here, f"{k}.jsonl") for k in ("prompts", "samples", "pairs")}
        if not os.path.exists(paths["prompts"]):
            rs.write_jsonl(paths["prompts"], records)
        args = dict(policy=policy, reward=plan.reward, prompts=paths["prompts"], n=plan.n, seed=r,
                    min_score=plan.min_score, max_new_tokens=plan.max_new_tokens, temperature=plan.temperature,
                    out=paths["samples"], pairs_out=paths["pairs"])
        print("$ python -m llmjax.rejection_sample " + " ".join(shlex.quote(f"--{k}={v}") for k, v in args.items()
                                                               if v is not None), flush=True)
        if not os.path.exists(rs.summary_path(paths["samples"])):
            rs.sample_to_files(policy, plan.reward, records, paths["samples"], paths["pairs"], n=plan.n, seed=r,
                               min_score=plan.min_score, max_new_tokens=plan.max_new_tokens,
                               temperature=plan.temperature, mesh=make_mesh(dict(data=1, fsdp=-1, tensor=1), devices))
        summary = read_json(rs.summary_path(paths["samples"]))
        for kind, source in (("sft", "samples"), ("dpo", "pairs")):
            if any(s.name == f"round_{r}/{kind}" for s in planned):
                if os.path.getsize(paths[source]) == 0:
                    raise LlmjaxError(f"round {r} has no {source} to train {kind} on ({summary['kept']} of "
                                      f"{summary['prompts']} prompts kept); raise --n or lower --min_score")
                policy = trained(f"round_{r}/{kind}")
        with open(paths["pairs"]) as f:
            pairs = sum(1 for _ in f)
        results.append({"round": r} | evaluated(policy, os.path.join(here, "eval.json"), t, pairs=pairs, **{
            "reward/sample": summary["score/sample"], "reward/best_of_n": summary["score/best_of_n"],
            "kept": summary["kept"], "prompts": summary["prompts"]}))
    grpo = None
    if plan.grpo:
        t = time.perf_counter()
        grpo_cfg = planned[-1].cfg
        grpo = {"round": "grpo"} | evaluated(trained("grpo"), os.path.join(root, "grpo", "eval.json"), t,
                                             answers=grpo_cfg.steps * grpo_cfg.batch_size)
    out = {"plan": dataclasses.asdict(plan), "rounds": results, "grpo": grpo}
    write_json(os.path.join(root, "results.json"), out)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(table(out))
    plot(out, os.path.join(root, "rounds.png"))
    return out


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    plan = Plan(**{field.name: f[field.name].value for field in dataclasses.fields(Plan)})
    plan = dataclasses.replace(plan, sft_config=tuple(plan.sft_config), dpo_config=tuple(plan.dpo_config))
    print(table(run(f.workdir, plan)))


if __name__ == "__main__":  # flags only for the command line: the tests import run()
    d = Plan("")
    flags.DEFINE_string("workdir", None, "Where every round and the results go.", required=True)
    flags.DEFINE_string("start", None, "Round 0's policy: an SFT run's workdir.", required=True)
    flags.DEFINE_integer("rounds", d.rounds, "Rounds of sample, SFT, DPO, evaluate.")
    flags.DEFINE_integer("n", d.n, "Answers sampled per prompt (best-of-N; GRPO's group).")
    flags.DEFINE_integer("num_prompts", d.num_prompts, "Fresh prompts a round.")
    flags.DEFINE_string("prompts", d.prompts, "'synthetic' (--tasks) or a .jsonl of prompt records; --validation of "
                        "them is held out for evaluation, rounds take fresh slices of the rest.")
    flags.DEFINE_string("tasks", d.tasks, "Synthetic tasks asked and evaluated (default: the start's data.tasks).")
    flags.DEFINE_float("validation", d.validation, "The share of a prompts file held out for evaluation.")
    flags.DEFINE_string("reward", d.reward, "A reward model run, or a llmjax.rewards spec (tasks, math, exact, ...).")
    flags.DEFINE_float("min_score", d.min_score, "Keep a prompt's best only if it scores this (-inf: always).")
    flags.DEFINE_integer("max_new_tokens", d.max_new_tokens, "Tokens per sampled answer at most.")
    flags.DEFINE_float("temperature", d.temperature, "Sampling temperature of the rounds, pass@k and GRPO.")
    flags.DEFINE_integer("sft_steps", d.sft_steps, "SFT steps a round on the kept answers (0: no SFT).")
    flags.DEFINE_integer("dpo_steps", d.dpo_steps, "DPO steps a round on the best/worst pairs (0: no DPO).")
    flags.DEFINE_string("lora", d.lora, "lora.targets of the SFT and DPO stages (e.g. all; '': full fine-tuning).")
    flags.DEFINE_multi_string("sft_config", [], "KEY=VALUE override of every SFT stage's config (e.g. optim.lr=3e-4).")
    flags.DEFINE_multi_string("dpo_config", [], "KEY=VALUE override of every DPO stage's config (e.g. dpo.beta=0.2).")
    flags.DEFINE_integer("eval_prompts", d.eval_prompts, "Held-out prompts per set (each task; the file's held-out).")
    flags.DEFINE_integer("samples", d.samples, "Answers per held-out prompt for pass@k.")
    flags.DEFINE_bool("grpo", d.grpo, "Also GRPO from the start, sampling as many answers as all the rounds.")
    run_main(main)
