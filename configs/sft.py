"""Supervised fine-tuning: the synthetic tasks as chat, (prompt, answer) through llmjax.data.chat, starting
from a pretrained checkpoint. It is the pretraining step; only the loss mask differs (answers and eos alone).

Run after configs/pretrain.py has written runs/demo:
  python -m llmjax.main --config=configs/sft.py --config.init_from=runs/demo --workdir=runs/sft

From a Hugging Face model (its architecture, weights, tokenizer and chat template; see llmjax/hf):
  python -m llmjax.main --config=configs/sft.py:model=hf:~/hf/Qwen2.5-0.5B-Instruct --workdir=runs/sft-qwen
"""

from llmjax import config


def get_config(arg: str = ""):
    args = config.parse_arg(arg, model="small", steps=150)
    cfg = config.base(args.model)
    cfg.steps = args.steps
    cfg.data.format = "chat"
    cfg.init_from = cfg.init_from or "runs/demo"  # model=hf:DIR or model=RUN names its own start
    cfg.optim.lr = 1e-3  # gentler than pretraining, so fine-tuning keeps what was learnt
    cfg.optim.warmup_steps = max(1, args.steps // 15)
    return cfg
