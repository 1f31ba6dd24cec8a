"""LoRA runs out of llmjax (the adapters themselves: llmjax.models.lora):

  python -m llmjax.lora merge --workdir=runs/sft-lora --out=runs/sft-merged   # a plain run, the adapters folded in
  python -m llmjax.lora export --workdir=runs/sft-lora --out=~/hf/my-adapter  # a Hugging Face PEFT adapter folder

A merged run is like an imported one: parameters only, starting point of any objective, exportable with
`python -m llmjax.hf export`. A PEFT folder loads with `peft.PeftModel.from_pretrained(base, DIR)` on top of the
base model exported to Hugging Face.
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh
from safetensors.numpy import save_file

from llmjax import runs
from llmjax.cli import init_distributed, run_main
from llmjax.errors import LlmjaxError
from llmjax.hf import families, weights
from llmjax.models import lora
from llmjax.sharding import make_mesh

MESH = dict(data=1, fsdp=-1, tensor=1)
PEFT_PREFIX = "base_model.model."  # what PeftModel adds to the wrapped model's module paths in the keys it saves


def lora_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of a LoRA run, or one line saying the run is none."""
    cfg = runs.run_config(workdir)
    if "lora" not in cfg or not lora.targets(cfg):
        raise LlmjaxError(f"{workdir!r} is not a LoRA run (its lora.targets is empty): its parameters are already a "
                          "whole model; export it with python -m llmjax.hf export")
    return cfg


def merge(workdir: str, out: str) -> str:
    """Writes the LoRA run in `workdir` with its adapters folded into the base as a parameters-only run `out`;
    returns a summary."""
    cfg = lora_config(workdir)
    runs.check_new(out, "--out")
    (part, _), = runs.run_parts(workdir).items()
    merged = cfg.copy_and_resolve_references()
    merged.init_from, merged.lora.targets = workdir, ""
    runs.write_run(out, merged, {part: []}, "merge", lambda: runs.load_params(workdir, make_mesh(MESH), part))
    return f"merged the {lora.targets(cfg)} adapters of {workdir} (rank {cfg.lora.rank}) into {out}"


def adapters(workdir: str, mesh: Mesh) -> dict[str, dict[str, jax.Array]]:
    """The adapters of a LoRA run's language model by projection ({"wq": {"lora_a": A, "lora_b": B}, ...}), as
    its latest checkpoint holds them (runs.load_params would fold them into the base)."""
    runs.check_part(workdir, "lm", reader="the PEFT export")
    layers = runs.saved_params(workdir, mesh)[0]["layers"]
    return {k: {"lora_a": w["lora_a"], "lora_b": w["lora_b"]} for k, w in layers.items() if lora.is_adapted(w)}


def peft_tensors(found: dict[str, dict[str, jax.Array]], model) -> dict[str, np.ndarray]:
    """PEFT's tensors for `found` (see adapters), a pair per layer: torch's Linear stores its weight (out, in) and
    computes x W^T, so x A B (A: in x r, B: r x out, inputs and outputs flattened as the weight's are) is stored as
    lora_A (r, in) = A^T and lora_B (out, r) = B^T. Every process gathers; the arrays are in the run's dtype."""
    where = families.tensors(model)
    out = {}
    for name, pair in found.items():
        a, b = weights.host(pair["lora_a"]), weights.host(pair["lora_b"])
        L, r = a.shape[0], a.shape[-1]
        a_LRI, b_LOR = a.reshape(L, -1, r).transpose(0, 2, 1), b.reshape(L, r, -1).transpose(0, 2, 1)
        module = PEFT_PREFIX + where[f"layers.{name}"].key.removesuffix(".weight")
        for i in range(L):
            out[f"{module.format(i=i)}.lora_A.weight"] = np.ascontiguousarray(a_LRI[i])
            out[f"{module.format(i=i)}.lora_B.weight"] = np.ascontiguousarray(b_LOR[i])
    return out


def _base_name(cfg) -> str:
    """The adapted model where Hugging Face can load it, for AutoPeftModelForCausalLM: the folder the base was read
    (hf:DIR) or imported from; else the base run itself (its export with python -m llmjax.hf export)."""
    base = cfg.init_from
    if base.startswith("hf:"):
        return os.path.abspath(os.path.expanduser(base[3:]))
    imported = os.path.isfile(os.path.join(base, "parts.json")) and runs.made(base) == "import"
    return runs.run_config(base).init_from if imported else os.path.abspath(base)


def peft_config(cfg, found: dict) -> dict:
    """adapter_config.json as peft writes it, less the keys of features these adapters do not use (their defaults
    load the same, and a peft older than the one that added a key would refuse it)."""
    where = families.tensors(cfg.model)
    alpha = cfg.lora.alpha
    return {"alpha_pattern": {}, "base_model_name_or_path": _base_name(cfg), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True if cfg.lora.init == "kaiming" else "gaussian",
            "layers_pattern": None, "layers_to_transform": None,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": cfg.lora.dropout,
            "modules_to_save": None, "peft_type": "LORA", "r": cfg.lora.rank, "rank_pattern": {}, "revision": None,
            "target_modules": sorted(where[f"layers.{t}"].key.split(".")[-2] for t in found),
            "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}


def export_peft(workdir: str, out: str) -> str:
    """Writes the adapters of the LoRA run in `workdir` as a Hugging Face PEFT folder `out` (adapter_config.json,
    adapter_model.safetensors), which peft.PeftModel.from_pretrained loads onto the base exported by
    python -m llmjax.hf export; returns a summary. The folder is written beside `out`, then renamed."""
    cfg = lora_config(workdir)
    kind = families.family(cfg.model)
    if kind not in families.LLAMA_LIKE:
        raise LlmjaxError(f"{workdir!r} adapts a {cfg.model.name!r} model ({kind or 'no Hugging Face family'}); PEFT "
                          f"adapters are exported for {', '.join(families.LLAMA_LIKE)} only: merge the run (python "
                          "-m llmjax.lora merge) and export that with python -m llmjax.hf export")
    out = os.path.abspath(os.path.expanduser(out))
    runs.check_new(out, "--out")
    found = adapters(workdir, make_mesh(MESH))
    tensors = peft_tensors(found, cfg.model)
    with runs.staged(out) as tmp:
        if tmp is not None:
            save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump(peft_config(cfg, found), f, indent=2)
    return (f"exported the {', '.join(found)} adapters of {workdir} (rank {cfg.lora.rank}, alpha {cfg.lora.alpha}) "
            f"as a PEFT adapter for {kind} to {out}")


def main(argv: list[str]) -> None:
    f = flags.FLAGS
    init_distributed()
    commands = {"merge": merge, "export": export_peft}
    if len(argv) != 2 or argv[1] not in commands:
        raise LlmjaxError(f"expected one command, {' or '.join(commands)}, got {argv[1:]}; see python -m llmjax.lora "
                          "--help")
    print(commands[argv[1]](f.workdir, f.out))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A LoRA run.", required=True)
    flags.DEFINE_string("out", None, "merge: the new run; export: the new PEFT adapter folder.", required=True)
    run_main(main)
