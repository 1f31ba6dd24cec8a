"""Pretraining on a mixture of two sources, in bytes: the synthetic tasks, and the Python standard library's
source (configs/stdlib.py's corpus). The learning rate is warmup-stable-decay, decaying to 0 over the last
`anneal` share of the run; with `anneal_tasks` > 0, that last share reads the tasks at that share (1: alone),
as Llama 3 anneals on its high-quality data at the end. Each source's held-out perplexity (per byte) and the
tasks' accuracy are evaluated every eval_every steps; tokens and epochs read from each source are logged every
step (llmjax.data.mixture).

Run:
  python -m llmjax.main --config=configs/mixture.py --workdir=runs/mixture
  python -m llmjax.main --config=configs/mixture.py:anneal_tasks=0.95 --workdir=runs/mixture_annealed
  python -m llmjax.main --config=configs/mixture.py:subdir=email,validation=0.2,model=tiny,steps=50 \\
      --config.data.weights="tasks=0.5, stdlib=0.5" --workdir=runs/mixture_quick
"""

import os

import ml_collections

from llmjax import config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = config.parse_arg(arg, model="small", steps=600, tasks=0.8, anneal=0.2, anneal_tasks=0.0, subdir="",
                            validation=0.02)
    files = config.load(f"{os.path.dirname(__file__)}/stdlib.py:subdir={args.subdir},validation={args.validation}")
    cfg = config.base(args.model)
    cfg.steps = args.steps
    cfg.optim.warmup_steps = max(1, args.steps // 10)
    cfg.optim.schedule, cfg.optim.decay_fraction, cfg.optim.min_lr_ratio = "wsd", args.anneal, 0.0
    cfg.data.tokenizer = "byte"  # one tokenizer reads both: the tasks' own was trained on the tasks alone
    cfg.data.validation = files.data.validation
    cfg.data.source = "mixture"
    cfg.data.mixture = dict(tasks=dict(source="synthetic", format="text", epochs=0),
                            stdlib=dict(source=files.data.source, format="text", epochs=0))
    weights = f"tasks={args.tasks:g}, stdlib={1 - args.tasks:g}"
    annealed = f"tasks={args.anneal_tasks:g}" + (f", stdlib={1 - args.anneal_tasks:g}" if args.anneal_tasks < 1 else "")
    decay = round(args.steps * (1 - args.anneal))
    cfg.data.weights = f"0: {weights}; {decay}: {annealed}" if args.anneal_tasks else weights
    cfg.eval_every = 100
    return cfg
