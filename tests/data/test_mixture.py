"""Data mixtures (llmjax.data.mixture): shares by weight, stages, exact resume, per-source accounting, validation,
and a run that reads one end to end."""

import json
import logging
import shutil

import numpy as np
import pytest
from helpers import dpo_config, metric_rows, one_device, ppo_config, prompts_file, tiny_config

from llmjax import checkpoint, runs
from llmjax.data import mixture, preference, prompts
from llmjax.data.tokenizer import ByteTokenizer
from llmjax.errors import LlmjaxError
from llmjax.sharding import batch_sharding
from llmjax.train import registry

LETTERS = "ab"  # source a's documents are all "a"s, b's all "b"s: a row's letter names its source
TOK = ByteTokenizer()


def letters_source(root, letter: str, n: int = 60) -> str:
    """A folder of n text documents of one letter, of lengths 5-40 (several to a row of 64 bytes)."""
    folder = root / letter
    folder.mkdir()
    rng = np.random.default_rng(ord(letter))
    with open(folder / "docs.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": letter * int(rng.integers(5, 40)) + f" {i}"}) + "\n")
    return f"files:{folder}"


@pytest.fixture
def two(tmp_path):
    """A config mixing sources a and b (byte tokenizer), 30 steps, its tfds cache in tmp_path."""
    cfg = tiny_config(steps=30, **{"data.tokenizer": "byte", "data.data_dir": str(tmp_path / "tfds"),
                                   "data.validation": 0.1, "data.source": "mixture"})
    cfg.data.mixture = {c: dict(source=letters_source(tmp_path, c), format="text", epochs=0) for c in LETTERS}
    cfg.data.weights = "a=0.8, b=0.2"
    return cfg


def source_of(row: np.ndarray) -> str:
    """The source a packed row came from: the letter its documents are made of."""
    found = set(TOK.decode(row)) & set(LETTERS)
    assert len(found) == 1, found  # a row holds one source's documents
    return found.pop()


def draw(cfg, steps: int, state: dict | None = None):
    """(per step: the batch as numpy, its metrics), and the iterator's state after them (from `state`)."""
    it, get = mixture.batches(cfg, batch_sharding(one_device(), cfg.rules))
    if state is not None:
        it.set_state(json.loads(json.dumps(state)))  # as a checkpoint holds it
    out = [get(s) for s in range(steps)]
    return [({k: np.asarray(v) for k, v in b.items()}, m) for b, m in out], it.get_state()


def test_weights_are_shares_of_the_rows_and_the_tokens_are_counted(two):
    batches, _ = draw(two, 20)
    rows = [source_of(r) for b, _ in batches for r in b["inputs"]]
    assert rows.count("a") / len(rows) == pytest.approx(0.8, abs=0.02)  # grain mixes in fixed proportions
    tokens = {c: sum(int((b["segment_ids"][i] > 0).sum()) for b, _ in batches for i, r in enumerate(b["inputs"])
                     if source_of(r) == c) for c in LETTERS}
    assert batches[-1][1] == pytest.approx({"data/a/tokens": tokens["a"], "data/b/tokens": tokens["b"],
                                            "data/a/epochs": batches[-1][1]["data/a/epochs"],
                                            "data/b/epochs": batches[-1][1]["data/b/epochs"]})
    assert tokens["a"] / (tokens["a"] + tokens["b"]) == pytest.approx(0.8, abs=0.05)


def test_epochs_count_passes_over_a_source_and_a_new_pass_is_logged(two, caplog):
    with caplog.at_level(logging.INFO, logger="llmjax"):
        batches, _ = draw(two, 20)
    records = {c: len(mixture._records(mixture.view(two, c))) for c in LETTERS}
    epochs = [m["data/b/epochs"] for _, m in batches]
    assert all(np.diff(epochs) >= 0) and epochs[-1] > 1  # b's 54 records are read more than once in 20 steps
    # Each row of b ends with its last document's number: the epochs reported are the records read so far.
    assert epochs[-1] == pytest.approx(int(np.ceil(epochs[-1] * records["b"])) / records["b"])
    assert "data.mixture.b starts epoch 2" in caplog.text


