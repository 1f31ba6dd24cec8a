"""Reward model: K-ranked lists expand to weighted pairs, sharded equals unsharded, the trunk starts from the SFT
run, it learns to prefer correct answers on held-out pairs, on-policy pairs mix into the synthetic ones, and the
evaluation reports each kind of wrong answer's accuracy."""

import itertools
import json
from functools import partial

import jax
import numpy as np
import pytest
from helpers import metric_rows, one_device, reward_config

from llmjax import runs, sharding
from llmjax.data import preference, tasks
from llmjax.data.tokenizer import ByteTokenizer, get_tokenizer
from llmjax.errors import LlmjaxError
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
    r_BK = np.asarray(heads.scores(params, batch["responses"], cfg.model, sharding.no_constrain)[0])
    valid = np.ones((8, 3))
    valid[2, 2] = 0
    np.testing.assert_allclose(loss, numpy_ranked_loss(r_BK, valid, 0.25), rtol=1e-5)
    one = heads.scores(params, {k: v[:, 1] for k, v in batch["responses"].items()}, cfg.model, sharding.no_constrain)[0]
    np.testing.assert_allclose(r_BK[:, 1], one, rtol=1e-5, atol=1e-6)  # [B, K, T] scores row by row
    np.testing.assert_allclose(aux["reward_mean"], r_BK[valid > 0].mean(), rtol=1e-5)


def rm_loss(params, batch, cfg, constrain):
    return reward.loss_fn(params, batch, cfg, constrain)[0]


def test_sharded_equals_single_device(sft_dir):
    results = []
    for mesh_cfg, devices in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              (dict(data=2, fsdp=2, tensor=2), jax.devices()),
                              (dict(data=1, fsdp=2, context=2, tensor=2), jax.devices())):
        cfg = reward_config(sft_dir)
        cfg.mesh = mesh_cfg
        mesh = sharding.make_mesh(cfg.mesh, devices)
        start = registry.task(cfg, "", mesh).start()
        batch = preference.batches(cfg, sharding.batch_sharding(mesh, cfg.rules), preference.source(cfg),
                                   layout="ranked")(0)
        constrain = sharding.make_constrain(mesh, cfg.rules)
        fn = jax.jit(jax.value_and_grad(partial(rm_loss, cfg=cfg, constrain=constrain)))
        results.append(jax.device_get(fn(start.params, batch)))
    (loss, grads), *sharded = results
    for loss_s, grads_s in sharded:  # the second: ring attention over the sequence split in two
        np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_s, grads)


def test_reward_model_learns_held_out_preferences(rm_dir):
    evals = [row for row in metric_rows(rm_dir) if "eval/accuracy" in row]
    assert evals[-1]["eval/accuracy"] >= 0.68, evals  # chance is 0.5; 128 held-out pairs
    assert evals[-1]["eval/margin"] > 0.2, evals


def test_starts_from_the_sft_trunk_with_a_fresh_head(sft_dir, tmp_path):
    cfg = reward_config(sft_dir)
    mesh = sharding.make_mesh(cfg.mesh)
    sft = runs.load_params(sft_dir, mesh)
    start = registry.task(cfg, str(tmp_path), mesh).start()
    jax.tree.map(np.testing.assert_array_equal, start.params["trunk"], sft)
    assert float(np.abs(start.params["head"]["w"]).sum()) > 0


def onpolicy_config(tmp_path, **overrides):
    """Sort pairs of every kind, with 40 on-policy pairs (the answer over a reversed one) at a quarter of the rows."""
    rng = np.random.default_rng(0)
    examples = [tasks.sample(rng, ["sort"]) for _ in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": ex.prompt, "chosen": ex.answer, "rejected": ex.answer[::-1] + "0"})
                            + "\n" for ex in examples))
    cfg = reward_config(**{"data.data_dir": str(tmp_path / "tfds"), **overrides})
    cfg.reward.update(negatives="corrupt,permute,neighbour", onpolicy=f"files:{path}", onpolicy_fraction=0.25)
    return cfg, {ex.prompt: [ex.answer, ex.answer[::-1] + "0"] for ex in examples}


