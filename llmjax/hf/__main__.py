"""Hugging Face checkpoints in and out:

  python -m llmjax.hf import --hf_dir=~/hf/Llama-3.2-1B --workdir=runs/llama1b [--dtype=float32]
  python -m llmjax.hf export --workdir=runs/sft --out=~/hf/my-model [--dtype=bfloat16] [--shard_gb=5]

Families: Llama (2, 3, 3.x), Mistral, Qwen2/2.5, Qwen3, GPT-2, and the mixtures of experts Mixtral, Qwen2-MoE and
Qwen3-MoE (one stored tensor per expert, as the Hub's files hold them and transformers 4 and 5 load and save them).
An imported run is a starting point like any other (`--config=configs/sft.py:model=runs/llama1b`); a folder can
also be named directly (`model=hf:DIR`), which reads its safetensors at the start of the run.
"""

from absl import flags

from llmjax.cli import init_distributed, run_main
from llmjax.errors import LlmjaxError
from llmjax.hf.convert import export_run, import_run

COMMANDS = ("import", "export")


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    init_distributed()  # on a pod, every host runs the same command
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise LlmjaxError(f"expected one command, import or export, got {argv[1:]}; see python -m llmjax.hf --help")
    if argv[1] == "import":
        if not f.hf_dir:
            raise LlmjaxError("import needs --hf_dir=DIR (a Hugging Face model folder) and --workdir=RUN")
        print(import_run(f.hf_dir, f.workdir, f.dtype))
    else:
        if not f.out:
            raise LlmjaxError("export needs --workdir=RUN and --out=DIR (a new folder)")
        print(export_run(f.workdir, f.out, f.dtype, f.shard_gb))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "import: the new run; export: the run to export.", required=True)
    flags.DEFINE_string("hf_dir", None, "import: a Hugging Face model folder (config.json, safetensors, tokenizer).")
    flags.DEFINE_string("out", None, "export: the new Hugging Face folder.")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                      "Parameter dtype (default: the checkpoint's; import keeps float16 as float32).")
    flags.DEFINE_float("shard_gb", 5.0, "export: the largest safetensors file, in GiB.")
    run_main(main)