def test_stages_switch_weights_and_a_source_resumes_where_it_stopped(two):
    two.data.weights = "0: a=0.5, b=0.5; 10: a=1; 50%: b=1"
    batches, _ = draw(two, 20)
    share = [np.mean([source_of(r) == "a" for r in b["inputs"]]) for b, _ in batches]
    assert share[:10] == [0.5] * 10 and share[10:15] == [1.0] * 5 and share[15:] == [0.0] * 5
    tokens = [m["data/b/tokens"] for _, m in batches]
    assert tokens[10] == tokens[14] < tokens[15]  # b is not read in the a-only stage
    # b's rows go on where they stopped at step 10: they are the rows b gives in a run that never pauses it.
    b_rows = [r for b, _ in batches for r in b["inputs"] if source_of(r) == "b"]
    two.data.weights = "a=0.5, b=0.5"
    steady = [r for b, _ in draw(two, 20)[0] for r in b["inputs"] if source_of(r) == "b"]
    np.testing.assert_array_equal(b_rows, steady[:len(b_rows)])


@pytest.mark.parametrize("at", [3, 9, 10, 17])  # mid-stage, at and after the boundary
def test_resume_is_exact_mid_mixture_and_across_a_stage_boundary(two, at):
    two.data.weights = "0: a=0.7, b=0.3; 10: a=0.2, b=0.8"
    whole, _ = draw(two, 20)
    _, state = draw(two, at)
    rest, _ = draw(two, 20 - at, state)
    for (b1, m1), (b2, m2) in zip(whole[at:], rest, strict=True):
        assert m1 == m2
        for k in b1:
            np.testing.assert_array_equal(b1[k], b2[k])


@pytest.mark.parametrize("weights, problem", [
    ("a=0.8, b=-0.2", "below 0"),
    ("a=0, b=0", "weighs every source 0"),
    ("a=1, c=1", "which data.mixture does not define"),
    ("a=1", "data.mixture.b is never drawn"),
    ("0: a=1; 20: b=1; 10: a=1, b=1", "stages overlap"),
    ("5: a=1, b=1", "steps 0-4 have no weights"),
    ("0: a=1; 30: b=1", "after the run's steps=30"),
    ("0: a=1; b=1", "has no start"),
    ("a=x, b=1", "is not a number"),
    ("", "no data.weights"),
])
def test_bad_weights_are_refused_in_one_line(two, weights, problem):
    two.data.weights = weights
    with pytest.raises(LlmjaxError, match=problem):
        registry.validate(two, 1)


def test_bad_sources_are_refused_in_one_line(two, tmp_path):
    bad = two.copy_and_resolve_references()
    bad.data.mixture.a.epochs = 2
    bad.data.mixture.a.source = "synthetic"
    with pytest.raises(LlmjaxError, match="synthetic tasks are endless"):
        registry.validate(bad, 1)
    bad.data.mixture.a.source = "http://x"
    with pytest.raises(LlmjaxError, match="use synthetic"):
        registry.validate(bad, 1)
    chat = two.copy_and_resolve_references()
    chat.data.mixture.b.format = "chat"  # its records hold text alone
    with pytest.raises(LlmjaxError, match=r"data.mixture.b: .*reads prompt, response"):
        registry.task(chat, str(tmp_path / "run"), one_device())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "none.jsonl").write_text("")
    chat.data.mixture.b.source, chat.data.mixture.b.format = f"files:{tmp_path / 'empty'}", "text"
    with pytest.raises(LlmjaxError, match="data.mixture.b: .*every file is empty"):
        registry.task(chat, str(tmp_path / "run"), one_device())
    one = tiny_config(**{"data.weights": "a=1"})
    with pytest.raises(LlmjaxError, match="set --config.data.source=mixture"):
        registry.validate(one, 1)


def test_a_run_on_a_mixture_logs_each_source_and_stops_when_one_runs_out(two, tmp_path, caplog):
    """Synthetic tasks and b read once (epochs=1): the run stops, saved, when b's records are used up, having
    logged tokens and epochs per source and evaluated each source's held-out perplexity."""
    cfg = two.copy_and_resolve_references()
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.eval_prompts = 60, 1, 4, 2
    cfg.data.mixture = dict(tasks=dict(source="synthetic:sort", format="text", epochs=0), b=cfg.data.mixture.b)
    cfg.data.mixture.b.epochs = 1
    cfg.data.weights = "tasks=0.5, b=0.5"
    workdir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="llmjax"):
        registry.train(cfg, workdir, one_device())
    rows = metric_rows(workdir)
    logged = [r for r in rows if "data/b/tokens" in r]
    last = max(r["step"] for r in logged)
    assert 4 < last < 60 and 0.8 < logged[-1]["data/b/epochs"] <= 1  # the batch it ran out in is dropped
    assert checkpoint.latest_step(workdir) == last  # saved where the data ran out
    assert "the data ran out at step" in caplog.text and "data.mixture.b starts epoch 2" not in caplog.text
    assert "data/tasks/epochs" not in logged[-1] and logged[-1]["data/tasks/tokens"] > 0
    evals = [r for r in rows if "eval/perplexity/b" in r]
    assert evals and {"eval/perplexity/tasks", "eval/accuracy/sort", "eval/perplexity"} <= set(evals[-1])
    assert runs.run_config(workdir).data.mixture.b.epochs == 1


