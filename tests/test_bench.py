"""The benchmarks: a short run on the tiny model compiles its step once and reports a plausible speed; the
long-context modes (llmjax/bench_attention.py) at miniature lengths."""

import json
import os
import subprocess
import sys

import pytest

from llmjax import bench_attention, config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_train_writes_its_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "bench.json"
    args = ["--config=configs/pretrain.py:model=tiny,steps=4", "--config.batch_size=8", "--config.seq_len=32",
            "--steps=3", f"--out={out}"]
    run = subprocess.run([sys.executable, "-m", "llmjax.bench", "train", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "train" and result["model"] == "tiny"
    assert result["compiles"] == 1  # no recompiles after the first step
    assert result["tokens_per_s"] > 0
    assert 0 < result["mfu_vs_jax_matmul"] < 1.5, result


@pytest.mark.slow
def test_bench_ppo_splits_an_iteration_and_never_recompiles(tmp_path):
    """Prompts of sort and lookup differ in length from iteration to iteration; the sampler and the update compile
    once all the same (prompts are padded to ppo.max_prompt_len)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "bench.json"
    args = ["--config=configs/ppo.py:model=tiny,algorithm=grpo", "--config.ppo.reward=tasks", "--config.batch_size=8",
            "--config.ppo.group_size=2", "--config.ppo.max_new_tokens=8", "--steps=3", f"--out={out}"]
    run = subprocess.run([sys.executable, "-m", "llmjax.bench", "ppo", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["longest_prompts_seen"]) > 1, result
    assert result["sampler_compiles"] == 1 and result["update_compiles"] == 1, result
    assert result["generate_tokens_per_s"] > 0 and result["update_tokens_per_s"] > 0
    shares = [result[f"{name}_share"] for name in ("generate", "score_reference_advantages", "update")]
    assert sum(shares) == pytest.approx(1.0)


def test_bench_attention_blockwise_holds_less_than_the_reference():
    """Attention alone at T=256 and 512 (tiny's 4 heads over 2 kv heads, blocks of 128): both implementations
    compiled and timed, and at 512 blockwise's XLA temporaries are below the materialised reference's (the train
    step's, compiled on eight devices here, is left to the CLI test)."""
    cfg = config.base("tiny")
    cfg.model.attn_block = 128
    result = bench_attention.bench_attention(cfg, seq_lens=(256, 512), repeats=1, train_step=False)
    assert {"heads", "kv_heads", "head_dim", "block", "runs", "ratios", "train_step"} <= set(result)
    assert [(r["seq_len"], r["implementation"]) for r in result["runs"]] == [
        (256, "xla"), (256, "blockwise"), (512, "xla"), (512, "blockwise")]
    for run in result["runs"]:
        assert run["skipped"] is None and run["call_s_median"] > 0 and len(run["call_s"]) == 1
        assert {"temp_bytes", "argument_bytes", "output_bytes", "peak_bytes", "compile_s"} <= set(run)
    longest = result["ratios"][-1]
    assert longest["seq_len"] == 512 and longest["temp_blockwise_over_xla"] < 1 and longest["time_blockwise_over_xla"]


def test_bench_attention_train_step_memory():
    """The whole train step's XLA temporaries at one length, one row a device: blockwise below xla attention."""
    cfg = config.base("tiny")
    cfg.model.update(attn_block=128, remat="dots")
    step, = bench_attention.train_step_memory(cfg, (512,))
    assert step["model"] == "tiny" and step["batch_size"] == 8 and step["remat"] == "dots"
    assert step["temp_blockwise_over_xla"] < 1


def test_bench_attention_reports_a_reference_too_big_to_run(monkeypatch):
    """A reference over half the host's available memory is compiled, its memory reported, and not run."""
    monkeypatch.setattr(bench_attention, "available_bytes", lambda: 8 * 2**20)
    cfg = config.base("tiny")
    cfg.model.attn_block = 128
    result = bench_attention.bench_attention(cfg, seq_lens=(512,), repeats=1, train_step=False)
    xla, blockwise = result["runs"]
    assert xla["skipped"].startswith("not run") and xla["call_s_median"] is None and xla["temp_bytes"] > 4 * 2**20
    assert blockwise["skipped"] is None and blockwise["call_s_median"] > 0
    assert result["ratios"][0]["time_blockwise_over_xla"] is None and result["train_step"] == []


def test_bench_context_one_row_a_device():
    """The train step's memory per device by context size (compiled only): with one row a device, context=2
    holds half the tokens and less XLA temporary memory; the formula's activations stand beside it."""
    cfg = config.base("tiny")
    result = bench_attention.bench_context(cfg, seq_lens=(512,), contexts=(1, 2), attentions=("blockwise",),
                                           strategies=("ring",))
    one, two = result["runs"]
    assert (one["context"], one["fsdp"], one["batch_size"], one["context_parallel"]) == (1, 8, 8, None)
    assert (two["context"], two["fsdp"], two["batch_size"], two["context_parallel"]) == (2, 4, 4, "ring")
    assert two["tokens_per_device"] == one["tokens_per_device"] // 2 == 256
    for run in result["runs"]:
        assert {"xla_temp_bytes", "xla_peak_bytes", "estimate_activation_bytes", "estimate_grads_bytes",
                "estimate_over_xla_temp", "estimate_activations", "temp_over_context_1"} <= set(run)
    assert two["xla_temp_bytes"] < one["xla_temp_bytes"] and two["temp_over_context_1"] < 1


@pytest.mark.slow
def test_bench_context_cli(tmp_path):
    """The context mode through the CLI, on 8 fake CPU devices whatever XLA_FLAGS held, and llmjax.estimate's own
    --config flag no clash with ours (the attention mode shares that CLI; its function is tested above)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "bench.json"
    args = ["--config=configs/pretrain.py:model=tiny", "--config.model.remat=dots", "--seq_lens=256", "--contexts=2"]
    run = subprocess.run([sys.executable, "-m", "llmjax.bench", "context", *args, f"--out={out}"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "context" and result["backend"] == "cpu"
    assert result["devices"] == 8 and result["remat"] == "dots"
    assert len(result["runs"]) == 4  # xla and blockwise attention, each by ring and allgather
    assert {r["tokens_per_device"] for r in result["runs"]} == {128}  # one row of 256 / 2 a device
