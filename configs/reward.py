"""Reward model on preference pairs of the synthetic tasks (the correct answer beats a corrupted one), a
scalar head on the SFT run's trunk. `reward.responses=K` ranks K answers per prompt (each further corruption
worse), trained on all C(K,2) pairs; `reward.read=eos` reads the score at the response's eos.

Run after configs/sft.py has written runs/sft:
  python -m llmjax.main --config=configs/reward.py --workdir=runs/rm
  python -m llmjax.main --config=configs/reward.py --config.reward.responses=4 --config.seq_len=128 \\
      --workdir=runs/rm4
Score text with it:  python -m llmjax.score --workdir=runs/rm --prompt="sort: dbca" --response=abcd
"""

from llmjax import config


def get_config(arg: str = ""):
    args = config.parse_arg(arg, model="small", steps=200)
    cfg = config.base(args.model)
    cfg.trainer = "reward"
    cfg.steps = args.steps
    cfg.seq_len = 64  # one prompt and answer through the chat template
    cfg.data.format = "chat"
    # Judge the tasks the SFT model can do. A reward model cannot judge what its trunk cannot compute: `small`,
    # 200 steps, held-out pair accuracy on sort,lookup 81%, on all five tasks 58% (also with 4x the batch).
    cfg.data.tasks = "sort,lookup"
    cfg.init_from = cfg.init_from or "runs/sft"  # model=hf:DIR or model=RUN names its own start
    cfg.optim.lr = 1e-3
    cfg.optim.warmup_steps = max(1, args.steps // 10)
    cfg.eval_every = 100  # held-out pairwise accuracy on eval_prompts pairs
    cfg.eval_prompts = 256
    cfg.reward = dict(
        responses=2,   # K responses ranked per prompt
        margin=0.0,    # Bradley-Terry margin per rank apart: -log sigmoid(r_i - r_j - margin (j - i))
        read="last",   # last: the score at the response's last token | eos: at its eos, fed as an input
    )
    return cfg
