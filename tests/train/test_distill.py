"""Distillation: the loss is the divergence between the two models' distributions, sharded equals one device, the
teacher is never updated, bad teachers are refused, LoRA students train, and a student learns from its teacher
off-policy and on-policy."""

from functools import partial

import jax
import numpy as np
import pytest
from helpers import metric_rows, one_device, prompts_file, reward_config, saved_run, tiny_config

from llmjax import config, runs, sharding
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.models import transformer
from llmjax.train import common, distill, registry

CHAT = {"data.format": "chat", "data.tasks": "sort"}
WHOLE_STEPS = pytest.mark.slow  # these compile whole steps (and sample, or train a run): out of the inner loop
LARGER = {"model.d_model": 96, "model.n_layers": 3, "model.d_ff": 192}  # a teacher the student is not


def distill_config(teacher: str, **overrides):
    """A tiny student on `sort` as chat, distilled from `teacher` as configs/distill.py says."""
    own = {k: v for k, v in overrides.items() if k.startswith("distill.")}
    cfg = tiny_config(**CHAT, trainer="distill", **{k: v for k, v in overrides.items() if k not in own})
    cfg.distill = config.load("configs/distill.py:model=tiny").distill
    cfg.distill.teacher = teacher
    for key, value in own.items():
        config.override(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A larger tiny model saved untrained, its weights scaled so that its distributions are far from uniform."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    saved_run(tiny_config(**CHAT, **LARGER), workdir, scale=8.0)
    return workdir


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def divergence64(student: np.ndarray, teacher: np.ndarray, mask: np.ndarray, kind: str, beta: float,
                 temperature: float) -> float:
    """The paper's formulas in float64 NumPy: per token summed over the vocabulary, the mean over masked tokens."""
    logq, logp = log_softmax64(student / temperature), log_softmax64(teacher / temperature)
    p, q = np.exp(logp), np.exp(logq)
    if kind == "forward_kl":
        per = (p * (logp - logq)).sum(-1)
    elif kind == "reverse_kl":
        per = (q * (logq - logp)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        per = beta * (p * (logp - np.log(m))).sum(-1) + (1 - beta) * (q * (logq - np.log(m))).sum(-1)
    return float((per * mask).sum() / mask.sum())


@pytest.mark.parametrize("kind, beta, temperature, ce_weight", [
    ("forward_kl", 0.5, 1.0, 0.0), ("reverse_kl", 0.5, 2.0, 0.0), ("jsd", 0.1, 1.0, 0.0), ("jsd", 0.9, 0.5, 0.0),
    ("forward_kl", 0.5, 1.0, 0.5)])
def test_loss_is_the_divergence_between_the_two_models(teacher, kind, beta, temperature, ce_weight):
    """The step's loss on a data batch, from a teacher larger than the student, equals the float64 divergence of
    the two models' logits over the answer tokens (prompts and padding excluded), plus ce_weight x cross-entropy."""
    cfg = distill_config(teacher)
    cfg.distill.update(divergence=kind, beta=beta, temperature=temperature, ce_weight=ce_weight)
    mesh = one_device()
    task = registry.task(cfg, "", mesh)
    student = task.start().params
    batch = task.source(None, 0)[0]
    loss, aux = jax.jit(partial(distill.loss_fn, cfg=cfg, teacher_model=distill.teacher_config(cfg).model,
                                constrain=sharding.make_constrain(mesh, cfg.rules)))(student, batch, *task.frozen)
    rows = batch["inputs"], batch["positions"], batch["segment_ids"]
    vocab = get_tokenizer(cfg.data.tokenizer).vocab_size  # the tokenizer's ids: an embedding may be padded past it
    s, t = (np.asarray(transformer.forward(params, *rows, model).logits_BTV) for params, model in
            ((student, cfg.model), (task.frozen[0], distill.teacher_config(cfg).model)))
    mask = np.asarray(batch["loss_mask"])
    assert 0 < mask.sum() < mask.size  # prompts and padding are masked out
    want = divergence64(s[..., :vocab], t[..., :vocab], mask, kind, beta, temperature)
    if ce_weight:
        logq = log_softmax64(s)
        nll = -np.take_along_axis(logq, np.asarray(batch["targets"])[..., None], -1)[..., 0]
        want += ce_weight * float((nll * mask).sum() / mask.sum())
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(aux["divergence"]) > 0.01  # the models differ: the check is not 0 == 0


@WHOLE_STEPS
def test_sharded_equals_single_device(teacher):
    results = []
    for mesh_cfg, devices in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              (dict(data=1, fsdp=2, context=2, tensor=2), jax.devices())):  # ring attention
        cfg = distill_config(teacher, mesh=mesh_cfg)
        cfg.distill.divergence = "jsd"
        task = registry.task(cfg, "", sharding.make_mesh(cfg.mesh, devices))
        state = task.start()
        state = state.replace(params=jax.tree.map(lambda x: x * 1.5, state.params))
        new, m = task.jit_step(jax.tree.map(lambda x: x.sharding, state))(state, task.source(None, 0)[0],
                                                                          *task.frozen)
        results.append(jax.device_get((new.params, m)))
    (params, m), (params_s, m_s) = results
    for key in ("loss", "grad_norm", "teacher_entropy", "student_entropy"):
        np.testing.assert_allclose(m_s[key], m[key], rtol=2e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), params_s, params)


