"""Hugging Face model folders into llmjax runs, and runs back out.

An import writes a run like any other (config.json, parts.json, a parameters-only checkpoint) whose model config
comes from the folder's config.json and whose tokenizer is the folder's, copied into the run. An export writes
what `transformers.AutoModelForCausalLM.from_pretrained` loads: config.json, generation_config.json, safetensors
(sharded, with the index, past `shard_gb`), and the tokenizer files.
"""

import json
import os

import jax
import ml_collections
from tqdm import tqdm

from llmjax import config, runs
from llmjax.data import hf_tokenizer
from llmjax.data.tokenizer import get_tokenizer
from llmjax.errors import LlmjaxError
from llmjax.hf import families, weights
from llmjax.models import transformer
from llmjax.sharding import make_mesh

MESH = dict(data=1, fsdp=-1, tensor=1)


def import_run(hf_dir: str, workdir: str, dtype: str | None = None) -> str:
    """Writes a run holding the Hugging Face model in `hf_dir` (see the module docstring); returns a summary.
    Everything is checked before anything is written, and the run appears whole or not at all."""
    hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
    workdir = os.path.abspath(workdir)
    cfg = config.base()
    cfg.init_from = hf_dir
    cfg.model = ml_collections.ConfigDict(families.model_config(families.read_config(hf_dir), hf_dir, dtype))
    runs.check_new(workdir, "workdir")
    reader = weights.Reader(hf_dir)
    weights.check(reader, cfg.model)
    tokenizer = get_tokenizer(f"hf:{hf_dir}")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise LlmjaxError(f"{hf_dir!r}: the tokenizer has {tokenizer.vocab_size} tokens, the model "
                          f"{cfg.model.vocab_size}: they are not one model's")
    cfg.data.tokenizer = f"hf:{os.path.join(workdir, 'tokenizer')}"  # where the run will hold it
    cfg.data.format = "text" if tokenizer.chat_template == hf_tokenizer.CHAT_TEMPLATE else "chat"

    def tokenizer_files(staging: str) -> None:
        os.makedirs(os.path.join(staging, "tokenizer"))
        hf_tokenizer.write_files(f"hf:{hf_dir}", os.path.join(staging, "tokenizer"))

    runs.write_run(workdir, cfg, {"lm": []}, "import",
                   lambda: weights.load(reader, cfg.model, cfg.rules, make_mesh(MESH)), tokenizer_files)
    return (f"imported {cfg.model.name} ({transformer.param_count(cfg.model):,} parameters, "
            f"{cfg.model.param_dtype}) into {workdir}")


def export_run(workdir: str, out: str, dtype: str | None = None, shard_gb: float = 5.0) -> str:
    """Writes the language model of the run in `workdir` (a PPO run's policy) as a Hugging Face folder `out`;
    returns a summary. The folder appears whole or not at all: it is written beside `out`, then renamed."""
    cfg, _ = runs.check_part(workdir, "lm", reader="the Hugging Face export")
    dtype = dtype or cfg.model.param_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise LlmjaxError(f"--dtype={dtype!r}: choose float32, bfloat16 or float16")
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    hf = families.hf_config(cfg.model, dtype, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    out = os.path.abspath(os.path.expanduser(out))
    runs.check_new(out, "--out")
    params = runs.load_params(workdir, make_mesh(MESH), reader="the Hugging Face export")
    tensors = list(weights.exported(params, cfg.model, jax.numpy.dtype(dtype)))
    with runs.staged(out) as tmp, tqdm(total=len(tensors), desc="export", unit="tensor",
                                             disable=tmp is None) as bar:
        files = weights.write(tmp, tensors, jax.numpy.dtype(dtype), int(shard_gb * 2**30), lambda _: bar.update())
        if tmp is not None:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf, f, indent=2)
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, f, indent=2)
            hf_tokenizer.write_files(cfg.data.tokenizer, tmp)
    return f"exported {cfg.model.name} as {hf['architectures'][0]} ({len(files)} safetensors file(s), {dtype}) to {out}"
