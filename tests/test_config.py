"""Config mistakes are caught before anything compiles, each as one line naming the key and the fix; a good
config runs end to end through the CLI."""

import glob
import json
import os
import subprocess
import sys

import pytest
from helpers import metric_rows, tiny_config

from configs import pretrain as pretrain_config
from llmjax import config
from llmjax.train import registry

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


def test_parse_arg_converts_types():
    args = config.parse_arg(" steps=5, ,lr=0.5,on=yes,off=false", model="small", steps=300, lr=1.0, on=False,
                            off=True)
    assert args.to_dict() == dict(model="small", steps=5, lr=0.5, on=True, off=False)
    assert type(args.steps) is int and type(args.lr) is float


@pytest.mark.parametrize("arg, message", [
    ("modle=tiny", "config argument 'modle' is unknown; valid keys: model, steps"),
    ("model", "config argument 'model' is not k=v"),
    ("steps=many", "config argument steps='many' is not a int"),
    ("flag=ture", "config argument flag='ture' is not a bool"),
])
def test_parse_arg_rejects(arg, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse_arg(arg, model="small", steps=300, flag=False)


def test_config_file_rejects_unknown_preset():
    with pytest.raises(config.ConfigError, match="model='nope' is not a preset; choose one of tiny"):
        pretrain_config.get_config("model=nope")


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.fsdp": 3}, r"has 3 devices but 8 are present; .* --config.mesh.fsdp=-1"),
    ({"mesh.fsdp": 3, "mesh.data": -1}, r"8 devices are not divisible by 3"),
    ({"mesh.fsdp": -1, "mesh.data": -1}, r"at most one -1"),
    ({"batch_size": 12}, r"batch_size=12 is not divisible by data\*fsdp\*grad_accum=1\*8\*1; use a multiple of 8"),
    ({"optim.grad_accum": 3}, r"batch_size=8 .*=1\*8\*3; use a multiple of 24"),
    ({"model.n_kv_heads": 3}, r"model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    ({"mesh.tensor": 4}, r"model.n_kv_heads=2 is not divisible by mesh.tensor=4"),
    ({"seq_len": 512}, r"seq_len=512 is longer than model.max_seq_len=256; lower --config.seq_len"),
    ({"optim.warmup_steps": 30}, r"steps=20, optim.warmup_steps=30"),
    ({"optim.warmup_steps": -1}, r"need 0 <= warmup_steps <= steps"),
    ({"optim.grad_accum": 0}, r"optim.grad_accum=0 must be at least 1"),
    ({"log_every": 0}, r"log_every=0 must be at least 1"),
    ({"model.norm": "rmsnorm"}, r"model.norm='rmsnorm' is not one of \('rms', 'layer'\); set --config.model.norm"),
    ({"rules.embed": "fsdb"}, r"rules.embed='fsdb' names mesh axes \['fsdb'\]"),
    ({"data.tasks": "sort,srot"}, r"data.tasks='sort,srot' names unknown tasks \['srot'\]; choose from reverse,"),
])
def test_validate_rejects(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        registry.validate(tiny_config(**overrides), 8)


@pytest.mark.parametrize("overrides, n_devices, sizes", [
    ({}, 8, dict(data=1, fsdp=8, tensor=1)),
    ({"mesh.tensor": 2}, 8, dict(data=1, fsdp=4, tensor=2)),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, 8, dict(data=2, fsdp=2, tensor=2)),
    ({}, 1, dict(data=1, fsdp=1, tensor=1)),
])
def test_validate_accepts_and_resolves_mesh(overrides, n_devices, sizes):
    assert registry.validate(tiny_config(**overrides), n_devices) == sizes


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
