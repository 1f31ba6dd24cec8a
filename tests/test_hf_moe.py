"""Hugging Face import and export of mixtures of experts against transformers' own outputs: tiny random Mixtral,
Qwen2-MoE (dense and expert layers mixed, a gated shared expert, gates not renormalised) and Qwen3-MoE, made by
tests/fixtures/hf/make_fixtures.py with one tensor per expert as the Hub stores them. Where transformers is
importable, the exported folders are also loaded by it live. The dense families' tests are in test_hf.py."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from test_hf import compare_live, export_loads_live, fixture, logits, reference, stored

from llmjax import config, runs, sampling
from llmjax.errors import LlmjaxError
from llmjax.hf import convert, families, weights
from llmjax.sharding import make_mesh

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
SHARDED = dict(data=1, expert=2, fsdp=2, tensor=2)
ONE = dict(data=1, fsdp=-1, tensor=1)


@pytest.mark.parametrize("name", MOE)
def test_logits_and_greedy_generation_equal_transformers(name):
    """Read straight from the folder, experts sharded over expert=2 (and fsdp=2 x tensor=2 within them):
    transformers' float32 logits within 1e-4, and its 20 greedy tokens exactly."""
    source = f"hf:{fixture(name)}"
    cfg = runs.run_config(source)
    assert families.family(cfg.model) == name
    ref = reference(name)
    params = runs.load_params(source, make_mesh(SHARDED))
    assert params["layers"]["moe_gate"].sharding.spec[1] == "expert"
    np.testing.assert_allclose(logits(params, cfg.model, ref["input_ids"]), ref["logits"], atol=1e-4, rtol=0)
    prompt = ref["prompt_ids"].astype(np.int32)
    out = sampling.generate(params, prompt, np.array([prompt.shape[1]], np.int32), jax.random.key(0), cfg.model,
                            max_new_tokens=20, eos_id=-1)
    np.testing.assert_array_equal(np.asarray(out["tokens"][0]), ref["greedy_ids"])


def test_a_device_reads_only_its_experts_of_the_right_layers(monkeypatch):
    """Qwen2-MoE's layers 0 and 2 are dense, 1 and 3 have experts: a device holding half the experts reads only
    their tensors, of the layers with experts; the dense MLPs come from the other layers."""
    calls: list[tuple[str, list[str]]] = []  # (our tensor's key, the stored tensors one device's read opened)
    read, open_one = weights._read, weights.Reader.read

    def shard(reader, t, shape, dtype, index):
        calls.append((t.key, []))
        return read(reader, t, shape, dtype, index)

    monkeypatch.setattr(weights, "_read", shard)
    monkeypatch.setattr(weights.Reader, "read", lambda self, key, index: calls[-1][1].append(key) or open_one(
        self, key, index))
    runs.load_params(f"hf:{fixture('qwen2_moe')}", make_mesh(SHARDED))
    expert_reads = [keys for key, keys in calls if ".experts.{j}." in key]
    assert expert_reads and all(len(keys) == 4 for keys in expert_reads)  # 2 layers x 2 of the 4 experts
    assert {k.split(".experts.")[1][0] for keys in expert_reads for k in keys} == set("0123")
    assert all({k.split(".")[2] for k in keys} == {"1", "3"} for keys in expert_reads)
    dense = [keys for key, keys in calls if key.endswith("mlp.gate_proj.weight")]
    assert dense and all([k.split(".")[2] for k in keys] == ["0", "2"] for keys in dense)


@pytest.mark.parametrize("name", MOE)
def test_import_export_round_trip(name, tmp_path):
    """import -> the run's parameters equal the folder's; export -> the same tensor names (one per expert), shapes and
    dtypes as the original, and a config.json that imports as the same model; re-import -> identical parameters."""
    run, out, again = (str(tmp_path / d) for d in ("run", "out", "again"))
    convert.import_run(fixture(name), run)
    mesh = make_mesh(ONE)
    params = runs.load_params(run, mesh)
    jax.tree.map(np.testing.assert_array_equal, params, runs.load_params(f"hf:{fixture(name)}", mesh))
    convert.export_run(run, out)
    assert stored(out) == stored(fixture(name))
    convert.import_run(out, again)
    models = [dict(runs.run_config(r).model, name="") for r in (run, again)]
    assert models[0] == models[1]
    jax.tree.map(np.testing.assert_array_equal, runs.load_params(again, mesh), params)


def edited(name: str, change: dict, tmp_path) -> str:
    folder = str(tmp_path / name)
    shutil.copytree(fixture(name), folder)
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf | change, f)
    return folder


