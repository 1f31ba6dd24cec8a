"""Completions from a run's latest checkpoint:

  python -m llmjax.generate --workdir=runs/demo --prompt="reverse abc = "
  python -m llmjax.generate --workdir=runs/sft --prompts_file=prompts.txt --temperature=0.8 --top_p=0.9

Prompts go through the chat template when the run trained on chat data (or with --format=chat).
"""

import jax
from absl import flags

from llmjax import checkpoint, sampling
from llmjax.config import ConfigError, run_main
from llmjax.data.tokenizer import get_tokenizer
from llmjax.evaluate import prompt_ids
from llmjax.sharding import make_constrain, make_mesh

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
_FORMAT = flags.DEFINE_enum("format", None, ["text", "chat"], "Prompt format (default: the run's data.format).")
_MAX = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the smallest set of tokens with this probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv: list[str]) -> None:
    del argv
    prompts = list(_PROMPT.value)
    if _FILE.value:
        with open(_FILE.value) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ConfigError("no prompts; pass --prompt=... (repeatable) or --prompts_file=FILE")
    cfg = checkpoint.run_config(_WORKDIR.value)
    mesh = make_mesh(dict(data=1, fsdp=-1, tensor=1))
    params = checkpoint.load_params(_WORKDIR.value, mesh)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    fmt = _FORMAT.value or cfg.data.format
    tokens, lengths = sampling.left_pad([prompt_ids(tokenizer, p, fmt) for p in prompts])
    generate = sampling.sampler(cfg.model, max_new_tokens=_MAX.value, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                top_p=_TOP_P.value, vocab_size=tokenizer.vocab_size,
                                constrain=make_constrain(mesh, cfg.rules))
    out = jax.device_get(generate(params, tokens, lengths, jax.random.key(_SEED.value)))
    for prompt, toks, n in zip(prompts, out["tokens"], out["lengths"], strict=True):
        print(f"{prompt}\u2192 {tokenizer.decode(toks[:n])!r}")


if __name__ == "__main__":
    run_main(main)
