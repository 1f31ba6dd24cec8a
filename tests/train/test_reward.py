"""Reward model: K-ranked lists expand to weighted pairs, sharded equals unsharded, the trunk starts from the SFT
run, and it learns to prefer correct answers on held-out pairs."""

import itertools
from functools import partial

import jax
import numpy as np
from helpers import metric_rows, reward_config

from llmjax import checkpoint, sharding
from llmjax.data import preference
from llmjax.data.tokenizer import ByteTokenizer
from llmjax.models import heads
from llmjax.models.transformer import init_tree
from llmjax.train import registry, reward


def numpy_ranked_loss(r_BK, valid_BK, margin):
    total, weights = 0.0, 0.0
    for b in range(r_BK.shape[0]):
        k = int(valid_BK[b].sum())
        for i, j in itertools.combinations(range(k), 2):
            d = np.float64(r_BK[b, i]) - np.float64(r_BK[b, j]) - margin * (j - i)
            total += np.log1p(np.exp(-d)) / (k * (k - 1) / 2)
            weights += 1 / (k * (k - 1) / 2)
    return total / weights


def test_ranked_loss_equals_numpy_pairs():
    """K=3 lists, one row with only two responses: every pair weighs 1/C(k,2) of its prompt."""
    cfg = reward_config(**{"batch_size": 8})
    cfg.reward.responses, cfg.reward.margin = 3, 0.25
    tok = ByteTokenizer()
    batch = preference.make(preference.synthetic(0, ["sort"], 3), step=0, rows=range(8), seq_len=64, tokenizer=tok,
                            layout="ranked", k=3)
    batch["responses"] = {k: v.copy() for k, v in batch["responses"].items()}
    for key in batch["responses"]:
        batch["responses"][key][2, 2] = 0  # row 2 ranks only two responses
    params = init_tree(heads.specs(cfg.model), jax.random.key(1), "float32")
    loss, aux = reward.loss_fn(params, batch, cfg, sharding.no_constrain)
    r_BK = np.asarray(reward.scores(params, batch["responses"], cfg, sharding.no_constrain))
    valid = np.ones((8, 3))
    valid[2, 2] = 0
    np.testing.assert_allclose(loss, numpy_ranked_loss(r_BK, valid, 0.25), rtol=1e-5)
    one = reward.scores(params, {k: v[:, 1] for k, v in batch["responses"].items()}, cfg, sharding.no_constrain)
    np.testing.assert_allclose(r_BK[:, 1], one, rtol=1e-5, atol=1e-6)  # [B, K, T] scores row by row
    np.testing.assert_allclose(aux["reward_mean"], r_BK[valid > 0].mean(), rtol=1e-5)


def rm_loss(params, batch, cfg, constrain):
    return reward.loss_fn(params, batch, cfg, constrain)[0]


def test_sharded_equals_single_device(sft_dir):
    results = []
    for mesh_cfg, devices in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              (dict(data=2, fsdp=2, tensor=2), jax.devices())):
        cfg = reward_config(sft_dir)
        cfg.mesh = mesh_cfg
        mesh = sharding.make_mesh(cfg.mesh, devices)
        start = registry.task(cfg, "", mesh).start()
        batch = preference.batches(cfg, sharding.batch_sharding(mesh, cfg.rules), preference.source(cfg),
                                   layout="ranked")(0)
        constrain = sharding.make_constrain(mesh, cfg.rules)
        fn = jax.jit(jax.value_and_grad(partial(rm_loss, cfg=cfg, constrain=constrain)))
        results.append(jax.device_get(fn(start.params, batch)))
    (loss, grads), (loss_s, grads_s) = results
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_s, grads)


def test_reward_model_learns_held_out_preferences(rm_dir):
    evals = [row for row in metric_rows(rm_dir) if "eval/accuracy" in row]
    assert evals[-1]["eval/accuracy"] >= 0.68, evals  # chance is 0.5; 128 held-out pairs
    assert evals[-1]["eval/margin"] > 0.2, evals


def test_starts_from_the_sft_trunk_with_a_fresh_head(sft_dir, tmp_path):
    cfg = reward_config(sft_dir)
    mesh = sharding.make_mesh(cfg.mesh)
    sft = checkpoint.load_params(sft_dir, mesh)
    start = registry.task(cfg, str(tmp_path), mesh).start()
    jax.tree.map(np.testing.assert_array_equal, start.params["trunk"], sft)
    assert float(np.abs(start.params["head"]["w"]).sum()) > 0
