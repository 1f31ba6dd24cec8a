"""Two JAX processes of 4 CPU devices each (JAX's multi-process runtime, gloo collectives) train exactly
like one process of 8 devices: each process loads only its rows of the batch, the losses agree."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/pretrain.py:model=tiny,steps=3", "--config.batch_size=8", "--config.seq_len=32",
        "--config.log_every=1", "--config.peak_flops=1e12", "--config.eval_every=0"]


def launch(workdir, devices, **env):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **env}
    return subprocess.Popen([sys.executable, "-m", "llmjax.main", *ARGS, f"--workdir={workdir}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    multi = [launch(tmp_path / "multi", 4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo") for i in range(2)]
    single = launch(tmp_path / "single", 8)
    for p in [*multi, single]:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == sorted(single) == [1, 2, 3]
    np.testing.assert_allclose(list(multi.values()), list(single.values()), rtol=1e-5)
    assert os.listdir(tmp_path / "multi" / "checkpoints") == ["3"]
