"""Hugging Face import and export against transformers' own outputs: tiny random models of every family, made by
tests/fixtures/hf/make_fixtures.py with their logits and greedy generations, so the suite needs no torch. Where
transformers is importable (the `hf` extra), the exported folders are also loaded by it live."""

import json
import os
import shutil

import helpers
import jax
import ml_collections
import numpy as np
import pytest

from llmjax import config, runs, sampling
from llmjax.errors import LlmjaxError
from llmjax.hf import convert, families, weights
from llmjax.models import transformer
from llmjax.sharding import make_mesh

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("llama3", "llama2", "mistral", "qwen2", "qwen3", "gpt2")
ALL = (*FAMILIES, "llama3_bf16", "qwen2_sharded")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def reference(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(os.path.join(fixture(name), "reference.npz")))


def logits(params, model, ids_BT: np.ndarray) -> np.ndarray:
    B, T = ids_BT.shape
    out = transformer.forward(params, ids_BT, np.broadcast_to(np.arange(T), (B, T)), np.ones((B, T), np.int32), model)
    return np.asarray(out.logits_BTV)


def reference_config(name: str) -> dict:
    return folder_config(fixture(name))


def folder_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def stored(folder: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of a folder's safetensors: name -> (shape, dtype)."""
    return weights.Reader(folder).header


@pytest.mark.parametrize("name", ALL)
def test_logits_and_greedy_generation_equal_transformers(name):
    """Read straight from the folder (init_from=hf:DIR), sharded fsdp=4 x tensor=2: transformers' float32 logits
    within 1e-4, and its 20 greedy tokens exactly."""
    source = f"hf:{fixture(name)}"
    cfg = runs.run_config(source)
    ref = reference(name)
    params = runs.load_params(source, make_mesh(dict(data=1, fsdp=4, tensor=2)))
    np.testing.assert_allclose(logits(params, cfg.model, ref["input_ids"]), ref["logits"], atol=1e-4, rtol=0)
    if name in FAMILIES:  # the bfloat16 and sharded folders hold llama3's and qwen2's architectures
        prompt = ref["prompt_ids"].astype(np.int32)
        out = sampling.generate(params, prompt, np.array([prompt.shape[1]], np.int32), jax.random.key(0), cfg.model,
                                max_new_tokens=20, eos_id=-1)
        np.testing.assert_array_equal(np.asarray(out["tokens"][0]), ref["greedy_ids"])


@pytest.mark.parametrize("name", ALL)
def test_logits_and_greedy_generation_equal_transformers_live(name):
    """The same comparison against transformers itself, where it is installed (the `hf` extra)."""
    compare_live(name)


def compare_live(name: str) -> None:
    """transformers' greedy tokens equal the fixture's, and its logits ours."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(fixture(name), dtype=torch.float32)
    ref = reference(name)
    with torch.no_grad():
        expected = theirs(torch.tensor(ref["input_ids"])).logits.numpy()
        prompt = torch.tensor(ref["prompt_ids"])
        greedy = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:].numpy()
    source = f"hf:{fixture(name)}"
    params = runs.load_params(source, make_mesh(dict(data=1, fsdp=-1, tensor=1)))
    model = runs.run_config(source).model
    np.testing.assert_allclose(logits(params, model, ref["input_ids"]), expected, atol=1e-4, rtol=0)
    ours = sampling.generate(params, ref["prompt_ids"].astype(np.int32), np.array([8], np.int32), jax.random.key(0),
                             model, max_new_tokens=20, eos_id=-1)
    np.testing.assert_array_equal(np.asarray(ours["tokens"][0]), greedy)


@pytest.mark.parametrize("name", ALL)
def test_import_export_round_trip(name, tmp_path):
    """import -> the run's parameters equal the folder's; export -> the same tensor names, shapes and dtypes as the
    original; re-import -> identical parameters."""
    run, out, again = (str(tmp_path / d) for d in ("run", "out", "again"))
    convert.import_run(fixture(name), run)
    mesh = make_mesh(dict(data=1, fsdp=-1, tensor=1))
    params = runs.load_params(run, mesh)
    direct = runs.load_params(f"hf:{fixture(name)}", mesh)
    jax.tree.map(np.testing.assert_array_equal, params, direct)
    convert.export_run(run, out)
    assert stored(out) == {k: v for k, v in stored(fixture(name)).items() if not k.endswith(weights.BUFFERS)}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    convert.import_run(out, again)
    jax.tree.map(np.testing.assert_array_equal, runs.load_params(again, mesh), params)


def test_export_shards_with_an_index(tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    convert.import_run(fixture("qwen2"), run)
    convert.export_run(run, out, dtype="bfloat16", shard_gb=20e3 / 2**30)
    with open(os.path.join(out, weights.INDEX)) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert {dtype for _, dtype in stored(out).values()} == {"BF16"}
    assert index["metadata"]["total_size"] == sum(2 * np.prod(s) for s, _ in stored(out).values())
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


@pytest.mark.slow  # it trains a run
def test_a_config_names_a_folder_or_an_imported_run_as_its_model_and_trains_from_it(tmp_path):
    """configs/sft.py:model=hf:DIR (or model=RUN, an imported run) takes its architecture, tokenizer and parameters:
    SFT on the synthetic tasks through the model's chat template trains, and generate and evaluate read the result."""
    from llmjax import evaluate, generate
    from llmjax.train import registry

    overrides = {"batch_size": 8, "seq_len": 64, "eval_every": 0, "peak_flops": 1e12, "optim.warmup_steps": 1}
    imported = str(tmp_path / "imported")
    convert.import_run(fixture("qwen2"), imported)
    starts = {}
    for model in (f"hf:{fixture('qwen2')}", imported):
        cfg = config.load(f"configs/sft.py:model={model},steps=3", **overrides)
        assert cfg.init_from == model and cfg.model.bias == "qkv" and cfg.model.vocab_size == 512
        assert cfg.data.tokenizer == (model if model.startswith("hf:") else f"hf:{model}/tokenizer")
        starts[model] = registry.task(cfg, "", helpers.one_device()).start().params
    jax.tree.map(np.testing.assert_array_equal, *starts.values())
    run = str(tmp_path / "sft")
    registry.train(cfg, run, helpers.one_device())  # from the imported run
    losses = [row["loss"] for row in helpers.metric_rows(run) if "loss" in row]
    assert losses[-1] < losses[0]
    texts = generate.complete(run, ["sort 321 = "], max_new_tokens=8)
    assert len(texts) == 1 and isinstance(texts[0], str)
    mesh = helpers.one_device()
    scores = evaluate.make_evaluator(cfg, mesh, n=2, batches=1)(runs.load_params(run, mesh))
    assert 0 <= scores["accuracy"] <= 1 and np.isfinite(scores["perplexity"])


@pytest.mark.parametrize("change, message", [
    ({"model_type": "falcon"}, "model_type='falcon'"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layers other than full and sliding-window attention"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding layers without a window"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "'longrope' is not implemented"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope scaling of type 'linear' lacks factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "truncate": False}}, "YaRN with truncate=False"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_hidden_layers": 3}, "lacks model.layers.2"),
    ({"intermediate_size": 96}, "has shape (64, 32), its config.json implies (96, 32)"),
])
def test_an_unsupported_or_inconsistent_folder_is_refused_in_one_line(change, message, tmp_path):
    folder = str(tmp_path / "qwen2")
    shutil.copytree(fixture("qwen2"), folder)
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf | change, f)
    with pytest.raises(LlmjaxError, match="^[^\n]*$") as e:
        convert.import_run(folder, str(tmp_path / "run"))
    assert message in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_gpt2_as_the_hub_stores_it_imports(tmp_path):
    """openai-community/gpt2's file names tensors without "transformer." and keeps the causal-mask buffers."""
    from safetensors.numpy import save_file

    folder = tmp_path / "gpt2"
    shutil.copytree(fixture("gpt2"), folder)
    reader = weights.Reader(str(folder))
    tensors = {k.removeprefix("transformer."): reader.read(k, ()) for k in reader.where}
    tensors |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 256, 256), np.float32)) for i in range(2)}
    save_file(tensors, str(folder / "model.safetensors"))
    params = runs.load_params(f"hf:{folder}", make_mesh(dict(data=1, fsdp=-1, tensor=1)))
    ref = reference("gpt2")
    np.testing.assert_allclose(logits(params, config.model_config(f"hf:{folder}"), ref["input_ids"]), ref["logits"],
                               atol=1e-4, rtol=0)


