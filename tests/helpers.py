"""Small configs and runners shared by the tests."""

import json
import os

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
        config.override(cfg, key, value)
    return cfg


def one_device():
    """A mesh of one fake device, for runs that train: tiny models train about 1.5x faster on one than on eight
    that share two cores (the sharded paths have tests of their own)."""
    import jax

    from llmjax.sharding import make_mesh

    return make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def reward_config(init_from="", **overrides) -> ml_collections.ConfigDict:
    """A tiny reward model on `sort` preference pairs (the correct answer over a corrupted one)."""
    cfg = tiny_config(**{"data.format": "chat", "data.tasks": "sort", "init_from": init_from, "trainer": "reward",
                         "optim.lr": 1e-3, **overrides})
    cfg.reward = dict(responses=2, margin=0.0, read="last", negatives="corrupt", onpolicy="", onpolicy_fraction=0.25)
    return cfg


def dpo_config(init_from, **overrides) -> ml_collections.ConfigDict:
    """Tiny DPO on `sort` pairs, its reference live."""
    cfg = tiny_config(**{"data.format": "chat", "data.tasks": "sort", "seq_len": 96, "init_from": init_from,
                         "trainer": "dpo", **overrides})
    cfg.dpo = dict(loss="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, nll_weight=0.0, reference="live",
                   packed=False)
    return cfg


def ppo_config(init_from, algorithm="ppo", **overrides) -> ml_collections.ConfigDict:
    """Tiny PPO (or GRPO) on `sort`, rewarded by the checker."""
    cfg = tiny_config(**{"trainer": "ppo", "init_from": init_from, "data.format": "chat", "data.tasks": "sort",
                         "batch_size": 16, "optim.schedule": "constant", "optim.warmup_steps": 0, "optim.lr": 3e-4,
                         "log_every": 1, **overrides})
    cfg.ppo = config.load(f"configs/ppo.py:model=tiny,algorithm={algorithm}").ppo
    cfg.ppo.update(reward="tasks", tasks="", max_new_tokens=12, kl_coef=0.05, epochs=2, minibatches=2, group_size=4)
    return cfg


def prompts_file(path, n: int = 64, seed: int = 0) -> str:
    """A files: source of n `sort` prompt records with their answers and extra fields (an id, a weight)."""
    import numpy as np

    from llmjax.data import tasks

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            ex = tasks.sample(rng, ["sort"])
            f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer, "id": i, "weight": 1 + i % 3}) + "\n")
    return f"files:{path}"


def weighted_length(prompts, responses, records) -> list[float]:
    """A user's reward function (ppo.reward="helpers:weighted_length"): reads the records' extra field."""
    return [r["weight"] * len(response) for r, response in zip(records, responses, strict=True)]


def raising(prompts, responses, records) -> list[float]:
    if any(len(r) > 2 for r in responses):
        raise ValueError("too long")
    return [0.0] * len(responses)


def nan_for_long(prompts, responses, records) -> list[float]:
    return [float("nan") if len(r) > 3 else 1.0 for r in responses]


def metric_rows(workdir) -> list[dict]:
    """The rows a run wrote to metrics.jsonl (training rows carry "loss", evaluation rows "eval/...")."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in metric_rows(workdir) if "loss" in row}


def saved_run(cfg, workdir: str, scale: float = 1.0, state=None):
    """A run of cfg's objective saved at step 1 without training (cheap stand-in for a trained one): `state`, by
    default its start state with the parameters scaled by `scale`, so that they differ from what they started
    from."""
    import jax

    from llmjax import checkpoint, runs
    from llmjax.train import registry

    task = registry.task(cfg, workdir)
    if state is None:
        state = task.start()
        state = state.replace(params=jax.tree.map(lambda x: x * scale, state.params))
    runs.claim_workdir(workdir, cfg, task.parts, task.made, task.meaning)
    mngr = checkpoint.manager(workdir, cfg)
    checkpoint.save(mngr, 1, state)
    mngr.wait_until_finished()
    mngr.close()
    return state


def file_bytes(root) -> dict[str, bytes]:
    """Every file under root, by relative path: what a refused run must leave as it was."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def assert_same_values(a, b):
    import jax
    import numpy as np

    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