@WHOLE_STEPS
def test_the_teacher_is_never_updated(teacher, tmp_path):
    """Three steps train the student; the teacher, a frozen argument of the step, is what its run holds, before and
    after, and no part of the student's checkpoint."""
    cfg = distill_config(teacher, steps=3, **{"checkpoint.every": 3, "optim.warmup_steps": 0})
    mesh = one_device()
    before = jax.device_get(runs.load_params(teacher, mesh))
    task = registry.task(cfg, str(tmp_path), mesh)
    start = jax.device_get(task.start().params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(task.frozen[0]), before)
    state = registry.train(cfg, str(tmp_path), mesh)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(runs.load_params(teacher, mesh)), before)
    assert jax.tree.structure(state.params) == jax.tree.structure(start)  # the student alone is trained and saved
    assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                        jax.tree.leaves(start), strict=True))
    assert runs.run_parts(str(tmp_path)) == {"lm": ()} and runs.made(str(tmp_path)) == "distill"


@pytest.mark.parametrize("change, message", [
    ({"data.tokenizer": "byte"}, "reads data.tokenizer='synthetic' .* the student 'byte'"),
    ({"model.vocab_size": 384}, r"model.vocab_size=320, the student 'synthetic' with 384"),
    ({"distill.divergence": "kl"}, r"distill.divergence='kl': choose one of forward_kl, reverse_kl, jsd"),
    ({"distill.beta": 1.0}, r"distill.beta=1.0"),
    ({"distill.on_policy": True, "distill.ce_weight": 0.5}, "on-policy tokens are the student's own answers"),
    ({"distill.on_policy": True, "distill.max_prompt_len": 250}, r"exceeds model.max_seq_len=256"),
    ({"distill.teacher": "/no/such/run"}, r"distill.teacher='/no/such/run' is not a run"),
])
def test_bad_teachers_and_settings_are_refused(teacher, change, message):
    cfg = distill_config(teacher)
    for key, value in change.items():
        config.override(cfg, key, value)
    with pytest.raises(LlmjaxError, match=message):
        registry.validate(cfg, 8)


def test_a_teacher_without_a_language_model_is_refused(tmp_path):
    saved_run(reward_config(), str(tmp_path / "rm"))
    with pytest.raises(LlmjaxError, match=r"distill.teacher needs a language model \(lm\)"):
        registry.task(distill_config(str(tmp_path / "rm")), "", one_device())


@WHOLE_STEPS
def test_a_lora_student_trains_its_adapters_alone(teacher, tmp_path):
    saved_run(tiny_config(**CHAT), str(tmp_path / "lm"), scale=2.0)
    cfg = distill_config(teacher, init_from=str(tmp_path / "lm"), **{"lora.targets": "all", "optim.warmup_steps": 0})
    task = registry.task(cfg, "", one_device())
    state = task.start()
    before = jax.device_get(state.params)
    new, m = task.jit_step(jax.tree.map(lambda x: x.sharding, state))(state, task.source(None, 0)[0], *task.frozen)
    after = jax.device_get(new.params)
    assert float(m["nonfinite"]) == 0
    for name, w in after["layers"].items():
        if isinstance(w, dict) and "lora_b" in w:
            assert np.abs(w["lora_b"] - before["layers"][name]["lora_b"]).max() > 0, name
            np.testing.assert_array_equal(w["base"], before["layers"][name]["base"])
    np.testing.assert_array_equal(after["embed"], before["embed"])