def test_rl_prompts_mix_by_weight_in_stages_and_are_evaluated_per_source(tmp_path):
    """GRPO's prompts from the synthetic tasks and a prompts file: the file's share per stage, its records in a
    seeded order that goes on across stages, the same prompts for a step whenever asked (a resumed run), and
    evaluation sets for the tasks and for the file under its mixture name."""
    cfg = ppo_config("runs/sft", algorithm="grpo", **{"data.data_dir": str(tmp_path / "tfds"), "data.validation": 0.2,
                                             "data.source": "mixture", "steps": 8})
    cfg.data.mixture = dict(tasks=dict(source="synthetic:reverse"),
                            file=dict(source=prompts_file(tmp_path / "p.jsonl", 200)))
    cfg.data.weights = "0: tasks=0.5, file=0.5; 4: tasks=1; 6: file=1"
    cfg.ppo.reward = "math"
    registry.validate(cfg, 1)
    draw = prompts.source(cfg, k=4)  # 4 prompts a step, each 4 times
    steps = [draw(s)[::4] for s in range(8)]
    from_file = [["id" in r for r in step] for step in steps]
    assert [sum(f) for f in from_file] == [2, 2, 2, 2, 0, 0, 4, 4]
    assert all(r["prompt"].startswith("reverse") for step in steps for r in step if "id" not in r)
    ids = [r["id"] for step in steps for r in step if "id" in r]
    assert len(set(ids)) == len(ids) == 16  # the file goes on where it stopped: no record twice in one pass
    assert steps == [prompts.source(cfg, k=4)(s)[::4] for s in range(8)]
    sets = prompts.held_out(cfg, 3)
    assert set(sets) == {"reverse", "file"} and all("id" in r for r in sets["file"])
    cfg.ppo.reward = "tasks"  # the file's records have no task
    with pytest.raises(LlmjaxError, match="tasks' checkers score the synthetic tasks"):
        registry.validate(cfg, 1)


def test_preference_pairs_mix_by_weight(tmp_path):
    """DPO's pairs from the synthetic tasks and a file of preference records, by weight."""
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    with open(pairs / "pairs.jsonl", "w") as f:
        for i in range(100):
            f.write(json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n")
    cfg = dpo_config("runs/sft", **{"data.data_dir": str(tmp_path / "tfds"), "data.source": "mixture", "eval_every": 0})
    cfg.data.mixture = dict(tasks=dict(source="synthetic"), file=dict(source=f"files:{pairs}"))
    cfg.data.weights = "tasks=0.25, file=0.75"
    registry.validate(cfg, 1)
    ranked = preference.source(cfg)
    rows = [ranked(step, r) for step in range(4) for r in range(cfg.batch_size)]
    from_file = [p for p, _ in rows if p.startswith("q")]
    assert len(from_file) == 24 and len(set(from_file)) == 24
    assert all(p.startswith("sort") for p, _ in rows if not p.startswith("q"))


@pytest.mark.slow
def test_a_run_resumed_across_a_stage_boundary_equals_one_never_stopped(two, tmp_path):
    """Killed after its step-3 checkpoint, a run whose stage changes at step 4 resumes to the same losses and data
    counts as a run that never stopped: the mixture's place is in the checkpoint."""
    cfg = two.copy_and_resolve_references()
    cfg.steps, cfg.log_every, cfg.checkpoint.every = 6, 1, 3
    cfg.optim.schedule, cfg.optim.warmup_steps = "constant", 0
    cfg.data.weights = "0: a=0.5, b=0.5; 4: a=0.25, b=0.75"
    workdir = tmp_path / "run"
    registry.train(cfg, str(workdir), one_device())
    straight = {row["step"]: row for row in metric_rows(workdir)}
    shutil.rmtree(workdir / "checkpoints" / "6")  # as if killed before the last save
    registry.train(cfg, str(workdir), one_device())
    again = {row["step"]: row for row in metric_rows(workdir)}  # rows 4-6 rewritten by the resumed run
    assert "compile_s" in again[4] and "compile_s" not in straight[4]  # step 4 was trained again, after a start
    for step in (4, 5, 6):
        assert again[step]["loss"] == straight[step]["loss"]
        assert {k: v for k, v in again[step].items() if k.startswith("data/")} == {
            k: v for k, v in straight[step].items() if k.startswith("data/")}
