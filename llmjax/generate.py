"""Completions from a run's latest checkpoint:

  python -m llmjax.generate --workdir=runs/demo --prompt="reverse abc = "
  python -m llmjax.generate --workdir=runs/sft --prompts_file=prompts.txt --temperature=0.8 --top_p=0.9

Prompts go through the chat template when the run trained on chat data (or with --format=chat). A prompt that
does not fit the model's context with --max_new_tokens after it is refused, as in llmjax.rejection_sample: the
model never saw positions past model.max_seq_len (a learned position table has none), so what it wrote there
would be noise.
"""

import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import flags

from llmjax import runs, sampling
from llmjax.cli import run_main
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.evaluate import prompt_ids
from llmjax.sharding import make_constrain, make_mesh


def language_model(workdir: str) -> ml_collections.ConfigDict:
    """The config of a run (or hf:DIR) that writes text; a reward model is refused."""
    cfg = runs.run_config(workdir)
    if "lm" not in runs.run_parts(workdir):
        raise LlmjaxError(f"{workdir!r} holds a reward model, which scores text but does not write it; score "
                          "with python -m llmjax.score")
    return cfg


def complete(workdir: str, prompts: Sequence[str], *, fmt: str | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """The completions of a run's latest checkpoint (a PPO run's policy), each prompt in the run's data.format
    unless `fmt` says otherwise."""
    if not prompts:
        raise LlmjaxError("no prompts; pass --prompt=... (repeatable) or --prompts_file=FILE")
    if max_new_tokens < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise LlmjaxError(f"max_new_tokens={max_new_tokens}, temperature={temperature}, top_k={top_k}, top_p={top_p}: "
                          "need max_new_tokens >= 1, temperature >= 0 (0: greedy), top_k >= 0 and 0 < top_p <= 1")
    cfg = language_model(workdir)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    ids = [prompt_ids(tokenizer, p, fmt or cfg.data.format) for p in prompts]
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[longest]) + max_new_tokens > cfg.model.max_seq_len:
        shown = prompts[longest] if len(prompts[longest]) <= 40 else prompts[longest][:40] + "..."
        raise LlmjaxError(f"prompt {longest + 1} ({shown!r}) takes {len(ids[longest])} tokens; with max_new_tokens="
                          f"{max_new_tokens} it exceeds the model's max_seq_len={cfg.model.max_seq_len}; shorten the "
                          "prompt or lower --max_new_tokens")
    mesh = make_mesh(dict(data=1, fsdp=-1, tensor=1))
    params = runs.load_params(workdir, mesh, reader="generate")
    tokens, lengths = sampling.left_pad(ids)
    generate = sampling.sampler(cfg.model, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                                vocab_size=tokenizer.vocab_size, constrain=make_constrain(mesh, cfg.rules))
    out = jax.device_get(generate(params, tokens, lengths, jax.random.key(seed)))
    return [tokenizer.decode(toks[:n]) for toks, n in zip(out["tokens"], out["lengths"], strict=True)]


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    prompts = list(f.prompt)
    if f.prompts_file:
        if not os.path.isfile(f.prompts_file):
            raise LlmjaxError(f"--prompts_file={f.prompts_file!r} does not exist; pass a text file with one prompt "
                              "per line")
        with open(f.prompts_file) as file:
            prompts += [line.rstrip("\n") for line in file if line.strip()]
    if not prompts:
        raise LlmjaxError("no prompts; pass --prompt=... (repeatable) or --prompts_file=FILE")
    texts = complete(f.workdir, prompts, fmt=f.format, max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                     top_k=f.top_k, top_p=f.top_p, seed=f.seed)
    for prompt, text in zip(prompts, texts, strict=True):
        print(f"{prompt}\u2192 {text!r}")


if __name__ == "__main__":  # flags only for the command line: notebooks and tests import complete()
    flags.DEFINE_string("workdir", None, "A run's workdir.", required=True)
    flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
    flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
    flags.DEFINE_enum("format", None, ["text", "chat"], "Prompt format (default: the run's data.format).")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Sample among the smallest set of tokens with this probability.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    run_main(main)
