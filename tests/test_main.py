"""The training entry point `python -m llmjax.main`: the README's default run learns; a run that diverges exits
with status 1 and keeps its good checkpoints; a live run's workdir is refused to a second one; a `kill -9` during
a save and a full disk lose nothing."""

import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import losses, metric_rows, tiny_config

from llmjax import checkpoint, runs, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """The README's default command, cut to 15 steps, on the one CPU device a user has."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    subprocess.run([sys.executable, "-m", "llmjax.main", "--config=configs/pretrain.py:steps=15",
                    "--config.eval_prompts=16", f"--workdir={tmp_path}"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)
    loss = losses(str(tmp_path))
    assert loss[15] < 0.55 * loss[1], loss  # measured 5.76 -> 2.90 (25 steps: 2.46)
    evals = [row for row in metric_rows(tmp_path) if "eval/perplexity" in row]
    assert [row["step"] for row in evals] == [15] and 0 <= evals[0]["eval/accuracy"] <= 1


# The runs below see one CPU device and share this worker's compilation cache (tests/conftest.py): a run that
# repeats an earlier one's config loads its executables instead of compiling them again.
ENV = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
       "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def main_args(workdir, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llmjax.main", f"--config=configs/pretrain.py:model=tiny,steps={steps}",
            "--config.batch_size=8", "--config.seq_len=32", "--config.eval_every=0", "--config.peak_flops=1e12",
            "--config.log_every=1", f"--workdir={workdir}", *extra]


def one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith(("train:", "I1", "W1"))]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr and all(f in lines[0] for f in fragments), lines


@pytest.mark.slow
def test_a_live_runs_workdir_is_refused_until_it_dies(tmp_path):
    """Run A trains; run B on its workdir (another learning rate) is refused in one line and A's files stay
    A's; after `kill -9` of A nothing is left stuck and B resumes."""
    first = subprocess.Popen(main_args(tmp_path, 100_000, "--config.checkpoint.every=5"), cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "checkpoints" / "5").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        config_before = (tmp_path / "config.json").read_text()
        second = subprocess.run(main_args(tmp_path, 10, "--config.optim.lr=1e-4"), cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=600)
        one_line_error(second, "is in use by a live run (pid", f"{first.pid}", "pass another --workdir")
        assert (tmp_path / "config.json").read_text() == config_before
    finally:
        first.kill()  # SIGKILL: the process cannot release anything itself
        first.wait()
    again = subprocess.run(main_args(tmp_path, 10, "--config.optim.lr=1e-4"), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"lr": 0.0001' in (tmp_path / "config.json").read_text()


STEPS = 24  # of the runs that a kill or a full disk interrupts, and of the run they must end equal to


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of STEPS steps, saving every 2: what an interrupted run must end equal to."""
    workdir = tmp_path_factory.mktemp("straight")
    subprocess.run(main_args(workdir, STEPS, "--config.checkpoint.every=2"), cwd=REPO, env=ENV, check=True,
                   capture_output=True, timeout=600)
    return workdir


@pytest.mark.slow
@pytest.mark.xdist_group("main_straight")
def test_diverging_cli_run_exits_nonzero_and_keeps_checkpoints(straight, tmp_path):
    """The issue's scenario: a finished run (`straight`) resumed at lr 1e6 goes non-finite; it stops with exit
    status 1 and one line, and the good checkpoint is still there and loadable."""
    workdir = shutil.copytree(straight, tmp_path / "run")
    out = subprocess.run(main_args(workdir, 40, "--config.checkpoint.every=4", "--config.optim.lr=1e6",
                                   "--config.optim.warmup_steps=0"), cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "training stopped:" in out.stderr and "optim.max_nonfinite=5" in out.stderr
    mngr = checkpoint.manager(str(workdir), tiny_config())
    assert mngr.latest_step() in range(STEPS, 40, 4)  # the finished run's last, or a finite step's after it
    mngr.close()
    params = runs.load_params(str(workdir), sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1)))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))


@pytest.mark.slow
@pytest.mark.xdist_group("main_straight")  # one worker runs `straight` for all its users
def test_sigkill_while_a_checkpoint_is_written_resumes_bitwise(straight, tmp_path):
    killed = tmp_path / "killed"
    run = subprocess.Popen(main_args(killed, STEPS, "--config.checkpoint.every=2"), cwd=REPO, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts, deadline = killed / "checkpoints", time.time() + 300
    def saving() -> bool:  # a save in flight after a complete one
        return ckpts.exists() and any(p.endswith(".orbax-checkpoint-tmp") and int(p.split(".")[0]) >= 4
                                      for p in os.listdir(ckpts))

    while not saving():
        assert time.time() < deadline and run.poll() is None, "the run ended before a save was caught"
        time.sleep(0.001)
    run.kill()
    run.wait()
    assert any(p.endswith(".orbax-checkpoint-tmp") for p in os.listdir(ckpts))  # killed mid-write
    subprocess.run(main_args(killed, STEPS, "--config.checkpoint.every=2"), cwd=REPO, env=ENV, check=True,
                   capture_output=True, timeout=600)
    assert losses(str(killed)) == losses(str(straight))
    assert [r["step"] for r in metric_rows(killed) if "loss" in r] == list(range(1, STEPS + 1))  # one row per step


def mount_tmpfs(path, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.xdist_group("main_straight")
def test_a_full_disk_stops_in_one_line_and_the_run_resumes(tmp_path, request):
    """On a real 4 MB filesystem: the run stops before the save that cannot fit, naming the intact checkpoint;
    with space freed, rerunning resumes and ends exactly where a run with room would."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "4m"):
        pytest.skip("mounting a tmpfs needs privileges this machine does not give; test_checkpoint covers the logic")
    try:
        args = main_args(disk / "run", STEPS, "--config.checkpoint.every=2", "--config.checkpoint.keep=5")
        out = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        one_line_error(out, "disk full at step", "is intact: free space and rerun to resume")
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        subprocess.run(args, cwd=REPO, env=ENV, check=True, capture_output=True, timeout=600)
        room = request.getfixturevalue("straight")  # a run with room (after the mount: a skip trains nothing)
        assert losses(str(disk / "run"))[STEPS] == losses(str(room))[STEPS]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_a_read_only_workdir_is_one_line(tmp_path):
    disk = tmp_path / "ro"
    if not mount_tmpfs(disk, "1m,ro"):
        pytest.skip("mounting a tmpfs needs privileges this machine does not give; test_checkpoint covers the logic")
    try:
        out = subprocess.run(main_args(disk / "run", 2), cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=600)
        one_line_error(out, f"workdir '{disk / 'run'}' is not writable (Read-only file system)")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
