"""Distillation against fine-tuning alone: a student of half the teacher's width learns the synthetic tasks (as chat)
from the SFT run's distributions (configs/distill.py: forward KL, with or without the data's cross-entropy), against
the same student fine-tuned on the same data for the same steps at the same learning rate; then 100 steps more of
each, the distilled student either off-policy or on-policy (GKD's JSD on its own answers, at a lower learning rate).
Every student starts fresh and sees the same batches; each is evaluated alike: greedy accuracy on 128 held-out
prompts of every task, held-out perplexity, and the divergence from the teacher on held-out rows. Writes results.md
and results.json into --workdir.

  python -m experiments.distill.run --workdir=runs/distill_exp                 # small teacher, CPU
  python -m experiments.distill.run --workdir=/tmp/d --model=tiny --scale=0.2   # a quick look

The teacher is the pretrain -> SFT pair of configs/pretrain.py and configs/sft.py; a stage whose workdir holds a
finished run is not trained again, so a killed experiment resumes where it stopped.
"""

import json
import os
import time

from absl import flags, logging

from llmjax.cli import run_main
from llmjax.config import load
from llmjax.models import transformer
from llmjax.sharding import make_mesh
from llmjax.train import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def half_width(model) -> dict:
    """The student: the teacher's depth and head width, half its heads and MLP (so about a quarter of its
    parameters in the layers)."""
    return {"model.d_model": model.d_model // 2, "model.d_ff": model.d_ff // 2,
            "model.n_heads": max(1, model.n_heads // 2), "model.n_kv_heads": max(1, model.n_kv_heads // 2)}


def stages(root: str, model: str, scale: float) -> list[tuple[str, object]]:
    def path(name: str) -> str:
        return os.path.join(root, name)

    def cfg(spec: str, steps: int, **overrides):
        return load(f"{ROOT}/{spec}:model={model},steps={max(2, round(steps * scale))}", **overrides)

    pretrain = cfg("configs/pretrain.py", 200)
    sft = cfg("configs/sft.py", 150, init_from=path("pretrain"))
    student = half_width(sft.model)
    same = {"seq_len": 64, "eval_every": 0, **student}  # the batches configs/distill.py reads
    alone = cfg("configs/sft.py", 300, init_from="", **same)
    kd = cfg("configs/distill.py", 300, **same)
    kd_ce = cfg("configs/distill.py", 300, **same, **{"distill.ce_weight": 1.0})
    alone_more = cfg("configs/sft.py", 100, init_from=path("sft_alone"), **same)
    kd_more = cfg("configs/distill.py", 100, init_from=path("distill"), **same)
    gkd = cfg("configs/distill.py", 100, init_from=path("distill"), **same, **{"optim.lr": 3e-4})
    gkd.distill.update(on_policy=True, divergence="jsd")
    for student in (kd, kd_ce, kd_more, gkd):
        student.distill.teacher = path("sft")
    return [("pretrain", pretrain), ("sft", sft), ("sft_alone", alone), ("distill", kd), ("distill_ce", kd_ce),
            ("sft_alone_more", alone_more), ("distill_more", kd_more), ("distill_gkd", gkd)]


def evaluate(stage_cfg, workdir: str, teacher: str, mesh) -> dict:
    """One evaluator for every model: the distillation task's (accuracy, perplexity, divergence from the
    teacher), on the parameters the run holds."""
    cfg = load(f"{ROOT}/configs/distill.py:model={stage_cfg.model.name}", **{
        "seq_len": 64, "eval_every": 1, "eval_prompts": 128, "init_from": workdir})
    cfg.model = stage_cfg.model
    cfg.distill.teacher = teacher
    task = registry.task(cfg, "", mesh)
    return task.evaluate(task.start().params)


def run(root: str, model: str, scale: float) -> list[dict]:
    mesh, results = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}), []
    for name, cfg in stages(root, model, scale):
        workdir = os.path.join(root, name)
        start = time.time()
        if not os.path.exists(os.path.join(workdir, "done")):
            registry.train(cfg, workdir, mesh)
            open(os.path.join(workdir, "done"), "w").close()
        minutes = (time.time() - start) / 60
        if name == "pretrain":
            continue
        metrics = evaluate(cfg, workdir, os.path.join(root, "sft"), mesh)
        results.append({"stage": name, "steps": cfg.steps, "minutes": minutes,
                        "params": transformer.param_count(cfg.model), **metrics})
        print(json.dumps(results[-1]), flush=True)
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    tasks = sorted(k.split("/")[1] for k in results[0] if k.startswith("accuracy/"))
    lines = ["| model | params | steps | accuracy | " + " | ".join(tasks) + " | perplexity | divergence to teacher |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['params']:,} | {r['steps']} | {r['accuracy']:.1%} | "
                     + " | ".join(f"{r[f'accuracy/{t}']:.1%}" for t in tasks)
                     + f" | {r['perplexity']:.3f} | {r['divergence_to_teacher']:.4f} |")
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    logging.set_verbosity(logging.ERROR)  # not orbax's notes on opening each checkpoint read-only
    os.makedirs(f.workdir, exist_ok=True)
    run(f.workdir, f.model, f.scale)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Where every stage's run and the results go.", required=True)
    flags.DEFINE_string("model", "small", "The teacher's preset; the student is half its width.")
    flags.DEFINE_float("scale", 1.0, "Multiplies every stage's steps (a quick look: 0.1).")
    run_main(main)
