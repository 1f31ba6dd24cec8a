"""Launches a run: python -m llmjax.main --config=configs/pretrain.py[:k=v,...] [--config.key=value ...]
--workdir=DIR. The same command runs on every host of a pod (one process per host)."""

import importlib
import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from llmjax.config import ConfigError, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:model=small.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved config go.")
flags.mark_flags_as_required(["config", "workdir"])

TRAINERS = {"pretrain": "llmjax.train.pretrain"}


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    if cfg.distributed or "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()  # reads the coordinator, process count and id from the environment
    if cfg.trainer not in TRAINERS:
        raise ConfigError(f"trainer={cfg.trainer!r} is unknown; choose one of {', '.join(TRAINERS)}")
    validate(cfg, jax.device_count())
    logging.getLogger("llmjax").setLevel(logging.INFO)
    importlib.import_module(TRAINERS[cfg.trainer]).train(cfg, _WORKDIR.value)


def run() -> None:
    try:
        app.run(main)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
