"""The way into training: every objective validates, and init_from reads the part of another run it needs (a
language model, a reward model) wherever that run keeps it, or refuses in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import reward_config, saved_run, tiny_config

from llmjax import config, sharding
from llmjax import runs as run_lib
from llmjax.models import transformer
from llmjax.train import registry

CHAT = {"data.format": "chat", "data.tasks": "sort"}


def ppo_config(init_from: str):
    cfg = tiny_config(**CHAT, trainer="ppo", init_from=init_from, batch_size=16)
    cfg.ppo = config.load("configs/ppo.py:model=tiny").ppo
    cfg.ppo.update(reward="tasks", max_new_tokens=6)
    return cfg


def dpo_config(init_from: str):
    cfg = tiny_config(**CHAT, trainer="dpo", init_from=init_from, seq_len=96)
    cfg.dpo = config.load("configs/dpo.py:model=tiny").dpo
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """A language model run, a PPO run from it (its policy moved off the start) and a reward run."""
    root = tmp_path_factory.mktemp("runs")
    paths = {name: str(root / name) for name in ("lm", "ppo", "reward")}
    saved_run(tiny_config(**CHAT), paths["lm"])
    saved_run(ppo_config(paths["lm"]), paths["ppo"], scale=1.1)
    saved_run(reward_config(paths["lm"]), paths["reward"], scale=0.9)
    return paths


def logits(params, cfg):
    tokens = jnp.arange(24).reshape(2, 12) % cfg.model.vocab_size
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    return jax.device_get(transformer.forward(params, tokens, positions, jnp.ones_like(tokens), cfg.model)[0])


def test_sft_and_dpo_from_a_ppo_run_take_its_policy(runs):
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    policy = jax.device_get(run_lib.load_params(runs["ppo"], mesh))
    lm = jax.device_get(run_lib.load_params(runs["lm"], mesh))
    assert not np.allclose(policy["embed"], lm["embed"])  # the PPO run moved off its start
    sft = tiny_config(**CHAT, init_from=runs["ppo"])
    start = jax.device_get(registry.task(sft, "").start().params)
    jax.tree.map(np.testing.assert_array_equal, start, policy)
    np.testing.assert_array_equal(logits(start, sft), logits(policy, sft))
    task = registry.task(dpo_config(runs["ppo"]), "")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(task.start().params), policy)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(task.frozen[0]), policy)


def test_reward_model_from_a_ppo_run_takes_its_policy_as_trunk(runs):
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    start = registry.task(reward_config(runs["ppo"]), "").start()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(start.params["trunk"]),
                 jax.device_get(run_lib.load_params(runs["ppo"], mesh)))


def test_ppo_value_model_reads_the_reward_run(runs):
    cfg = ppo_config(runs["lm"])
    cfg.ppo.reward = runs["reward"]
    start = registry.task(cfg, "").start()
    saved = run_lib.load_params(runs["reward"], sharding.make_mesh(cfg.mesh), "scorer")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(start.params["value"]), jax.device_get(saved))


@pytest.mark.parametrize("make", [lambda r: tiny_config(**CHAT, init_from=r), dpo_config, ppo_config])
def test_a_reward_run_is_no_language_model(runs, make):
    with pytest.raises(config.LlmjaxError) as e:
        registry.task(make(runs["reward"]), "")
    message = str(e.value)
    assert "is a reward run holding a trunk with a scalar head (a reward model) (scorer)" in message, message
    assert "needs a language model (lm)" in message and "\n" not in message


def test_ppo_reward_must_be_a_reward_run(runs):
    cfg = ppo_config(runs["lm"])
    cfg.ppo.reward = runs["ppo"]
    with pytest.raises(config.LlmjaxError, match=r"is a ppo run holding a language model \(lm\); ppo.reward needs"):
        registry.task(cfg, "")


def test_unknown_trainer_is_refused():
    with pytest.raises(config.LlmjaxError, match="trainer='sft' is unknown; choose one of pretrain, reward, dpo, ppo"):
        registry.validate(tiny_config(trainer="sft"), 8)


def test_label_smoothing_only_with_sigmoid(runs):
    cfg = dpo_config(runs["lm"])
    cfg.dpo.update(loss="ipo", label_smoothing=0.1)
    with pytest.raises(config.LlmjaxError, match="applies to dpo.loss=sigmoid only"):
        registry.validate(cfg, 8)
