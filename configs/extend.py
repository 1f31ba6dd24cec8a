"""The context-extension stage, as Llama 3 ends its pretraining: continue another run's parameters (init_from) at a
longer seq_len, with RoPE scaled so that the new length maps onto the positions the run was trained on (`rope`:
linear position interpolation, yarn, llama3 or dynamic NTK; default: none, the baseline), model.max_seq_len raised
to it, a fresh optimizer and a short schedule. RoPE has no parameters, so the model's shapes do not change; a model
whose do (a learned position table) is refused. Each step reads as many tokens as the base's did, in fewer, longer
rows, in the base's data.format: by default of the long-range task at the new length (passkey_<seq_len - 2>, which
fills a row as text or chat; `tasks` to choose others, or --config.data.source for your own long documents).

A base already scaled keeps its type and its original length, and the factors multiply: 256 → 1024 → 4096 by
linear interpolation is factor 4, then 16.

Run (as experiments/extension does: `small` pretrained at 256 tokens on one-digit keys, then extended to 2048):
  python -m llmjax.main --config=configs/pretrain.py:steps=400 --config.data.format=chat \\
      --config.data.tasks=passkey_30_1,passkey_62_1,passkey_126_1,passkey_254_1 --config.model.max_seq_len=256 \\
      --workdir=runs/short
  python -m llmjax.main --config=configs/extend.py:base=runs/short,seq_len=2048,tasks=passkey_2046_1 \\
      --workdir=runs/long  # linear x8
  python -m llmjax.main --config=configs/extend.py:base=runs/short,seq_len=2048,rope=yarn,tasks=passkey_2046_1 \\
      --workdir=runs/yarn
"""

import ml_collections

from llmjax import config
from llmjax.errors import LlmjaxError
from llmjax.models import presets


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    args = config.parse_arg(arg, base="", seq_len=1024, rope="linear", factor=0.0, steps=100, lr=1e-3, tasks="")
    if not args.base or args.base in presets.PRESETS:
        raise LlmjaxError(f"config argument base={args.base!r}: name the run (or hf:DIR) whose parameters are "
                          "extended, e.g. configs/extend.py:base=runs/short")
    if args.rope not in presets.ROPE_TYPES:
        raise LlmjaxError(f"config argument rope={args.rope!r} is not one of {presets.ROPE_TYPES}")
    cfg = config.base(args.base)  # its model and tokenizer, and init_from=base
    base = config.saved(args.base) if not args.base.startswith("hf:") else None
    trained = base.seq_len if base else cfg.model.max_seq_len
    if args.seq_len <= trained:
        raise LlmjaxError(f"config argument seq_len={args.seq_len} is not longer than the {trained} tokens "
                          f"{args.base!r} was trained at; there is nothing to extend")
    m = cfg.model
    scaled = m.rope_type != "default"
    if scaled and args.rope != m.rope_type:
        raise LlmjaxError(f"config argument rope={args.rope!r}: {args.base!r} is already scaled by {m.rope_type!r}, "
                          f"whose factors compose only with its own; extend it with rope={m.rope_type}")
    factor = args.factor or (m.rope_scaling * args.seq_len / trained if args.rope != "default" else 1.0)
    m.update(max_seq_len=args.seq_len, rope_type=args.rope, rope_scaling=factor,
             rope_original_max_len=m.rope_original_max_len if scaled else trained)
    cfg.seq_len = args.seq_len
    cfg.batch_size = max(1, (base.batch_size if base else cfg.batch_size) * trained // args.seq_len)
    cfg.data.format = base.data.format if base else cfg.data.format
    cfg.data.tasks = args.tasks or f"passkey_{args.seq_len - 2}"
    cfg.steps = args.steps
    cfg.optim.lr = args.lr  # below pretraining's: the run adapts what it knows rather than learning anew
    cfg.optim.warmup_steps = max(1, args.steps // 10)
    cfg.eval_every = max(1, args.steps // 4)
    return cfg
