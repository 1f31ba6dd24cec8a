"""LoRA: step 0 is the base model, only the adapters (and heads) train and carry optimizer state, checkpoints hold
only them, a LoRA run reads back as its merged model, and its reference is the base with the adapters off."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import dpo_config, losses, metric_rows, one_device, ppo_config, reward_config, saved_run, tiny_config

from llmjax import generate, runs
from llmjax.errors import LlmjaxError
from llmjax.models import lora, transformer
from llmjax.sharding import make_mesh
from llmjax.train import dpo, registry, state

# A constant learning rate from the first step: the same rates whatever `steps` says, so the runs of one objective
# on one device compile one step, and every later run loads it from the compilation cache.
LORA = {"lora.targets": "all", "lora.rank": 4, "optim.lr": 1e-2, "optim.schedule": "constant",
        "optim.warmup_steps": 0}


# The users of base_dir (and lora_run) run in one worker (pytest-xdist --dist loadgroup): the fixtures are made
# once, and the runs share their compiled steps through the worker's compilation cache.
ON_BASE = pytest.mark.xdist_group("lora_base")
OBJECTIVE_STEP = pytest.mark.slow  # compiles an objective's train step: out of the inner loop


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """An untrained tiny model saved as a run (weights scaled so that they are not the fresh init)."""
    workdir = str(tmp_path_factory.mktemp("base"))
    saved_run(tiny_config(), workdir, scale=3.0)
    return workdir


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory):
    """A LoRA run of 8 steps on the base, and its final state."""
    workdir = str(tmp_path_factory.mktemp("lora"))
    return workdir, registry.train(lora_config(base_dir, steps=8), workdir, one_device())


def lora_config(base_dir, **overrides):
    return tiny_config(**{"init_from": base_dir, **LORA, **overrides})


def forward(params, cfg, tokens_BT):
    B, T = tokens_BT.shape
    return transformer.forward(params, tokens_BT, jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.ones((B, T), jnp.int32),
                               cfg.model)[0]


TOKENS = np.random.default_rng(0).integers(7, 300, (2, 16))


@ON_BASE
def test_step_0_is_the_base_model_and_only_adapters_train(base_dir, lora_run):
    cfg = lora_config(base_dir, steps=8)
    base = runs.load_params(base_dir, one_device())
    start = registry.task(cfg, "", one_device()).start()
    np.testing.assert_array_equal(forward(start.params, cfg, TOKENS), forward(base, cfg, TOKENS))
    jax.tree.map(np.testing.assert_array_equal, lora.strip(start.params), base)
    adapters = sum(x.size for k, x in jax.tree_util.tree_leaves_with_path(start.params)
                   if "lora_a" in str(k) or "lora_b" in str(k))
    moments = sum(x.size for x in jax.tree.leaves(start.opt_state) if x.ndim)
    assert moments == 2 * adapters  # Adam's mu and nu, over the adapters alone
    assert adapters < transformer.param_count(cfg.model) / 10

    run, trained = lora_run
    jax.tree.map(np.testing.assert_array_equal, lora.strip(trained.params), base)  # the base never moves
    steps = losses(run)
    assert steps[8] < steps[1]
    b = [x for k, x in jax.tree_util.tree_leaves_with_path(trained.params) if "lora_b" in str(k)]
    assert all(np.abs(np.asarray(x)).max() > 0 for x in b)


@ON_BASE
def test_merged_equals_unmerged_and_a_lora_run_reads_back_merged(base_dir, lora_run):
    cfg = lora_config(base_dir)
    run, trained = lora_run
    merged = lora.merge(trained.params)
    np.testing.assert_allclose(forward(merged, cfg, TOKENS), forward(trained.params, cfg, TOKENS), atol=1e-4, rtol=0)
    read = runs.load_params(run, make_mesh(cfg.mesh))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), read, merged)
    # The checkpoint holds the adapters only: the base is read from init_from.
    saved = ocp.PyTreeCheckpointer().metadata(os.path.join(run, "checkpoints", "8", "state"))
    names = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(saved.item_metadata.tree)}
    assert not [n for n in names if "params" in n and "lora_" not in n], names
    assert generate.complete(run, ["sort 321 = "], max_new_tokens=4)


@ON_BASE
def test_resume_restores_the_adapters_onto_the_base(base_dir, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    flat = {"log_every": 1}  # LORA's constant schedule: the same learning rates, whatever `steps` says
    registry.train(lora_config(base_dir, steps=10, **flat), straight, one_device())
    registry.train(lora_config(base_dir, steps=5, **flat), split, one_device())
    resumed = registry.train(lora_config(base_dir, steps=10, **flat), split, one_device())
    np.testing.assert_allclose(list(losses(split).values()), list(losses(straight).values()), rtol=1e-6)
    assert sorted(losses(split)) == list(range(1, 11))
    mesh = make_mesh(lora_config(base_dir).mesh)
    jax.tree.map(np.testing.assert_array_equal, lora.strip(resumed.params), runs.load_params(base_dir, mesh))


@ON_BASE
def test_sharded_equals_single_device(base_dir, tmp_path):
    out = {}
    for name, mesh, devices in (("single", dict(data=1, fsdp=1, tensor=1), 1), ("sharded", dict(data=1, fsdp=4,
                                                                                               tensor=2), 8)):
        # the schedule its tolerance was set for: 2 warmup steps (the first update's rate is 0), not LORA's
        cfg = lora_config(base_dir, steps=2, **{"optim.schedule": "cosine", "optim.warmup_steps": 2},
                          **{f"mesh.{k}": v for k, v in mesh.items()})
        task = registry.task(cfg, str(tmp_path / name), make_mesh(cfg.mesh, jax.devices()[:devices]))
        s = task.start()
        step = task.jit_step(jax.tree.map(lambda x: x.sharding, s))
        for i in range(2):
            s, m = step(s, task.source(s, i)[0], *task.frozen)
        out[name] = (float(m["loss"]), jax.device_get(s.params))
    np.testing.assert_allclose(out["sharded"][0], out["single"][0], rtol=1e-5)
    # Adam divides by each gradient's own size, so summation-order noise in small gradients shows at 1e-5.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-5), out["sharded"][1],
                 out["single"][1])


@ON_BASE
@OBJECTIVE_STEP
def test_dpo_reference_is_the_base_with_adapters_off(base_dir, tmp_path):
    """The LoRA DPO step (reference: its own base, adapters off) equals the step given an explicit frozen copy
    of the base as the reference, at step 0 and after a few steps."""
    cfg, mesh = dpo_config(base_dir, **LORA), one_device()
    task = registry.task(cfg, str(tmp_path / "dpo"), mesh)
    assert task.frozen == ()  # no second copy of the model
    copy = jax.tree.map(jnp.copy, runs.load_params(base_dir, mesh))
    explicit = jax.jit(state_step(cfg, mesh, copy))
    ours = task.jit_step(jax.tree.map(lambda x: x.sharding, task.start()))
    a, b = task.start(), task.start()
    for i in range(3):
        batch = task.source(a, i)[0]
        a, ma = ours(a, batch)
        b, mb = explicit(b, batch)
        assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
        if i == 0:
            assert float(ma["loss"]) == pytest.approx(np.log(2), rel=1e-6)  # policy == reference at step 0


def state_step(cfg, mesh, reference):
    from llmjax import optim
    from llmjax.sharding import make_constrain
    from llmjax.train.step import make_step

    specs = lora.apply(transformer.specs(cfg.model), cfg)
    constrain = make_constrain(mesh, cfg.rules)
    step = make_step(lambda p, b: dpo.loss_fn(p, b, cfg, constrain, reference), optim.make(cfg, specs),
                     optim.schedule(cfg), cfg.optim.grad_accum, mask=state.trainable(specs))
    return step


@ON_BASE
@OBJECTIVE_STEP
def test_ppo_trains_adapters_against_its_base(base_dir, tmp_path):
    """PPO with a separate value model (GRPO shares the policy's path and has no value model)."""
    cfg = ppo_config(base_dir, "ppo", steps=2, **LORA)
    task = registry.task(cfg, str(tmp_path / "rl"), one_device())
    assert task.source.reference is None  # the reference is the policy's base, adapters off
    trained = registry.train(cfg, str(tmp_path / "rl"), one_device())
    base = runs.load_params(base_dir, make_mesh(cfg.mesh))
    jax.tree.map(np.testing.assert_array_equal, lora.strip(trained.params)["policy"], base)
    # the value model: a LoRA trunk on the same base, and its own trained head
    jax.tree.map(np.testing.assert_array_equal, lora.strip(trained.params)["value"]["trunk"], base)
    assert all(np.isfinite(row["loss"]) for row in metric_rows(str(tmp_path / "rl")) if "loss" in row)


@ON_BASE
@OBJECTIVE_STEP
def test_reward_model_trains_its_head_and_adapters(base_dir, tmp_path):
    cfg = reward_config(base_dir, steps=6, **LORA)
    trained = registry.train(cfg, str(tmp_path / "rm"), one_device())
    base = runs.load_params(base_dir, make_mesh(cfg.mesh))
    jax.tree.map(np.testing.assert_array_equal, lora.strip(trained.params)["trunk"], base)
    assert np.abs(np.asarray(trained.params["head"]["w"])).max() > 0
    scorer = runs.load_params(str(tmp_path / "rm"), make_mesh(cfg.mesh), "scorer")
    np.testing.assert_allclose(scorer["head"]["w"], trained.params["head"]["w"])


@pytest.mark.parametrize("change, message", [
    ({"lora.targets": "wq,w_fc"}, "lora.targets names ['w_fc']"),
    ({"lora.rank": 0}, "lora.rank=0"),
    ({"lora.rank": 100}, "1 <= r <= 32"),
    ({"lora.dropout": 1.0}, "lora.dropout=1.0"),
    ({"init_from": ""}, "LoRA adapts a trained model"),
    ({"init_from": "/nonexistent/base"}, "holds no run"),
])
@ON_BASE
def test_bad_lora_settings_are_refused_in_one_line(base_dir, change, message):
    with pytest.raises(LlmjaxError, match="^[^\n]*$") as e:
        registry.task(lora_config(base_dir, **change), "")
    assert message in str(e.value)


@ON_BASE
def test_a_lora_run_whose_base_is_gone_says_so(base_dir, tmp_path):
    import shutil

    base = str(tmp_path / "base")
    shutil.copytree(base_dir, base)
    run = str(tmp_path / "run")
    registry.train(lora_config(base, steps=2), run, one_device())
    shutil.rmtree(base)
    with pytest.raises(LlmjaxError, match="is a LoRA run, whose checkpoints hold only adapters; its base"):
        runs.load_params(run, make_mesh(dict(data=1, fsdp=-1, tensor=1)))
    assert metric_rows(run)


@ON_BASE
@OBJECTIVE_STEP
def test_dropout_applies_to_training_steps_only(base_dir):
    """LoRA dropout on the adapters' input changes the training step (B's gradient sees the dropped inputs even at
    step 0), while what evaluation and sampling see carries no keys and never drops."""
    after = {}
    for rate in (0.5, 0.0):
        cfg = lora_config(base_dir, **{"lora.dropout": rate})  # LORA's first step has a learning rate
        task = registry.task(cfg, "", one_device())
        s = task.start()
        after[rate] = task.jit_step(jax.tree.map(lambda x: x.sharding, s))(s, task.source(s, 0)[0])[0].params
    b = [lora.merge(after[rate])["layers"]["wq"] for rate in (0.5, 0.0)]
    assert not np.allclose(b[0], b[1])
    params = after[0.5]
    assert "lora_dropout" in params["layers"]["wq"] and "lora_key" not in params["layers"]["wq"]
    keyed = lora.keyed(params, jax.random.key(0))["layers"]["wq"]
    assert keyed["lora_key"].shape == (params["layers"]["wq"]["base"].shape[0],)


@ON_BASE
def test_merge_writes_a_plain_run_with_the_same_model(base_dir, lora_run, tmp_path):
    from llmjax import lora as lora_runs

    (run, trained), merged = lora_run, str(tmp_path / "merged")
    lora_runs.merge(run, merged)
    assert runs.run_config(merged).lora.targets == ""
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 runs.load_params(merged, make_mesh(lora_config(base_dir).mesh)), lora.merge(trained.params))
    with pytest.raises(LlmjaxError, match="is not a LoRA run"):
        lora_runs.merge(merged, str(tmp_path / "again"))


@pytest.mark.slow
def test_lora_sft_learns_over_its_base(tmp_path):
    """A tiny model pretrained on `sort` as plain text cannot answer in the chat format; rank-8 LoRA SFT on every
    projection teaches it in 60 steps (measured: 0% -> 34% greedy accuracy on 32 held-out prompts)."""
    base, run = str(tmp_path / "base"), str(tmp_path / "lora")
    registry.train(tiny_config(steps=100, **{"data.tasks": "sort", "optim.lr": 3e-3}), base, one_device())
    cfg = tiny_config(steps=60, eval_every=60, eval_prompts=32, **{
        "data.format": "chat", "data.tasks": "sort", "init_from": base, "lora.targets": "all", "lora.rank": 8,
        "optim.lr": 1e-2})
    mesh = one_device()
    from llmjax.evaluate import make_evaluator

    before = make_evaluator(cfg, mesh, n=32)(runs.load_params(base, mesh))["accuracy"]
    registry.train(cfg, run, one_device())
    after = [r for r in metric_rows(run) if "eval/accuracy" in r][-1]["eval/accuracy"]
    assert before < 0.1 and after > before + 0.25, (before, after)