@WHOLE_STEPS
def test_on_policy_rows_are_the_students_answers(teacher):
    cfg = distill_config(teacher, **{"distill.on_policy": True})
    task = registry.task(cfg, "", one_device())
    assert isinstance(task.source, distill.OnPolicy)
    state = task.start()
    batch, made = task.source(state, 0)
    d = cfg.distill
    assert batch["inputs"].shape == (cfg.batch_size, d.max_prompt_len + d.max_new_tokens - 1)
    mask = np.asarray(batch["loss_mask"])
    assert not mask[:, :d.max_prompt_len - 1].any() and mask.sum(1).min() >= 1  # the answers alone, each >= 1 token
    np.testing.assert_allclose(mask.sum(1).mean(), float(made["response_length"]))
    new, m = task.jit_step(jax.tree.map(lambda x: x.sharding, state))(state, batch, *task.frozen)
    assert float(m["nonfinite"]) == 0 and float(m["loss"]) > 0


def test_on_policy_reads_a_files_source_of_prompts(teacher, tmp_path):
    """On-policy, a files: source's records are the prompts answered, and evaluation checks the held-out ones'
    answers (there are no text rows to score)."""
    cfg = distill_config(teacher, eval_every=10, **{"distill.on_policy": True, "distill.tasks": ""})
    cfg.data.update(source=prompts_file(tmp_path / "p.jsonl", n=40), data_dir=str(tmp_path / "tfds"), validation=0.2)
    task = registry.task(cfg, "", one_device())
    records = task.source.prompts(0)
    assert len(records) == cfg.batch_size and all("answer" in r and "id" in r for r in records)
    assert task.evaluate is not None


def final_evaluation(workdir: str) -> dict:
    row = [row for row in metric_rows(workdir) if "eval/divergence_to_teacher" in row][-1]
    return {k.removeprefix("eval/"): v for k, v in row.items()}


@pytest.fixture(scope="module")
def distilled(sft_dir, tmp_path_factory) -> tuple[str, dict, dict, float]:
    """A fresh tiny student distilled off-policy from the SFT run: (its workdir, its evaluation before and after,
    the teacher's accuracy on the same held-out prompts). Its users run in one worker, which trains it once."""
    mesh, workdir = one_device(), str(tmp_path_factory.mktemp("distilled"))
    cfg = distill_config(sft_dir, steps=150, eval_every=150, eval_prompts=64, **{"optim.lr": 3e-3})
    fresh = registry.task(cfg, workdir, mesh)
    before = fresh.evaluate(fresh.start().params)
    teacher = fresh.evaluate(runs.load_params(sft_dir, mesh))["accuracy"]
    registry.train(cfg, workdir, mesh)
    return workdir, before, final_evaluation(workdir), teacher


def learnt(before: dict, after: dict, teacher: float) -> None:
    """The held-out divergence to the teacher halves (at least), and accuracy moves toward the teacher's."""
    assert after["divergence_to_teacher"] < 0.5 * before["divergence_to_teacher"], (before, after)
    assert abs(after["accuracy"] - teacher) < abs(before["accuracy"] - teacher), (before, after, teacher)


@pytest.mark.xdist_group("distilled")
def test_a_student_learns_from_its_teacher_off_policy(distilled):
    """Measured on 64 held-out sort prompts: 5.11 -> 0.043 nats a token, accuracy 0% -> 28.1% (the teacher's ~30%)."""
    _, before, after, teacher = distilled
    learnt(before, after, teacher)


@pytest.mark.xdist_group("distilled")
def test_a_student_learns_from_its_teacher_on_policy(distilled, sft_dir, tmp_path):
    """From the off-policy student, as GKD starts (a fresh student's own answers are noise): 0.043 -> 0.0057 nats,
    accuracy 28.1% -> 29.7%."""
    start, _, before, teacher = distilled
    cfg = distill_config(sft_dir, steps=100, eval_every=100, eval_prompts=64, init_from=start,
                         **{"distill.on_policy": True, "distill.divergence": "jsd", "optim.lr": 1e-3})
    registry.train(cfg, str(tmp_path), one_device())
    learnt(before, final_evaluation(str(tmp_path)), teacher)


def test_flops_count_the_teachers_forward(teacher):
    """Per token: the student's training FLOPs, the teacher's forward (a third of its training FLOPs at this
    sequence length), and on-policy the student's sampling forward."""
    cfg = distill_config(teacher)
    teacher_cfg = distill.teacher_config(cfg)
    teacher_cfg.seq_len = cfg.seq_len
    teacher_forward = common.lm_flops(teacher_cfg, forward=True)
    assert teacher_forward > common.lm_flops(cfg, forward=True)  # the larger model's
    assert registry.task(cfg, "", one_device()).flops_per_token == pytest.approx(common.lm_flops(cfg) + teacher_forward)
    cfg.distill.on_policy = True
    assert distill.flops_per_token(cfg) == pytest.approx(common.lm_flops(cfg) * 4 / 3 + teacher_forward)
