"""Rejection sampling: the kept response is the best of its N (by the checkers and by a reward model), the output
is an SFT dataset the chat pipeline reads, best-of-N beats one sample, and the CLI runs end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from llmjax import rejection_sample as rs
from llmjax import runs, sharding
from llmjax.data import pipeline, sources, tasks
from llmjax.data.tokenizer import ByteTokenizer
from llmjax.errors import LlmjaxError
from llmjax.score import Scorer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def policy(sft_dir):
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    return runs.load_params(sft_dir, mesh), rs.policy_config(sft_dir)


def rescore(samples, score_fn):
    """Every sample scored again, all at once."""
    flat = [(p, r) for p, responses in zip(samples.prompts, samples.responses, strict=True) for r in responses]
    return np.asarray(score_fn(*zip(*flat, strict=True))).reshape(samples.scores.shape)


def assert_kept_the_best(samples, records, scores):
    """One record per prompt with a valid response: one of them, of the best score among them."""
    kept = np.flatnonzero(samples.valid.any(axis=1))
    assert len(records) == len(kept) >= 0.9 * len(samples.prompts)
    for record, i in zip(records, kept, strict=True):
        best = scores[i][samples.valid[i]].max()
        assert record["prompt"] == samples.prompts[i]
        assert any(r == record["response"] and v and np.isclose(s, best, rtol=1e-5, atol=1e-5)
                   for r, v, s in zip(samples.responses[i], samples.valid[i], scores[i], strict=True))
        np.testing.assert_allclose(record["score"], best, rtol=1e-5, atol=1e-5)


def test_best_skips_invalid_responses_and_low_scores():
    samples = rs.Samples(prompts=["a", "b", "c"], responses=[[p + str(i) for i in range(3)] for p in "abc"],
                         scores=np.array([[0.5, 2.0, 0.9], [0.1, 0.3, 0.3], [5.0, 1.0, 1.0]]),
                         valid=np.array([[True, False, True], [True, True, True], [False, False, False]]))
    assert [r["response"] for r in samples.best()] == ["a2", "b1"]  # a1 scored best but never finished
    assert [r["response"] for r in samples.best(min_score=0.5)] == ["a2"]
    summary = samples.summary()
    assert summary["score/best_of_n"] == pytest.approx((0.9 + 0.3 + 5.0) / 3) and "accuracy/sample" not in summary
    assert samples.pairs() == [{"prompt": "a", "chosen": "a2", "rejected": "a0"},  # best and worst that finished
                               {"prompt": "b", "chosen": "b1", "rejected": "b0"}]  # c: none finished


def test_a_reward_spec_scores_with_each_prompts_record():
    records = [{"prompt": "Ana has 3 apples. She buys 4 more. How many?", "answer": "7"},
               {"prompt": "Ben has 10 coins. He loses 2. How many?", "answer": "8"}]
    math = rs.make_scorer("math", records)
    responses = ["7", "She has 9"]
    np.testing.assert_array_equal(math([r["prompt"] for r in records], responses), [1.0, 0.0])
    np.testing.assert_array_equal(math([records[1]["prompt"]] * 2, ["8", "\\boxed{8}"]), [1.0, 1.0])  # by prompt
    summed = rs.make_scorer(r"math,format:^\d+$:0.5", records)
    np.testing.assert_allclose(summed([r["prompt"] for r in records], responses), [1.5, 0.0])
    synthetic = rs.synthetic_records("sort,add", 6, seed=3)
    tasks_term = rs.make_scorer("tasks:2.0", synthetic)  # the rewards kind, reading each record's "task"
    answers = [r["answer"] if i % 2 else "x" for i, r in enumerate(synthetic)]
    np.testing.assert_array_equal(tasks_term([r["prompt"] for r in synthetic], answers), [0, 2, 0, 2, 0, 2])


@pytest.mark.parametrize("spec, records, match", [
    ("format:(", [{"prompt": "p"}], "the regex '\\(' does not compile"),
    ("no_such_module_xyz:fn", [{"prompt": "p"}], "no module 'no_such_module_xyz'"),
    ("math", [{"prompt": "p", "answer": "1"}, {"prompt": "q"}], "record 1 .* has none"),
    ("exact", [{"prompt": "p", "answer": "1"}, {"prompt": "p", "answer": "2"}], "given twice"),
    ("math,tasks", [{"prompt": "sort 21 = ", "answer": "12"}], "'task'"),
])
def test_bad_reward_specs_are_one_line_before_sampling(spec, records, match):
    with pytest.raises(LlmjaxError, match=match) as error:
        rs.make_scorer(spec, records)
    assert "\n" not in str(error.value)


def test_best_of_n_with_checkers_is_an_sft_dataset(policy, tmp_path):
    params, cfg = policy
    prompts = [r["prompt"] for r in rs.synthetic_records(cfg.data.tasks, 48, seed=1)]
    samples = rs.best_of_n(params, cfg, prompts, 8, rs.check_tasks, jax.random.key(0), batch_size=160,
                           max_new_tokens=16, progress=False)  # 384 rows: a last batch of 64 filled with repeats
    assert samples.scores.shape == (48, 8) and samples.valid.mean() > 0.8
    checked = np.array([[tasks.TASKS["sort"].check(p, r) for r in responses]
                        for p, responses in zip(prompts, samples.responses, strict=True)])
    np.testing.assert_array_equal(samples.scores, checked)
    records = samples.best()
    assert_kept_the_best(samples, records, checked)

    summary = samples.summary()
    assert summary["accuracy/sample"] == pytest.approx(checked[samples.valid].sum() / checked.size)
    assert summary["accuracy/best_of_n"] >= summary["accuracy/sample"] + 0.1, summary
    correct = samples.best(min_score=1.0)
    assert len(correct) == summary["accuracy/best_of_n"] * 48 and all(r["score"] == 1.0 for r in correct)

    path = tmp_path / "best.jsonl"
    rs.write_jsonl(str(path), records)
    loaded = sources.load(f"files:{path}", str(tmp_path / "tfds"), "train", kind="sft", strict=True, validation=0.0)
    assert [(r["prompt"], r["response"]) for r in loaded] == [(r["prompt"], r["response"]) for r in records]
    batch = next(pipeline.make_iterator(loaded, tokenizer=ByteTokenizer(), seq_len=64, batch_size=8, format="chat"))
    assert batch["loss_mask"].sum() > 0  # the chat format trains on the kept responses


def test_best_of_n_with_a_reward_model(policy, rm_dir):
    params, cfg = policy
    scorer = Scorer(rm_dir)
    prompts = [r["prompt"] for r in rs.synthetic_records("sort", 8)]
    samples = rs.best_of_n(params, cfg, prompts, 4, scorer, jax.random.key(1), batch_size=16, max_new_tokens=16,
                           progress=False)
    scores = rescore(samples, scorer)
    np.testing.assert_allclose(samples.scores, scores, rtol=1e-5, atol=1e-5)
    assert (np.ptp(scores, axis=1) > 0).mean() >= 0.5  # scores differ within a prompt: the choice matters
    assert_kept_the_best(samples, samples.best(), scores)


def test_bad_inputs_name_the_fix(sft_dir, rm_dir, tmp_path):
    with pytest.raises(LlmjaxError, match="not a reward model"):
        rs.make_scorer(sft_dir)
    with pytest.raises(LlmjaxError, match="neither 'tasks' nor a run"):
        rs.make_scorer(str(tmp_path / "missing"))
    with pytest.raises(LlmjaxError, match="not a synthetic task prompt"):
        rs.make_scorer("tasks", [{"prompt": "Ana has 3 apples."}])
    with pytest.raises(LlmjaxError, match="holds a reward model"):
        rs.policy_config(rm_dir)
    with pytest.raises(LlmjaxError, match="holds no run"):
        rs.policy_config(str(tmp_path / "missing"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LlmjaxError, match="holds no prompts"):
        rs.read_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "sort 21 = "}\n{"text": "x"}\n')
    with pytest.raises(LlmjaxError, match="bad.jsonl:2"):
        rs.read_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(LlmjaxError, match="reward model run"):
        rs.check_tasks(["sort: 321"], ["123"])


def test_cli(sft_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    asked = ["sort 321 = ", "sort 5124 = ", "add 1 + 2 = "]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in asked))
    out = tmp_path / "best.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "llmjax.rejection_sample", f"--policy={sft_dir}",
                             "--reward=tasks", f"--prompts={prompts}", "--n=3", "--max_new_tokens=16", f"--out={out}",
                             f"--pairs_out={tmp_path / 'pairs.jsonl'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == asked
    summary = json.loads((tmp_path / "best.summary.json").read_text())
    assert summary["prompts"] == 3 and summary["n"] == 3 and 0 <= summary["accuracy/sample"] <= 1
    assert json.loads(result.stdout) == summary
    for pair in (json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()):
        assert pair["prompt"] in asked and pair["chosen"] != pair["rejected"]


def test_sample_to_files_scores_with_the_records_fields(sft_dir, tmp_path):
    """`exact` against each record's "answer" is the sort checker, through the function the CLI and the rounds
    experiment call; its files are each written whole, the summary last."""
    records = rs.synthetic_records("sort", 12, seed=2)
    out = tmp_path / "best.jsonl"
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    summary = rs.sample_to_files(sft_dir, "exact", records, str(out), str(tmp_path / "pairs.jsonl"), n=4, seed=1,
                                 max_new_tokens=16, mesh=mesh, progress=False)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["score/best_of_n"] == pytest.approx(summary["accuracy/best_of_n"])
    assert summary["score/best_of_n"] > summary["score/sample"] > 0
    assert summary == json.loads((tmp_path / "best.summary.json").read_text()) and summary["reward"] == "exact"
    assert len(kept) == summary["kept"] >= 9 and not list(tmp_path.glob("*.tmp"))
    answers = {r["prompt"]: r["answer"] for r in records}
    assert all(r["score"] == float(r["response"].strip() == answers[r["prompt"]]) for r in kept)
