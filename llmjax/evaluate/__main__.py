"""python -m llmjax.evaluate --workdir=RUN: the evaluation library (llmjax.evaluate) on a run's latest checkpoint,
written to RUN/eval_<format>[_pass<samples>].json. By default it reads the run's own data; --source (with --tasks,
--validation, --data_dir) asks another source's held-out prompts instead, e.g. an SFT run trained on its own best
answers, on the prompts they came from:

  python -m llmjax.evaluate --workdir=runs/round_1/sft --source=files:problems.jsonl --format=chat --samples=8
"""

import json
import os

from absl import flags

from llmjax import runs
from llmjax.cli import run_main
from llmjax.evaluate import make_evaluator
from llmjax.sharding import make_constrain, make_mesh
from llmjax.train import registry


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    cfg = runs.run_config(f.workdir)
    on_prompts = registry.get(cfg).prompts
    if f.source:
        given = {k: f[k].value for k in ("tasks", "validation", "data_dir") if f[k].present}
        cfg.data.update(source=f.source, mixture={}, weights="", **given)
        on_prompts = True
    mesh = make_mesh(cfg.mesh)
    params = runs.load_params(f.workdir, mesh, reader="evaluate")
    result = make_evaluator(cfg, mesh, make_constrain(mesh, cfg.rules), n=f.n, fmt=f.format, samples=f.samples,
                            temperature=f.temperature, on_prompts=on_prompts)(params)
    suffix = f"_pass{f.samples}" if f.samples > 1 else ""
    with open(os.path.join(f.workdir, f"eval_{f.format or cfg.data.format}{suffix}.json"), "w") as file:
        json.dump(result, file, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A run's workdir; its latest checkpoint is evaluated.", required=True)
    flags.DEFINE_enum("format", None, ["text", "chat"], "Prompt format (default: the run's data.format).")
    flags.DEFINE_integer("n", 100, "Prompts per task (and of an RL run's own held-out prompts).")
    flags.DEFINE_integer("samples", 1, "Answers sampled per prompt for pass@k (1: greedy accuracy only).")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature of the pass@k answers.")
    flags.DEFINE_string("source", "", "Evaluate on these prompts instead of the run's data: synthetic, files:PATH "
                        "(prompt records; its --validation share held out) or tfds:NAME.")
    flags.DEFINE_string("tasks", "", "With --source: the synthetic tasks asked (default: the run's data.tasks).")
    flags.DEFINE_float("validation", 0.01, "With --source=files:PATH: the share held out and evaluated.")
    flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "With --source: where its prepared copy is cached.")
    run_main(main)
