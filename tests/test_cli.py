"""The entry points' shared CLI: a config mistake exits non-zero with one line naming the key and the fix, before
anything compiles; a good config runs end to end."""

import glob
import json
import os
import subprocess
import sys

import pytest
from helpers import metric_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8 fake devices and the tests' compilation cache (see conftest.py) in every subprocess.
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
           JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
PRETRAIN = "--config=configs/pretrain.py"

# name -> (CLI arguments, fragments stderr must contain: the key and the fix)
CLI_CASES = {
    "unknown_preset": ([f"{PRETRAIN}:model=nope"], ["model='nope'", "tiny, small"]),
    "misspelt_config_arg": ([f"{PRETRAIN}:modle=tiny"], ["'modle'", "valid keys: model, steps"]),
    "misspelt_override": ([PRETRAIN, "--config.optim.lrr=1"], ["no config key named 'lrr'; did you mean 'lr'?"]),
    "mesh_product": ([PRETRAIN, "--config.mesh.fsdp=3", "--config.mesh.data=1", "--config.mesh.tensor=1"],
                     ["has 3 devices but 8 are present", "--config.mesh.fsdp=-1"]),
    "batch_not_divisible": ([PRETRAIN, "--config.batch_size=12"], ["batch_size=12", "multiple of 8"]),
    "heads_not_divisible_by_kv_heads": ([f"{PRETRAIN}:model=tiny", "--config.model.n_kv_heads=3"],
                                        ["model.n_heads=4", "model.n_kv_heads=3"]),
    "kv_heads_not_divisible_by_tensor": ([f"{PRETRAIN}:model=tiny", "--config.mesh.tensor=4"],
                                         ["model.n_kv_heads=2", "mesh.tensor=4"]),
    "seq_len_too_long": ([PRETRAIN, "--config.seq_len=4096"], ["seq_len=4096", "--config.model.max_seq_len"]),
}


def cli(args: list[str], workdir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmjax.main", *args, f"--workdir={workdir}"], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """All bad-config runs at once: name -> (exit code, stderr, whether the workdir was created)."""
    root = tmp_path_factory.mktemp("bad")
    procs = {name: cli(args, root / name) for name, (args, _) in CLI_CASES.items()}
    out = {}
    for name, p in procs.items():
        _, stderr = p.communicate(timeout=60)
        out[name] = (p.returncode, stderr, (root / name).exists())
    return out


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_rejects_bad_config(bad_runs, case):
    code, stderr, started = bad_runs[case]
    assert code != 0
    assert "Traceback" not in stderr, stderr
    for fragment in CLI_CASES[case][1]:
        assert fragment in stderr, stderr
    assert not started  # failed before claiming the workdir, so before anything compiled


@pytest.mark.slow
def test_cli_good_run(tmp_path):
    args = [f"{PRETRAIN}:model=tiny,steps=3", "--config.batch_size=8", "--config.seq_len=32",
            "--config.optim.warmup_steps=1", "--config.checkpoint.every=2", "--config.peak_flops=1e12",
            "--config.eval_every=0"]
    p = cli(args, tmp_path)
    _, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["model"]["name"] == "tiny" and saved["steps"] == 3 and saved["optim"]["warmup_steps"] == 1
    rows = metric_rows(tmp_path)
    assert rows[-1]["step"] == 3 and all(row["loss"] > 0 for row in rows)
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert {"2", "3"} <= set(os.listdir(tmp_path / "checkpoints"))
