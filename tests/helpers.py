"""Small configs and runners shared by the tests."""

import ml_collections

from llmjax import config


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The pretraining config on the tiny model: 8 rows of 64 tokens, checkpoints every 5 steps."""
    cfg = config.base("tiny")
    cfg.batch_size, cfg.seq_len, cfg.steps = 8, 64, 20
    cfg.optim.warmup_steps = 2
    cfg.checkpoint.every, cfg.log_every = 5, 5
    cfg.peak_flops = 1e12  # skip measuring the matmul rate
    cfg.eval_every = 0     # evaluation compiles a sampler; the tests that want it turn it on
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg
