"""The rounds experiment: two rounds on `tiny` end to end, resumed after a kill (what is done is not done again, round
1's training untouched), its table holding every round; each round's prompts fresh and never held out; bad settings
refused in one line."""

import dataclasses
import json

import jax
import pytest

from experiments.rl import word_problems
from experiments.rounds import run
from llmjax import config, runs
from llmjax.data import prompts
from llmjax.errors import LlmjaxError
from llmjax.train.registry import validate


def test_two_rounds_resume_after_a_kill(sft_dir, tmp_path):
    root, devices = tmp_path / "rounds", jax.devices()[:1]
    plan = run.Plan(sft_dir, rounds=1, n=4, num_prompts=16, sft_steps=2, dpo_steps=2, eval_prompts=8, samples=2)
    first = run.run(str(root), plan, devices)
    (root / "round_1" / "eval.json").unlink()  # as if killed after round 1's DPO, before its evaluation
    done = [root / name for name in ("round_0/eval.json", *(f"round_1/{name}" for name in (
        "prompts.jsonl", "samples.jsonl", "pairs.jsonl", "sft/config.json", "sft/metrics.jsonl", "dpo/config.json",
        "dpo/metrics.jsonl", "dpo/parts.json")))]
    mtimes = [path.stat().st_mtime_ns for path in done]

    out = run.run(str(root), dataclasses.replace(plan, rounds=2), devices)
    assert [path.stat().st_mtime_ns for path in done] == mtimes  # nothing done was done again
    assert [r["round"] for r in out["rounds"]] == [0, 1, 2]
    assert {k: v for k, v in out["rounds"][1].items() if k != "minutes"} == {
        k: v for k, v in first["rounds"][1].items() if k != "minutes"}  # round 1's evaluation, redone alike
    for r in (1, 2):
        here = root / f"round_{r}"
        sft, dpo = runs.run_config(str(here / "sft")), runs.run_config(str(here / "dpo"))
        assert sft.init_from == (str(root / "round_1" / "dpo") if r == 2 else sft_dir)
        assert dpo.init_from == str(here / "sft") and dpo.trainer == "dpo" and (sft.steps, dpo.steps) == (2, 2)
        assert sft.data.source == f"files:{here / 'samples.jsonl'}"
        assert dpo.data.source == f"files:{here / 'pairs.jsonl'}"
        kept = [json.loads(line) for line in (here / "samples.jsonl").read_text().splitlines()]
        row = out["rounds"][r]
        assert row["kept"] == len(kept) > 0 and all(k["score"] == 1.0 for k in kept)  # min_score=1: right answers
        assert 0 <= row["reward/sample"] <= row["reward/best_of_n"] <= 1 and row["policy"] == str(here / "dpo")
    for row in out["rounds"]:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["pass@1"] <= row["pass@2"] <= 1 and "accuracy/sort" in row
    prompts_of = [{json.loads(line)["prompt"] for line in (root / f"round_{r}" / "prompts.jsonl").read_text()
                   .splitlines()} for r in (1, 2)]
    assert not prompts_of[0] & prompts_of[1]  # fresh prompts each round
    table = (root / "results.md").read_text()
    assert table == run.table(out) and json.loads((root / "results.json").read_text()) == json.loads(json.dumps(out))
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| 0", "| 1", "| 2"]
    assert (root / "rounds.png").stat().st_size > 10_000


def test_rounds_take_fresh_slices_of_a_prompt_files_train_split(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in word_problems.generate(60, seed=0)))
    cfg = config.base("tiny")
    cfg.data.update(source=f"files:{path}", validation=0.2, data_dir=str(tmp_path / "tfds"))
    plan = run.Plan("unused", rounds=3, num_prompts=12, prompts=str(path))
    rounds, pool = run.round_records(plan, cfg)
    held_out = {r["prompt"] for r in prompts.records(cfg, "validation")}
    asked = [r["prompt"] for records in rounds for r in records]
    assert [len(records) for records in rounds] == [12, 12, 12] and len(set(asked)) == 36
    assert held_out and not set(asked) & held_out and len(pool) + len(held_out) == 60
    assert all(set(r) == {"prompt", "answer"} for records in rounds for r in records)


def test_every_stage_validates_and_grpo_samples_as_many_answers(tmp_path):
    start = tmp_path / "start"  # a run's config is all a stage's config reads of its start
    start.mkdir()
    (start / "config.json").write_text(config.load("configs/sft.py:model=tiny").to_json())
    plan = run.Plan(str(start), rounds=2, n=4, num_prompts=64, tasks="sort", dpo_steps=8, lora="all", grpo=True,
                    sft_config=("optim.lr=5e-5",))
    planned = run.stages(plan, str(tmp_path / "rounds"), 96, 30)
    assert [s.name for s in planned] == ["round_1/sft", "round_1/dpo", "round_2/sft", "round_2/dpo", "grpo"]
    for s in planned:
        validate(s.cfg, 1)
        config_file = {"pretrain": "sft", "dpo": "dpo", "ppo": "ppo"}[s.cfg.trainer]
        assert s.command.startswith(f"python -m llmjax.main --config=configs/{config_file}.py:model={start},")
        assert s.command.endswith(f"--workdir={s.workdir}") and s.cfg.model.name == "tiny"
    sft, dpo, sft_2, _, grpo = (s.cfg for s in planned)
    assert [s.cfg.init_from for s in planned] == [str(start), planned[0].workdir, planned[1].workdir,
                                                  planned[2].workdir, str(start)]
    assert (sft.optim.lr, sft.steps, sft.seq_len, sft.lora.targets, sft_2.optim.lr) == (5e-5, 64, 96, "all", 5e-5)
    assert (dpo.trainer, dpo.steps, dpo.dpo.nll_weight, dpo.optim.lr) == ("dpo", 8, 1.0, run.DPO_DEFAULTS["optim.lr"])
    assert grpo.ppo.algorithm == "grpo" and grpo.ppo.group_size == 4 and grpo.ppo.reward == "tasks"
    assert grpo.steps * grpo.batch_size == 2 * 64 * 4 and grpo.batch_size == run.GRPO_PROMPTS * 4


def test_bad_settings_are_one_line(tmp_path):
    base = config.load("configs/sft.py:model=tiny")
    assert run.typed(base, ("optim.lr=3e-4", "lora.targets=all"), "sft_config") == {"optim.lr": 3e-4,
                                                                                     "lora.targets": "all"}
    for pair in ("optim.lrr=1", "optim.lr=fast", "steps"):
        with pytest.raises(LlmjaxError, match="--sft_config=") as error:
            run.typed(base, (pair,), "sft_config")
        assert "\n" not in str(error.value)
    with pytest.raises(LlmjaxError, match="SFT or DPO steps"):
        run.run(str(tmp_path), run.Plan("unused", sft_steps=0, dpo_steps=0))
    with pytest.raises(LlmjaxError, match="does not exist"):
        run.run(str(tmp_path), run.Plan("unused", prompts=str(tmp_path / "missing.jsonl")))


def test_table_reads_each_rounds_row():
    row = {"accuracy": 0.5, "pass@1": 0.4, "pass@2": 0.6, "accuracy/sort": 0.5, "pass@1/sort": 0.3, "pass@2/sort": 0.6,
           "minutes": 1.0}
    out = {"plan": {"samples": 2, "n": 4}, "rounds": [
        {"round": 0, **row}, {"round": 1, **row, "reward/sample": 0.25, "reward/best_of_n": 0.5, "kept": 8,
                              "prompts": 16, "pairs": 6}], "grpo": {"round": "grpo", **row, "answers": 1024}}
    lines = run.table(out).splitlines()
    assert lines[0] == ("| round | greedy | pass@1 | pass@2 | sort: greedy / pass@1 / pass@2 | trained on: mean reward "
                        "→ best of 4 | kept | pairs | minutes |")
    assert lines[3] == "| 1 | 50.0% | 40.0% | 60.0% | 50.0% / 30.0% / 60.0% | 0.250 → 0.500 | 8 / 16 | 6 | 1.0 |"
    assert lines[4] == "| grpo | 50.0% | 40.0% | 60.0% | 50.0% / 30.0% / 60.0% | GRPO, 1,024 answers |  |  | 1.0 |"
