"""Pretraining on a real corpus that every machine has: the Python standard library's own source, found with
sysconfig (about 1,800 .py files, 32 MB; each file is one document, a .txt file's blocks are documents too).
Installed packages (site-packages, inside the standard library on some installs) are not read. The first run
writes the files as a tfds dataset under data.data_dir, holding `validation` of them out for the perplexity
evaluated every eval_every steps; later runs reuse it.

Bytes are the tokenizer: they need no training, every file encodes, and the perplexity per token is per byte, so
its log2 is bits per byte, the measure that compares across tokenizers.

Run (the whole standard library, or one package of it for a quick look):
  python -m llmjax.main --config=configs/stdlib.py --workdir=runs/stdlib
  python -m llmjax.main --config=configs/stdlib.py:subdir=email,validation=0.2,model=tiny,steps=50 \\
      --workdir=runs/stdlib_email
"""

import sysconfig
from pathlib import Path

import ml_collections

from llmjax import config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = config.parse_arg(arg, model="small", steps=300, subdir="", validation=0.02)
    root = Path(sysconfig.get_paths()["stdlib"])
    path = root / args.subdir
    if not path.is_dir():
        raise config.LlmjaxError(f"config argument subdir={args.subdir!r}: {path} is not a folder; name a package "
                                 "of the standard library, e.g. subdir=json, or none for all of it")
    cfg = config.base(args.model)
    cfg.steps = args.steps
    cfg.optim.warmup_steps = max(1, args.steps // 10)
    cfg.data.source = f"files:{path}"
    cfg.data.validation = args.validation  # of the files (by content hash); a small package needs a larger share
    cfg.data.tokenizer = "byte"
    cfg.eval_every = 50  # a files source is evaluated by perplexity alone, which costs a few forward passes
    return cfg
