"""Supervised fine-tuning: the synthetic tasks as chat, (prompt, answer) through llmjax.data.chat, starting
from a pretrained checkpoint. It is the pretraining step; only the loss mask differs (answers and eos alone).

Run after configs/pretrain.py has written runs/demo:
  python -m llmjax.main --config=configs/sft.py --config.init_from=runs/demo --workdir=runs/sft
"""

from llmjax import config


def get_config(arg: str = ""):
    args = config.parse_arg(arg, model="small", steps=150)
    cfg = config.base(args.model)
    cfg.steps = args.steps
    cfg.data.format = "chat"
    cfg.init_from = "runs/demo"
    cfg.optim.lr = 1e-3  # gentler than pretraining, so fine-tuning keeps what was learnt
    cfg.optim.warmup_steps = max(1, args.steps // 15)
    return cfg
