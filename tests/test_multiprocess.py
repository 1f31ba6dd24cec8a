"""Two JAX processes of 4 CPU devices each (JAX's multi-process runtime, gloo collectives) train exactly
like one process of 8 devices: each process loads only its rows of the batch, the losses agree; and import and
export Hugging Face checkpoints to the same files."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import losses
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/pretrain.py:model=tiny,steps=3", "--config.batch_size=8", "--config.seq_len=32",
        "--config.log_every=1", "--config.peak_flops=1e12", "--config.eval_every=0"]


def launch(devices, *args, **env):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **env}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def two_and_one(*args: str, multi_args=(), single_args=()) -> None:
    """`python -m *args` as two processes of 4 devices and as one of 8, to completion."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    multi = [launch(4, *args, *multi_args, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo") for i in range(2)]
    single = launch(8, *args, *single_args)
    for p in [*multi, single]:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    two_and_one("llmjax.main", *ARGS, multi_args=[f"--workdir={tmp_path / 'multi'}"],
                single_args=[f"--workdir={tmp_path / 'single'}"])
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == sorted(single) == [1, 2, 3]
    np.testing.assert_allclose(list(multi.values()), list(single.values()), rtol=1e-5)
    assert os.listdir(tmp_path / "multi" / "checkpoints") == ["3"]


@pytest.mark.slow
def test_hugging_face_import_and_export_on_two_processes_equal_one(tmp_path):
    """Each process reads only its devices' shards and writes its part of the run; the export gathers tensor by
    tensor and one process writes: the same files as one process."""
    folder = os.path.join(REPO, "tests", "fixtures", "hf", "qwen2")
    for way in ("multi", "single"):
        os.makedirs(tmp_path / way)
    two_and_one("llmjax.hf", "import", f"--hf_dir={folder}", multi_args=[f"--workdir={tmp_path / 'multi' / 'run'}"],
                single_args=[f"--workdir={tmp_path / 'single' / 'run'}"])
    two_and_one("llmjax.hf", "export", multi_args=[f"--workdir={tmp_path / 'multi' / 'run'}",
                                                   f"--out={tmp_path / 'multi' / 'out'}"],
                single_args=[f"--workdir={tmp_path / 'single' / 'run'}", f"--out={tmp_path / 'single' / 'out'}"])
    for name in os.listdir(tmp_path / "single" / "out"):
        assert (tmp_path / "multi" / "out" / name).read_bytes() == (tmp_path / "single" / "out" / name).read_bytes()
    original, exported = (load_file(os.path.join(d, "model.safetensors")) for d in (folder, tmp_path / "multi" / "out"))
    assert original.keys() == exported.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value)
