"""PEFT adapter export against peft's own files: adapters peft wrote for two tiny models of tests/fixtures/hf, with
what the adapted models compute, made by tests/fixtures/peft/make_fixture.py, so the suite needs no torch. Where peft
is importable (the `hf` extra), an exported adapter is also loaded by it live."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from helpers import one_device
from safetensors.numpy import load_file

from llmjax import config
from llmjax import lora as lora_runs
from llmjax import runs as run_lib
from llmjax.errors import LlmjaxError
from llmjax.hf import convert, families
from llmjax.models import lora, transformer
from llmjax.sharding import make_mesh
from llmjax.train import registry

HERE = os.path.dirname(__file__)
PEFT, HF = os.path.join(HERE, "fixtures", "peft"), os.path.join(HERE, "fixtures", "hf")
MESH = dict(data=1, fsdp=-1, tensor=1)


def adapter_config(folder: str) -> dict:
    with open(os.path.join(folder, "adapter_config.json")) as f:
        return json.load(f)


def read_peft(folder: str, model) -> dict[str, dict[str, np.ndarray]]:
    """A PEFT adapter folder in our layout (the export's inverse, written independently): lora_A (r, in) -> A
    (L, *in, r), lora_B (out, r) -> B (L, r, *out), the inputs and outputs shaped as the adapted weight's."""
    tensors, layers = load_file(os.path.join(folder, "adapter_model.safetensors")), transformer.specs(model)["layers"]
    out = {}
    for path, t in families.tensors(model).items():
        name = path.removeprefix("layers.")
        module = "base_model.model." + t.key.removesuffix(".weight")
        if f"{module.format(i=0)}.lora_A.weight" not in tensors:
            continue
        w, k = layers[name].shape[1:], lora.INPUT_DIMS.get(name, 1)
        a = [tensors[f"{module.format(i=i)}.lora_A.weight"].T for i in range(model.n_layers)]
        b = [tensors[f"{module.format(i=i)}.lora_B.weight"].T for i in range(model.n_layers)]
        r = a[0].shape[-1]
        out[name] = {"lora_a": np.stack(a).reshape(model.n_layers, *w[:k], r),
                     "lora_b": np.stack(b).reshape(model.n_layers, r, *w[k:])}
    return out


def adapted(base: transformer.Params, found: dict, folder: str) -> transformer.Params:
    """`base` with the adapters attached, scaled by the folder's lora_alpha / r."""
    c = adapter_config(folder)
    scale = ml_collections.ConfigDict({"lora": {"alpha": c["lora_alpha"], "rank": c["r"]}})
    return lora.restore({"embed": None, "layers": {k: found.get(k) for k in base["layers"]}}, base, scale)


def logits(params, model, ids_BT: np.ndarray) -> np.ndarray:
    B, T = ids_BT.shape
    out = transformer.forward(params, ids_BT, np.broadcast_to(np.arange(T), (B, T)), np.ones((B, T), np.int32), model)
    return np.asarray(out.logits_BTV)


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_peft_adapter_in_our_layout_computes_peft_logits(name):
    """peft's adapter (every A and B random) on the base read from its Hugging Face folder: the adapted model's
    logits, unmerged and merged, within 1e-4 of peft's; so the names, transposes and scale are peft's."""
    folder, source = os.path.join(PEFT, name), f"hf:{os.path.join(HF, name)}"
    model = run_lib.run_config(source).model
    ref = dict(np.load(os.path.join(folder, "reference.npz")))
    found = read_peft(folder, model)
    assert sorted(found) == ["w_down", "w_gate", "w_up", "wk", "wo", "wq", "wv"]
    params = adapted(run_lib.load_params(source, make_mesh(MESH)), found, folder)
    np.testing.assert_allclose(logits(params, model, ref["input_ids"]), ref["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits(lora.merge(params), model, ref["input_ids"]), ref["logits"], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """The qwen2 fixture imported ("base"), and a LoRA run trained 2 steps from it at the fixture's rank and alpha
    ("lora"), with a learning rate that moves B well off zero. Its users run in one worker (xdist_group
    "peft_runs"), which makes it once."""
    root = tmp_path_factory.mktemp("peft")
    out = {"base": str(root / "base"), "lora": str(root / "lora")}
    convert.import_run(os.path.join(HF, "qwen2"), out["base"])
    cfg = config.load(f"configs/sft.py:model={out['base']},steps=2", **{
        "lora.targets": "all", "lora.rank": 4, "lora.alpha": 8.0, "optim.lr": 1e-2, "batch_size": 8, "seq_len": 64,
        "eval_every": 0, "peak_flops": 1e12, "optim.warmup_steps": 1})
    registry.train(cfg, out["lora"], one_device())
    return out


@pytest.mark.xdist_group("peft_runs")  # one worker makes `runs` for all its users
def test_export_writes_what_peft_writes_and_round_trips(runs, tmp_path):
    """The export of a qwen2 LoRA run: the tensors (names, shapes, dtypes) and adapter_config.json values of peft's
    own qwen2 adapter, base_model_name_or_path the folder the base was imported from; read back, the run's adapters
    exactly."""
    out = str(tmp_path / "adapter")
    assert "as a PEFT adapter for qwen2" in lora_runs.export_peft(runs["lora"], out)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs, ours = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (os.path.join(PEFT, "qwen2"), out))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    written, peft_wrote = adapter_config(out), adapter_config(os.path.join(PEFT, "qwen2"))
    assert written.pop("base_model_name_or_path") == os.path.join(os.path.abspath(HF), "qwen2")
    assert written == {k: peft_wrote[k] for k in written}
    assert {"r", "lora_alpha", "target_modules", "peft_type", "task_type"} <= set(written)

    model = run_lib.run_config(runs["lora"]).model
    found = lora_runs.adapters(runs["lora"], make_mesh(MESH))
    jax.tree.map(np.testing.assert_array_equal, read_peft(out, model), found)
    assert all(np.abs(np.asarray(pair["lora_b"])).max() > 1e-3 for pair in found.values())


@pytest.mark.xdist_group("peft_runs")  # one worker makes `runs` for all its users
def test_peft_loads_the_export_onto_the_exported_base_live(runs, tmp_path):
    """peft.PeftModel on the base exported by llmjax.hf export computes the LoRA run's (merged) logits within 1e-4,
    away from the base's; AutoPeftModelForCausalLM finds the base by the adapter's base_model_name_or_path."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    base_hf, adapter = str(tmp_path / "base_hf"), str(tmp_path / "adapter")
    convert.export_run(runs["base"], base_hf)
    lora_runs.export_peft(runs["lora"], adapter)
    ids = dict(np.load(os.path.join(PEFT, "qwen2", "reference.npz")))["input_ids"]
    base = transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    with torch.no_grad():
        plain = base(torch.tensor(ids)).logits.numpy()
        theirs = peft.PeftModel.from_pretrained(base, adapter).eval()(torch.tensor(ids)).logits.numpy()
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
        found = auto(torch.tensor(ids)).logits.numpy()
    mesh = make_mesh(MESH)
    ours = logits(run_lib.load_params(runs["lora"], mesh), run_lib.run_config(runs["lora"]).model, ids)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(found, ours, atol=1e-4, rtol=0)
    assert np.abs(plain - ours).max() > 1e-2


@pytest.mark.xdist_group("peft_runs")  # one worker makes `runs` for all its users
def test_not_a_lora_run_is_refused(runs, tmp_path):
    with pytest.raises(LlmjaxError, match="is not a LoRA run"):
        lora_runs.export_peft(runs["base"], str(tmp_path / "out"))


def test_a_gpt2_lora_run_is_refused(tmp_path):
    cfg = config.load(f"configs/sft.py:model=hf:{os.path.join(HF, 'gpt2')}", **{"lora.targets": "all"})
    run = str(tmp_path / "gpt2-lora")
    run_lib.claim_workdir(run, cfg, {"lm": []}, "pretrain")
    with pytest.raises(LlmjaxError, match=r"\(gpt2\); PEFT adapters are exported for llama, .* only: merge the run"):
        lora_runs.export_peft(run, str(tmp_path / "out"))


@pytest.mark.xdist_group("peft_runs")  # one worker makes `runs` for all its users
def test_a_non_empty_out_is_refused(runs, tmp_path):
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(LlmjaxError, match="--out .* is not empty"):
        lora_runs.export_peft(runs["lora"], str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
