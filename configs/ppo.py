"""RL from the SFT run: PPO (or GRPO) on the synthetic tasks' prompts or your own, rewarded by a reward model
run, the tasks' checkers, built-in verifiers or your own function, with a KL penalty to the frozen SFT reference.

Run after configs/sft.py (runs/sft) and configs/reward.py (runs/rm):
  python -m llmjax.main --config=configs/ppo.py --workdir=runs/ppo                      # reward model runs/rm
  python -m llmjax.main --config=configs/ppo.py --config.ppo.reward=tasks --workdir=runs/ppo_tasks
  python -m llmjax.main --config=configs/ppo.py:algorithm=grpo --config.ppo.reward=tasks --workdir=runs/grpo
Your prompts ({"prompt", "answer", ...} lines) and rewards (math: the final answer against "answer"):
  python -m llmjax.main --config=configs/ppo.py:algorithm=grpo --config.data.source=files:problems.jsonl \
      --config.ppo.tasks= --config.ppo.reward='math:1.0,format:\\d+$:0.1' --config.ppo.max_prompt_len=96 \
      --workdir=runs/grpo_math
"""

from llmjax import config


def get_config(arg: str = ""):
    args = config.parse_arg(arg, model="small", steps=60, algorithm="ppo")
    cfg = config.base(args.model)
    cfg.trainer = "ppo"
    cfg.steps = args.steps      # iterations: one rollout of batch_size prompts, then the update
    cfg.batch_size = 64
    cfg.seq_len = 64            # the evaluator's held-out perplexity rows
    cfg.data.format = "chat"
    cfg.init_from = cfg.init_from or "runs/sft"  # model=hf:DIR or model=RUN names its own start
    cfg.optim.lr = 3e-5  # `small`: 1e-4 moves far from the reference (KL 6 nats against the reward model)
    cfg.optim.schedule = "constant"
    cfg.optim.warmup_steps = 0
    cfg.eval_every = 20
    cfg.checkpoint.every = 20
    cfg.log_every = 1
    cfg.ppo = dict(
        algorithm=args.algorithm,  # ppo | grpo (group-normalised advantages, no value model, KL in the loss)
        # Terms KIND[:ARG][:WEIGHT], comma-separated (or a list): a reward run's workdir | tasks (1 if the task's
        # checker accepts the answer) | math (the final \boxed{} or number against the record's "answer") | exact |
        # format:REGEX | module.path:function (fn(prompts, responses, records) -> a score per response).
        reward="runs/rm",
        tasks="sort,lookup",       # synthetic prompts ("": data.tasks): those the reward model judges and the SFT
                                   # model sometimes solves; the evaluation still covers every task in data.tasks
        max_prompt_len=40,         # prompts are left-padded to this many tokens (one shape: the sampler compiles once)
        value="separate",          # separate: a value model initialised from the reward model | shared: a head
        max_new_tokens=24, temperature=1.0,
        kl_coef=0.2,               # PPO: per-token penalty on the reward; GRPO: weight of the KL term in the loss
        kl_estimator="k1",         # k1 | k2 | k3: the per-token KL (PPO: in the reward penalty; GRPO: the loss term)
        target_kl=0.0,             # > 0: adapt kl_coef toward this KL per sequence (Ziegler et al. 2019)
        kl_horizon=10_000,
        gamma=1.0, lam=0.95,       # GAE
        clip_low=0.2, clip_high=0.2,  # the ratio is clipped to [1 - low, 1 + high]; DAPO's clip-higher: high=0.28
        value_clip_eps=0.2, vf_coef=0.1, entropy_coef=0.0,
        loss_agg="token_mean",     # token_mean (DAPO) | seq_mean_token_mean (GRPO) | seq_mean_token_sum_norm (Dr. GRPO)
        overlong_buffer=0,         # > 0: DAPO's length penalty, 0 -> -1 over the last this many of max_new_tokens
        whiten=True,               # normalise advantages over the rollout
        epochs=1, minibatches=1,   # passes over the rollout, and minibatches per pass
        group_size=8,              # GRPO: samples per prompt
        baseline="mean",           # GRPO: the group's mean | leave_one_out (RLOO: the mean of the other samples)
        scale_rewards=True,        # GRPO: divide by the group's std (False: Dr. GRPO)
        dynamic_sampling=False,    # GRPO: groups whose answers all score alike leave the loss (DAPO)
    )
    if args.algorithm == "grpo":
        cfg.ppo.update(kl_estimator="k3", kl_coef=0.05)
    return cfg
