"""Two JAX processes of 4 CPU devices each (JAX's multi-process runtime, gloo collectives) train exactly
like one process of 8 devices: each process loads only its rows of the batch, the losses agree; and import and
export Hugging Face checkpoints to the same files. The one process of 8 devices is also test_cli.py's good run:
the CLI with overrides runs end to end and writes what a run writes."""

import glob
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import losses, metric_rows
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/pretrain.py:model=tiny,steps=3", "--config.batch_size=8", "--config.seq_len=32",
        "--config.log_every=1", "--config.peak_flops=1e12", "--config.eval_every=0", "--config.optim.warmup_steps=1",
        "--config.checkpoint.every=2"]


def launch(log: str, devices: int, *args, **env) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **env}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def two_and_one(tmp_path, *args: str, multi_args=(), single_args=(), single: bool = True) -> None:
    """`python -m *args` as two processes of 4 devices and (unless not `single`) as one of 8, to completion. A
    process that fails stops the others at once (its peer would wait for it forever), and the failure shows each
    failed process's output (a killed one ended with -9)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    logs = [str(tmp_path / f"{args[0]}.{i}.log") for i in range(3)]
    procs = [launch(logs[i], 4, *args, *multi_args, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                    JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
             for i in range(2)]
    procs += [launch(logs[2], 8, *args, *single_args)] if single else []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(codes):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
    codes = [p.wait() for p in procs]
    failed = [f"{os.path.basename(log)} ended with {code}:\n{pathlib.Path(log).read_text()[-2000:]}"
              for code, log in zip(codes, logs, strict=False) if code != 0]
    assert not failed, f"python -m {' '.join(args)}\n" + "\n".join(failed)


def two(tmp_path, command: list[str]) -> None:
    """`python -m llmjax.hf *command` as two processes of 4 devices."""
    two_and_one(tmp_path, "llmjax.hf", *command, single=False)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    two_and_one(tmp_path, "llmjax.main", *ARGS, multi_args=[f"--workdir={tmp_path / 'multi'}"],
                single_args=[f"--workdir={tmp_path / 'single'}"])
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == sorted(single) == [1, 2, 3]
    np.testing.assert_allclose(list(multi.values()), list(single.values()), rtol=1e-5)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["2", "3"]  # one copy, written once
    # The CLI's good run (test_cli.py): the overrides reach config.json, and every output of a run is written.
    with open(tmp_path / "single" / "config.json") as f:
        saved = json.load(f)
    assert saved["model"]["name"] == "tiny" and saved["steps"] == 3 and saved["optim"]["warmup_steps"] == 1
    rows = metric_rows(tmp_path / "single")
    assert rows[-1]["step"] == 3 and all(row["loss"] > 0 for row in rows)
    assert glob.glob(str(tmp_path / "single" / "tb" / "events.out.tfevents.*"))
    assert {"2", "3"} <= set(os.listdir(tmp_path / "single" / "checkpoints"))


@pytest.mark.slow
def test_hugging_face_import_and_export_on_two_processes_equal_one(tmp_path):
    """Each process reads only its devices' shards and writes its part of the run; the export gathers tensor by
    tensor and one process writes: the same tensors as the original, and the same files as one process's export."""
    from llmjax.hf import convert

    folder = os.path.join(REPO, "tests", "fixtures", "hf", "qwen2")
    run, out, single = (str(tmp_path / d) for d in ("run", "out", "single"))
    two(tmp_path, ["import", f"--hf_dir={folder}", f"--workdir={run}"])
    two(tmp_path, ["export", f"--workdir={run}", f"--out={out}"])
    convert.export_run(run, single)
    for name in os.listdir(single):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
    original, exported = (load_file(os.path.join(d, "model.safetensors")) for d in (folder, out))
    assert original.keys() == exported.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value)
