"""Launches a run: python -m llmjax.main --config=configs/pretrain.py[:k=v,...] [--config.key=value ...]
--workdir=DIR. The same command runs on every host of a pod (one process per host)."""

import sys

from absl import flags
from ml_collections import config_flags

from llmjax.cli import init_distributed, run_main
from llmjax.rewards import RewardError
from llmjax.train import loop, registry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:model=small.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved config go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    cfg = _CONFIG.value
    init_distributed(cfg.distributed)
    try:
        registry.train(cfg, _WORKDIR.value)
    except (loop.Diverged, RewardError) as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
