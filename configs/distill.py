"""Knowledge distillation: a student (here the `tiny` preset, fresh) learns the SFT run's next-token distributions
on the synthetic tasks as chat (llmjax.train.distill). `distill.divergence` picks forward_kl, reverse_kl or jsd
(GKD's, with distill.beta); `distill.on_policy=True` distils on the student's own answers to the tasks' prompts.

Run after configs/sft.py has written runs/sft:
  python -m llmjax.main --config=configs/distill.py --workdir=runs/distill
  python -m llmjax.main --config=configs/distill.py --config.distill.on_policy=True \\
      --config.distill.divergence=jsd --config.init_from=runs/distill --workdir=runs/distill_gkd
"""

from llmjax import config


def get_config(arg: str = ""):
    args = config.parse_arg(arg, model="tiny", teacher="runs/sft", steps=300)
    cfg = config.base(args.model)
    cfg.trainer = "distill"
    cfg.steps = args.steps
    cfg.seq_len = 64  # one prompt and answer through the chat template
    cfg.data.format = "chat"
    cfg.optim.lr = 1e-3  # configs/sft.py's: a half-width student of `small` learnt best at it (experiments/distill)
    cfg.optim.warmup_steps = max(1, args.steps // 15)
    cfg.distill = dict(
        teacher=args.teacher,  # a run's workdir or hf:DIR holding a language model of the same tokenizer
        divergence="forward_kl",  # forward_kl | reverse_kl | jsd
        beta=0.5,  # jsd's mixture weight of the teacher
        temperature=1.0,  # both distributions' softmax temperature
        ce_weight=0.0,  # + this times the data's cross-entropy (off-policy only)
        on_policy=False,  # distil on the student's own answers to prompts (GKD) instead of the data
        tasks="",  # on-policy: the synthetic tasks whose prompts are answered ("" = data.tasks)
        max_prompt_len=48, max_new_tokens=16,  # on-policy: prompt width and answer budget in tokens
    )
    return cfg