def test_onpolicy_pairs_replace_about_their_fraction_of_rows(tmp_path):
    """Deterministically, and rendered as the pairs they are: chosen first, through the chat template."""
    cfg, pairs = onpolicy_config(tmp_path)
    ranked = reward.training(cfg, 2)
    rows = [ranked(step, r) for step in range(50) for r in range(cfg.batch_size)]
    assert rows == [ranked(step, r) for step in range(50) for r in range(cfg.batch_size)]
    onpolicy = [(prompt, responses) for prompt, responses in rows if pairs.get(prompt) == responses]
    assert 0.18 < len(onpolicy) / len(rows) < 0.32
    assert len({prompt for prompt, _ in onpolicy}) > 30  # read through the file, not one record again and again
    tok = get_tokenizer(cfg.data.tokenizer)
    step = next(step for step in range(50) if any(r in onpolicy for r in rows[step * 8:(step + 1) * 8]))
    made = preference.make(ranked, step=step, rows=range(8), seq_len=64, tokenizer=tok, layout="ranked")
    for i, (prompt, responses) in enumerate(rows[step * 8:(step + 1) * 8]):
        for j, response in enumerate(responses):
            row = preference.empty((64,))
            preference.fill(row, 0, *preference.render(tok, prompt, response), segment=1)
            for key, value in row.items():
                np.testing.assert_array_equal(made["responses"][key][i, j], value)


def test_evaluation_reports_each_kinds_accuracy_and_their_mixture(tmp_path):
    cfg, _ = onpolicy_config(tmp_path, eval_every=1, eval_prompts=8, **{"data.validation": 0.3})
    task = registry.task(cfg, "", one_device())
    rng = np.random.default_rng(0)  # random parameters without compiling an initialisation
    metrics = task.evaluate(jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype),
                                         task.abstract.params))
    kinds = [f"accuracy/{kind}" for kind in ("corrupt", "permute", "neighbour", "onpolicy")]
    assert set(kinds) <= metrics.keys() and len({metrics[kind] for kind in kinds}) > 1
    assert metrics["accuracy"] == pytest.approx(sum(metrics[kind] for kind in kinds) / 4)  # 3/4 synthetic, 1/4 not
    cfg.reward.update(negatives="corrupt", onpolicy="")  # the kinds not trained on are evaluated, at share 0
    shares = {name: share for name, (_, share, _) in reward.held_out(cfg, 2).items()}
    assert shares == {"corrupt": 1.0, "permute": 0.0, "neighbour": 0.0}


@pytest.mark.parametrize("reward_keys, message", [
    ({"negatives": "corrupt,swap"}, r"^reward.negatives='corrupt,swap' names unknown kinds \['swap'\]; give some of "
                                    r"corrupt,permute,neighbour, comma-separated$"),
    ({"onpolicy_fraction": 1.5}, r"^reward.onpolicy_fraction=1.5 is outside \[0, 1\] \(the share of training rows "
                                 r"drawn from reward.onpolicy\); set --config.reward.onpolicy_fraction within it$"),
    ({"onpolicy": "files:/no/p.jsonl"}, r"^reward.onpolicy='files:/no/p.jsonl' is not files:PATH of an existing file "
                                        r"or folder; write them with `python -m llmjax.rejection_sample --pairs_out"),
    ({"onpolicy": "p.jsonl"}, r"^reward.onpolicy='p.jsonl' is not files:PATH"),
])
def test_bad_pair_settings_are_refused_in_one_line(reward_keys, message):
    cfg = reward_config()
    cfg.reward.update(reward_keys)
    with pytest.raises(LlmjaxError, match=message):
        registry.validate(cfg, 8)


def test_onpolicy_records_of_another_kind_are_refused_naming_the_key(tmp_path):
    (tmp_path / "sft.jsonl").write_text('{"prompt": "sort 21 = ", "response": "12"}\n' * 3)
    cfg = reward_config(**{"data.data_dir": str(tmp_path / "tfds")})
    cfg.reward.update(onpolicy=f"files:{tmp_path / 'sft.jsonl'}", onpolicy_fraction=0.5)
    with pytest.raises(LlmjaxError, match=r"^reward.onpolicy='files:.*sft.jsonl': .*no usable preference records.*"
                                          r'lacks "chosen", "rejected"'):
        registry.task(cfg, "", one_device())
