"""Launches a run: python -m llmjax.main --config=configs/pretrain.py[:k=v,...] [--config.key=value ...]
--workdir=DIR. The same command runs on every host of a pod (one process per host)."""

import os
import sys

import jax
from absl import flags
from ml_collections import config_flags

from llmjax.cli import run_main
from llmjax.train import loop, registry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:model=small.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved config go.")
flags.mark_flags_as_required(["config", "workdir"])

def init_distributed(cfg) -> None:
    """One process per host. Clusters JAX detects (TPU pods, SLURM, Open MPI, ...) need nothing more than
    --config.distributed=True; elsewhere set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID on every host."""
    env = os.environ
    if cfg.distributed or "JAX_COORDINATOR_ADDRESS" in env:
        n, i = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=n and int(n), process_id=i and int(i))


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    init_distributed(cfg)
    try:
        registry.train(cfg, _WORKDIR.value)
    except loop.Diverged as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
