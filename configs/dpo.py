"""DPO on preference pairs of the synthetic tasks (the correct answer beats a corrupted one), starting from
the SFT run, which is also the frozen reference. `dpo.loss` picks sigmoid (DPO), cdpo, ipo, hinge or simpo;
`dpo.reference=precomputed` computes the reference log-probs once and drops the reference model.

Run after configs/sft.py has written runs/sft:
  python -m llmjax.main --config=configs/dpo.py --workdir=runs/dpo
  python -m llmjax.main --config=configs/dpo.py --config.dpo.loss=ipo --config.dpo.reference=precomputed \\
      --workdir=runs/dpo_ipo
"""

from llmjax import config


def get_config(arg: str = ""):
    args = config.parse_arg(arg, model="small", steps=100)
    cfg = config.base(args.model)
    cfg.trainer = "dpo"
    cfg.steps = args.steps
    cfg.seq_len = 64  # one prompt and answer through the chat template (two for a packed pair: 96 suffices)
    cfg.data.format = "chat"
    cfg.init_from = cfg.init_from or "runs/sft"  # model=hf:DIR or model=RUN names its own start
    cfg.optim.lr = 1e-5  # at 3e-4 the policy drifts far from the reference and task accuracy collapses
    cfg.optim.warmup_steps = max(1, args.steps // 10)
    cfg.dpo = dict(loss="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, nll_weight=0.0, reference="live",
                   packed=False)
    return cfg
