"""Pretraining on the built-in synthetic corpus (string reversal, addition, sorting, copying, lookup), tokenized by
the sentencepiece model trained on it (the base config's data.tokenizer="synthetic", llmjax/data/synthetic.model).

Run (about 3 minutes on a 2-core CPU):
  python -m llmjax.main --config=configs/pretrain.py --workdir=runs/demo
Overrides:
  python -m llmjax.main --config=configs/pretrain.py:model=small,steps=200 --config.optim.lr=3e-4 \
      --config.mesh.fsdp=4 --workdir=runs/demo2
"""

from llmjax import config


def get_config(arg: str = ""):
    args = config.parse_arg(arg, model="small", steps=200)
    cfg = config.base(args.model)
    cfg.steps = args.steps
    cfg.optim.warmup_steps = max(1, args.steps // 10)
    return cfg