def test_import_and_export_never_write_over_what_they_did_not_make(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(LlmjaxError, match="not empty"):
        convert.import_run(fixture("gpt2"), str(taken))
    run = str(tmp_path / "run")
    convert.import_run(fixture("gpt2"), run)
    with pytest.raises(LlmjaxError, match="not empty"):
        convert.export_run(run, str(taken))
    assert os.listdir(taken) == ["notes.txt"]


def test_a_model_without_a_hugging_face_architecture_is_refused(tmp_path):
    from helpers import saved_run

    run = str(tmp_path / "run")
    saved_run(config.load("configs/pretrain.py:model=tiny", **{"model.pos": "learned"}), run)
    with pytest.raises(LlmjaxError, match="matches no Hugging Face architecture"):
        convert.export_run(run, str(tmp_path / "out"))


def test_an_llmjax_run_exports_and_transformers_loads_it(tmp_path):
    """A run trained here (the synthetic tokenizer, Llama layout) exports with its tokenizer converted; where
    transformers is installed it loads with no missing or unexpected keys and computes the same logits."""
    from helpers import saved_run, tiny_config

    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    saved_run(tiny_config(), run, scale=3.0)
    convert.export_run(run, out)
    convert.import_run(out, str(tmp_path / "again"))
    mesh = make_mesh(dict(data=1, fsdp=-1, tensor=1))
    jax.tree.map(np.testing.assert_array_equal, runs.load_params(run, mesh),
                 runs.load_params(str(tmp_path / "again"), mesh))
    live_transformers_check(out, runs.load_params(run, mesh), runs.run_config(run).model)


def live_transformers_check(folder: str, params, model) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = np.random.default_rng(0).integers(0, 300, (2, 12))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits(params, model, ids), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_folders_load_in_transformers_live(name, tmp_path):
    export_loads_live(name, tmp_path)


def export_loads_live(name: str, tmp_path) -> None:
    """A fixture imported and exported again loads in transformers with its keys and our logits."""
    pytest.importorskip("transformers")
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    convert.import_run(fixture(name), run)
    convert.export_run(run, out)
    live_transformers_check(out, runs.load_params(run, make_mesh(dict(data=1, fsdp=-1, tensor=1))),
                            runs.run_config(run).model)


# RoPE scalings beside llama3, made by tests/fixtures/hf/make_rope_fixtures.py (no tokenizer: they borrow llama3's)
ROPE = ("llama_linear", "llama_dynamic", "qwen2_yarn")


@pytest.mark.parametrize("name", ROPE)
def test_rope_scalings_equal_transformers(name):
    """transformers' float32 logits on 32 tokens, past the length the scaling starts from, and on their first 12
    alone (where dynamic NTK, reading the length it is given, is unscaled). The script checks that transformers'
    unscaled logits differ from both: the scaling matters on these inputs."""
    source = f"hf:{fixture(name)}"
    model, ref = runs.run_config(source).model, reference(name)
    params = runs.load_params(source, helpers.one_device())
    ids = ref["input_ids"]
    np.testing.assert_allclose(logits(params, model, ids), ref["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits(params, model, ids[:, :12]), ref["short_logits"], atol=1e-4, rtol=0)


def rope_round_trip(name: str, tmp_path) -> tuple[str, str, str]:
    """The fixture with llama3's tokenizer beside it, imported into a run, and that run exported."""
    folder, run, out = (str(tmp_path / d) for d in (name, "run", "out"))
    shutil.copytree(fixture(name), folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(fixture("llama3"), f), folder)
    convert.import_run(folder, run)
    convert.export_run(run, out)
    return folder, run, out


@pytest.mark.parametrize("name", ROPE)
def test_rope_scalings_import_and_export(name, tmp_path):
    """import -> export writes the type and its parameters as transformers reads them: the exported folder is
    the same llmjax model (RoPE keys and length), with the same tensors."""
    folder, run, out = rope_round_trip(name, tmp_path)
    rope = lambda m: {k: v for k, v in m.items() if k.startswith("rope_") or k == "max_seq_len"}  # noqa: E731
    imported, exported = runs.run_config(run).model, runs.run_config(f"hf:{out}").model
    assert rope(exported) == rope(imported) and imported.rope_type == name.split("_")[1]
    assert stored(out) == stored(folder)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["rope_scaling"]["rope_type"] == imported.rope_type


@pytest.mark.parametrize("rope, keys", [
    (None, dict(rope_type="default")),
    (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=64), dict(rope_type="llama3", rope_scaling=8.0, rope_original_max_len=64)),
    (dict(type="linear", factor=2.0), dict(rope_type="linear", rope_scaling=2.0, max_seq_len=256)),
    (dict(rope_type="dynamic", factor=4.0), dict(rope_type="dynamic", rope_original_max_len=256, max_seq_len=1024)),
    (dict(type="yarn", factor=4.0, original_max_position_embeddings=256),  # Qwen2.5's model card
     dict(rope_type="yarn", rope_original_max_len=256, max_seq_len=1024, rope_beta_fast=32.0, rope_attn_factor=0.0)),
    (dict(rope_type="yarn", factor=None, original_max_position_embeddings=64, beta_fast=16, beta_slow=2,
          mscale=1.0, mscale_all_dim=0.5),  # DeepSeek's: the factor from the lengths, mscale as a ratio
     dict(rope_scaling=4.0, rope_original_max_len=64, max_seq_len=256, rope_beta_fast=16.0, rope_beta_slow=2.0,
          rope_attn_factor=(0.1 * np.log(4.0) + 1) / (0.05 * np.log(4.0) + 1))),
])
@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_rope_scaling_configs_read_and_write_every_type(rope, keys, layout):
    """transformers 4's rope_theta + rope_scaling and 5's rope_parameters read alike; what export writes reads back
    as the same model."""
    hf = reference_config("qwen2")
    hf = hf | dict(rope_scaling=rope) if layout == "v4" else {
        k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")} | dict(
        rope_parameters=dict(rope or dict(rope_type="default"), rope_theta=hf["rope_theta"]))
    model = families.model_config(hf, "qwen2")
    assert model["rope_theta"] == 1_000_000.0 and {k: model[k] for k in keys} == pytest.approx(keys)
    written = families.hf_config(ml_collections.ConfigDict(model), "float32", None, 1, 2)
    assert families.model_config(written, "again") | dict(name="") == model | dict(name="")


@pytest.mark.parametrize("name", ROPE)
def test_rope_scalings_equal_transformers_live(name, tmp_path):
    """The same comparison against transformers itself, where it is installed, on the fixture and on its import
    exported again; each pass on a fresh load (transformers' dynamic NTK keeps the longest length it has seen)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    ids = reference(name)["input_ids"]
    source = f"hf:{fixture(name)}"
    params, model = runs.load_params(source, helpers.one_device()), runs.run_config(source).model
    for folder in (fixture(name), rope_round_trip(name, tmp_path)[2]):
        for part in (ids, ids[:, :12]):
            theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            with torch.no_grad():
                expected = theirs(torch.tensor(part)).logits.numpy()
            np.testing.assert_allclose(logits(params, model, part), expected, atol=1e-4, rtol=0)


# sliding-window attention, made by tests/fixtures/hf/make_window_fixtures.py (a window of 8 on 32-token inputs and
# 20 + 16 generated tokens; no tokenizer: they borrow llama3's): Mistral windows every layer, Qwen2 the odd ones
WINDOWS = {"mistral_window": "", "qwen2_window": "full,sliding"}


@pytest.mark.parametrize("name", WINDOWS)
def test_sliding_windows_equal_transformers_in_training_and_generation(name):
    """Imported with its window (max_seq_len stays max_position_embeddings): transformers' float32 logits on 32 tokens
    by the xla and the blockwise attention (blocks of 8, some skipped), and its 16 greedy tokens from a 20-token
    prompt by the KV-cache sampler (left-padded to 24 slots). The script checks the window changes those logits."""
    source = f"hf:{fixture(name)}"
    model, ref = config.model_config(source), reference(name)
    assert (model.sliding_window, model.layer_types, model.max_seq_len) == (8, WINDOWS[name], 64)
    params = runs.load_params(source, helpers.one_device())
    ids = ref["input_ids"]
    np.testing.assert_allclose(logits(params, model, ids), ref["logits"], atol=1e-4, rtol=0)
    blockwise = ml_collections.ConfigDict(model.to_dict() | dict(attention="blockwise", attn_block=8))
    np.testing.assert_allclose(logits(params, blockwise, ids), ref["logits"], atol=1e-4, rtol=0)
    prompts, lengths = sampling.left_pad([ref["prompt_ids"][0].tolist()])
    assert prompts.shape == (1, 24)
    out = sampling.sampler(model, max_new_tokens=16, eos_id=-1)(params, prompts, lengths, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out["tokens"][0]), ref["greedy_ids"])


@pytest.mark.parametrize("name", WINDOWS)
def test_sliding_windows_import_and_export(name, tmp_path):
    """import -> export writes the window as transformers reads it (Mistral's sliding_window; Qwen2's
    use_sliding_window, sliding_window and the per-layer list): the exported folder is the same llmjax model, with
    the same tensors."""
    folder, run, out = rope_round_trip(name, tmp_path)
    imported = runs.run_config(run).model
    assert config.model_config(f"hf:{out}").to_dict() | dict(name="") == imported.to_dict() | dict(name="")
    assert stored(out) == stored(folder)
    written, original = folder_config(out), folder_config(folder)
    keys = ("model_type", "sliding_window") + (("use_sliding_window", "layer_types") if name == "qwen2_window" else ())
    assert {k: written[k] for k in keys} == {k: original[k] for k in keys}


@pytest.mark.parametrize("hf, keys", [
    # transformers 4's layout: the layers from max_window_layers on
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2),
     dict(sliding_window=8, layer_types="full,full,sliding,sliding")),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0),
     dict(sliding_window=8, layer_types="")),
    # transformers' defaults: max_window_layers 28 (here no layer), Mistral's window 4096
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8), dict(sliding_window=0, layer_types="")),
    (dict(model_type="qwen2", use_sliding_window=False, sliding_window=8, max_window_layers=0),
     dict(sliding_window=0, layer_types="")),
    (dict(model_type="mistral"), dict(sliding_window=4096, layer_types="")),
    (dict(model_type="mistral", sliding_window=None), dict(sliding_window=0, layer_types="")),
    # transformers 5's Qwen2-MoE without layer_types: the even layers below max_window_layers
    (dict(model_type="qwen2_moe", use_sliding_window=True, sliding_window=8, max_window_layers=4, num_experts=4,
          moe_intermediate_size=16, num_experts_per_tok=2, shared_expert_intermediate_size=48),
     dict(sliding_window=8, layer_types="sliding,full")),
    (dict(model_type="qwen3_moe", use_sliding_window=True, sliding_window=8, num_experts=4, moe_intermediate_size=16,
          num_experts_per_tok=2), dict(sliding_window=8, layer_types="")),
    (dict(model_type="mixtral", sliding_window=8, num_local_experts=4, num_experts_per_tok=2),
     dict(sliding_window=8, layer_types="")),
])
def test_sliding_window_configs_read_as_transformers_reads_them_and_write_back(hf, keys):
    """Every family's window keys (the layers each windows checked against transformers 5.25's config classes); what
    export writes reads back as the same model."""
    base = {k: v for k, v in reference_config("qwen2").items() if "window" not in k}
    model = families.model_config(base | dict(num_hidden_layers=4) | hf, "windows")
    assert {k: model[k] for k in keys} == keys
    written = families.hf_config(ml_collections.ConfigDict(model), "float32", None, 1, 2)
    assert written["model_type"] == hf["model_type"]
    assert families.model_config(written, "again") | dict(name="") == model | dict(name="")


def test_a_llama_run_with_windows_exports_as_mistral_and_one_windowing_some_layers_is_refused(tmp_path):
    """Llama's switches with a window on every layer are Mistral's architecture (where transformers is installed, it
    loads the folder and computes our logits on 12 tokens, past the window of 8); with windows on some layers only
    they match no architecture llmjax writes for them, which is said in one line."""
    from helpers import saved_run, tiny_config

    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    saved_run(tiny_config(**{"model.sliding_window": 8}), run, scale=3.0)
    model = runs.run_config(run).model
    assert families.family(model) == "mistral" and not model.name.startswith("mistral")
    convert.export_run(run, out)
    hf = folder_config(out)
    assert (hf["model_type"], hf["architectures"], hf["sliding_window"]) == ("mistral", ["MistralForCausalLM"], 8)
    assert config.model_config(f"hf:{out}").to_dict() | dict(name="") == model.to_dict() | dict(name="")
    some = ml_collections.ConfigDict(model.to_dict() | dict(layer_types="sliding,full"))
    with pytest.raises(LlmjaxError, match="^[^\n]*windows some layers[^\n]*$"):
        families.hf_config(some, "float32", None, 1, 2)
    live_transformers_check(out, runs.load_params(run, make_mesh(dict(data=1, fsdp=-1, tensor=1))), model)


@pytest.mark.parametrize("name", WINDOWS)
def test_sliding_windows_equal_transformers_live(name, tmp_path):
    """The same comparisons against transformers itself, where it is installed, on the fixture and on its import
    exported again."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    ref = reference(name)
    for folder in (fixture(name), rope_round_trip(name, tmp_path)[2]):
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            np.testing.assert_allclose(theirs(torch.tensor(ref["input_ids"])).logits.numpy(), ref["logits"],
                                       atol=1e-5, rtol=0)
            prompt = torch.tensor(ref["prompt_ids"])
            greedy = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:]
        np.testing.assert_array_equal(greedy.numpy(), ref["greedy_ids"])
