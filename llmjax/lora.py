"""LoRA runs out of llmjax (the adapters themselves: llmjax.models.lora):

  python -m llmjax.lora merge --workdir=runs/sft-lora --out=runs/sft-merged   # a plain run, the adapters folded in
  python -m llmjax.lora export --workdir=runs/sft-lora --out=~/hf/my-adapter  # a Hugging Face PEFT adapter folder

A merged run is like an imported one: parameters only, starting point of any trainer, exportable with
`python -m llmjax.hf export`. A PEFT folder loads with `peft.PeftModel.from_pretrained(base, DIR)` on top of the
base model exported to Hugging Face.
"""

import ml_collections
from absl import flags

from llmjax import checkpoint
from llmjax.cli import init_distributed, run_main
from llmjax.config import ConfigError
from llmjax.models import lora
from llmjax.sharding import make_mesh

MESH = dict(data=1, fsdp=-1, tensor=1)


def lora_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of a LoRA run, or one line saying the run is none."""
    cfg = checkpoint.run_config(workdir)
    if "lora" not in cfg or not lora.targets(cfg):
        raise ConfigError(f"{workdir!r} is not a LoRA run (its lora.targets is empty): its parameters are already a "
                          "whole model; export it with python -m llmjax.hf export")
    return cfg


def merge(workdir: str, out: str) -> str:
    """Writes the LoRA run in `workdir` with its adapters folded into the base as a parameters-only run `out`;
    returns a summary."""
    cfg = lora_config(workdir)
    checkpoint.check_new(out, "--out")
    (part, _), = checkpoint.run_parts(workdir).items()
    merged = cfg.copy_and_resolve_references()
    merged.trainer, merged.init_from, merged.lora.targets = "merge", workdir, ""
    checkpoint.write_run(out, merged, {part: []}, lambda: checkpoint.load_params(workdir, make_mesh(MESH), part))
    return f"merged the {lora.targets(cfg)} adapters of {workdir} (rank {cfg.lora.rank}) into {out}"


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    init_distributed()
    commands = {"merge": merge}
    if len(argv) != 2 or argv[1] not in commands:
        raise ConfigError(f"expected one command, {' or '.join(commands)}, got {argv[1:]}; see python -m llmjax.lora "
                          "--help")
    print(commands[argv[1]](f.workdir, f.out))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A LoRA run.", required=True)
    flags.DEFINE_string("out", None, "merge: the new run; export: the new PEFT adapter folder.", required=True)
    run_main(main)
