"""Completions from a run's latest checkpoint:

  python -m llmjax.generate --workdir=runs/demo --prompt="reverse abc = "
  python -m llmjax.generate --workdir=runs/sft --prompts_file=prompts.txt --temperature=0.8 --top_p=0.9

Prompts go through the chat template when the run trained on chat data (or with --format=chat).
"""

from collections.abc import Sequence

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


def complete(workdir: str, prompts: Sequence[str], *, fmt: str | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """The completions of a run's latest checkpoint (a PPO run's policy), each prompt in the run's data.format
    unless `fmt` says otherwise."""
    cfg = checkpoint.run_config(workdir)
    if cfg.trainer == "reward":
        raise ConfigError(f"{workdir!r} holds a reward model, which scores text but does not write it; score "
                          "with python -m llmjax.score")
    mesh = make_mesh(dict(data=1, fsdp=-1, tensor=1))
    params = checkpoint.load_params(workdir, mesh)
    if cfg.trainer == "ppo":
        params = params["policy"]
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    tokens, lengths = sampling.left_pad([prompt_ids(tokenizer, p, fmt or cfg.data.format) for p in prompts])
    generate = sampling.sampler(cfg.model, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                                vocab_size=tokenizer.vocab_size, constrain=make_constrain(mesh, cfg.rules))
    out = jax.device_get(generate(params, tokens, lengths, jax.random.key(seed)))
    return [tokenizer.decode(toks[:n]) for toks, n in zip(out["tokens"], out["lengths"], strict=True)]


def main(argv: list[str]) -> None:
    del argv
    prompts = list(_PROMPT.value)
    if _FILE.value:
        with open(_FILE.value) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ConfigError("no prompts; pass --prompt=... (repeatable) or --prompts_file=FILE")
    texts = complete(_WORKDIR.value, prompts, fmt=_FORMAT.value, max_new_tokens=_MAX.value,
                     temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
    for prompt, text in zip(prompts, texts, strict=True):
        print(f"{prompt}\u2192 {text!r}")


if __name__ == "__main__":
    run_main(main)