@pytest.mark.parametrize("name, change, message", [
    ("qwen2_moe", {"mlp_only_layers": [3]}, "mlp_only_layers=[3] (experts in layers [1])"),
    ("qwen2_moe", {"decoder_sparse_step": 3}, "decoder_sparse_step=3 (experts in layers [2])"),
    ("qwen2_moe", {"num_experts": 0}, "num_experts=0"),
    ("qwen2_moe", {"layer_types": ["full_attention", "chunked_attention"] * 2}, "layers other than full and sliding"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "holds tensors the model has no place for"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias=True"),
    ("qwen3_moe", {"moe_intermediate_size": 32}, "has shape (16, 32), its config.json implies (32, 32)"),
    ("mixtral", {"num_local_experts": 8}, "lacks model.layers.0.block_sparse_moe.experts.4.w1.weight"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_an_unsupported_or_inconsistent_folder_is_refused_in_one_line(name, change, message, tmp_path):
    folder = edited(name, change, tmp_path)
    with pytest.raises(LlmjaxError, match="^[^\n]*$") as e:
        convert.import_run(folder, str(tmp_path / "run"))
    assert message in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_experts_fused_as_transformers_5_holds_them_are_refused_naming_the_fix(tmp_path):
    """save_pretrained(save_original_format=False) writes transformers 5's in-memory layout: gate and up of every
    expert in one (E, 2 Fe, D) tensor, down in one (E, D, Fe)."""
    from safetensors.numpy import save_file

    folder = tmp_path / "qwen3_moe"
    shutil.copytree(fixture("qwen3_moe"), folder)
    reader = weights.Reader(str(folder))
    tensors = {k: reader.read(k, ()) for k in reader.where if ".experts." not in k}
    expert = {x: [[reader.read(f"model.layers.{i}.mlp.experts.{j}.{x}_proj.weight", ()) for j in range(4)]
                  for i in range(2)] for x in ("gate", "up", "down")}
    for i in range(2):
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate(
            [np.stack(expert["gate"][i]), np.stack(expert["up"][i])], axis=1)
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack(expert["down"][i])
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(LlmjaxError, match="^[^\n]*save_original_format=False[^\n]*$"):
        convert.import_run(str(folder), str(tmp_path / "run"))


@pytest.mark.parametrize("name, change, same", [
    ("qwen2_moe", {"decoder_sparse_step": 1, "mlp_only_layers": [0, 2]}, {}),  # the same layers by the other key
    ("mixtral", {"router_jitter_noise": 0.1}, {}),  # training-time noise on the router's input: not applied
    ("mixtral", {"sliding_window": 32}, {"sliding_window": 32}),  # on every layer
    ("qwen3_moe", {"num_experts": 4, "num_local_experts": None}, {}),  # the Hub's name for transformers 5's
])
def test_what_the_model_expresses_imports_as_it(name, change, same, tmp_path):
    model = config.model_config(f"hf:{edited(name, change, tmp_path)}")
    assert dict(model) == dict(config.model_config(f"hf:{fixture(name)}"), **same)


def test_experts_without_a_hugging_face_architecture_are_refused_on_export():
    """Mixtral renormalises its gates and has experts in every layer; Qwen2-MoE's shared expert is gated; Qwen3-MoE
    has q/k norms and no biases: other switches name themselves in one line."""
    base = config.model_config("moe-tiny")
    assert families.family(base) == "mixtral"
    for change in ({"moe_renormalize": False}, {"moe_every": 2}, {"moe_shared_d_ff": 32},
                   {"qk_norm": True, "bias": "qkv"}):
        model = config.model_config("moe-tiny")
        model.update(change)
        assert families.family(model) == ""
        with pytest.raises(LlmjaxError, match="^[^\n]*moe_experts=4, moe_every=[^\n]*$"):
            families.hf_config(model, "float32", None, 0, 0)
    qwen3 = config.model_config("moe-tiny")
    qwen3.update(qk_norm=True, moe_renormalize=False, moe_every=2)
    assert families.family(qwen3) == "qwen3_moe"


@pytest.mark.parametrize("name", MOE)
def test_logits_and_greedy_generation_equal_transformers_live(name):
    """transformers itself, where it is installed, on the fixtures."""
    compare_live(name)


@pytest.mark.parametrize("name", MOE)
def test_exported_folders_load_in_transformers_live(name, tmp_path):
    export_loads_live(name, tmp_path)
