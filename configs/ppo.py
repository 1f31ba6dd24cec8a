"""RL from the SFT run: PPO (or GRPO) on the synthetic tasks' prompts or your own, rewarded by a reward model
run, the tasks' checkers, built-in verifiers or your own function, with a KL penalty to the frozen SFT reference.

Run after configs/sft.py (runs/sft) and configs/reward.py (runs/rm):
  python -m llmjax.main --config=configs/ppo.py --workdir=runs/ppo                      # reward model runs/rm
  python -m llmjax.main --config=configs/ppo.py:reward=tasks --workdir=runs/ppo_tasks   # the tasks' checkers
  python -m llmjax.main --config=configs/ppo.py:algorithm=grpo,reward=tasks --workdir=runs/grpo
Your prompts ({"prompt", "answer", ...} lines) and rewards (math: the final answer against "answer"):
  python -m llmjax.main --config=configs/ppo.py:algorithm=grpo,reward=math --config.data.source=files:problems.jsonl \
      --config.ppo.tasks= --config.ppo.max_prompt_len=144 --workdir=runs/grpo_math

A reward model is optimised gently (60 iterations at a constant 3e-5: faster, the policy finds what it misjudges);
a verifier (no reward-model run among the terms) cannot be fooled, so the policy is pushed harder: 2e-4 annealed
to 0 (held constant it oscillates) over 700 PPO iterations of 128 answers (the value a head on the policy's trunk)
or 900 GRPO iterations of 32 prompts x 8 answers, tuned on `small` (README, "RL that pays off").
"""

from llmjax import config, rewards


def get_config(arg: str = ""):
    args = config.parse_arg(arg, model="small", steps=0, algorithm="ppo", reward="runs/rm")
    verifier = not any(term.run for term in rewards.parse(args.reward))
    grpo = args.algorithm == "grpo"
    cfg = config.base(args.model)
    cfg.trainer = "ppo"
    # iterations: one rollout of batch_size answers (GRPO: batch_size / group_size prompts), then the update
    cfg.steps = args.steps or ((900 if grpo else 700) if verifier else 60)
    cfg.batch_size = (256 if grpo else 128) if verifier else 64
    cfg.seq_len = 64            # the evaluator's held-out perplexity rows
    cfg.data.format = "chat"
    cfg.init_from = cfg.init_from or "runs/sft"  # model=hf:DIR or model=RUN names its own start
    # against the reward model on `small`, 1e-4 moves far from the reference (KL 6 nats)
    cfg.optim.lr = 2e-4 if verifier else 3e-5
    cfg.optim.schedule = "cosine" if verifier else "constant"
    cfg.optim.warmup_steps = 0
    cfg.eval_every = 250 if verifier else 20
    cfg.eval_prompts = 256 if verifier else cfg.eval_prompts  # 64 leave +/-6 points of noise on a 10-point gain
    cfg.checkpoint.every = 50 if verifier else 20
    cfg.log_every = 1
    cfg.ppo = dict(
        algorithm=args.algorithm,  # ppo | grpo (group-normalised advantages, no value model, KL in the loss)
        # Terms KIND[:ARG][:WEIGHT], comma-separated (or a list): a reward run's workdir | tasks (1 if the task's
        # checker accepts the answer) | math (the final \boxed{} or number against the record's "answer") | exact |
        # format:REGEX | module.path:function (fn(prompts, responses, records) -> a score per response).
        reward=args.reward,
        tasks="sort,lookup",       # synthetic prompts ("": data.tasks): those the reward model judges and the SFT
                                   # model sometimes solves; the evaluation still covers every task in data.tasks
        max_prompt_len=40,         # prompts are left-padded to this many tokens (one shape: the sampler compiles once)
        # separate: a value model initialised from the reward model | shared: a head on the policy's trunk (half the
        # update's compute: 700 iterations fit the 30 CPU-minutes that 450 did)
        value="shared" if verifier else "separate",
        max_new_tokens=12,         # the synthetic tasks' answers take at most 8 tokens and eos; raise it for yours
        temperature=1.0,           # the rollout samples from logits / T; the loss's log-probs, KL and entropy too
        kl_coef=0.05 if verifier or grpo else 0.2,  # PPO: per-token penalty on the reward; GRPO: the KL term's weight
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
    if grpo:
        cfg.ppo.kl_estimator = "k3"
    return cfg
