"""The context-extension stage (configs/extend.py) and its experiment: the config continues a run's parameters at
a longer length with RoPE scaled, refuses bad arguments and shape changes in one line; the experiment runs end to
end on `tiny`."""

import pytest
from helpers import assert_same_values, one_device, saved_run, tiny_config

from experiments.extension import run
from llmjax import config, runs
from llmjax.errors import LlmjaxError
from llmjax.train import registry

EXTEND = "configs/extend.py"


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> tuple[str, dict]:
    """A tiny run at 64 tokens a row, saved untrained with its parameters scaled (so they differ from a fresh
    init), and those parameters."""
    workdir = str(tmp_path_factory.mktemp("short"))
    state = saved_run(tiny_config(**{"data.tasks": "passkey_64", "model.max_seq_len": 64}), workdir, scale=1.5)
    return workdir, state.params


def test_extension_starts_from_the_runs_parameters_with_rope_scaled(short):
    base, params = short
    cfg = config.load(f"{EXTEND}:base={base},seq_len=512,rope=yarn,steps=40")
    m = cfg.model
    assert (m.max_seq_len, m.rope_type, m.rope_scaling, m.rope_original_max_len) == (512, "yarn", 8.0, 64)
    assert (cfg.seq_len, cfg.batch_size, cfg.init_from, cfg.data.tasks) == (512, 1, base, "passkey_510")
    assert (cfg.steps, cfg.optim.warmup_steps, cfg.optim.lr) == (40, 4, 1e-3)
    start = registry.task(cfg, "", one_device()).start()
    assert_same_values(start.params, params)
    assert int(start.step) == 0  # a fresh optimizer and schedule


def test_a_scaled_base_keeps_its_type_and_its_factors_multiply(short, tmp_path):
    cfg = config.load(f"{EXTEND}:base={short[0]},seq_len=256")
    cfg.batch_size = 8  # one row a device
    saved_run(cfg, str(tmp_path / "long"))
    again = config.load(f"{EXTEND}:base={tmp_path / 'long'},seq_len=1024").model
    assert (again.rope_type, again.rope_scaling, again.rope_original_max_len) == ("linear", 16.0, 64)
    with pytest.raises(LlmjaxError, match=r"already scaled by 'linear'.*extend it with rope=linear$"):
        config.load(f"{EXTEND}:base={tmp_path / 'long'},seq_len=1024,rope=yarn")


@pytest.mark.parametrize("arg, message", [
    ("", r"^config argument base='': name the run \(or hf:DIR\) whose parameters are extended"),
    ("base=tiny", r"^config argument base='tiny': name the run"),
    ("base=BASE,rope=ntk", r"^config argument rope='ntk' is not one of \('default', 'llama3'"),
    ("base=BASE,seq_len=64", r"^config argument seq_len=64 is not longer than the 64 tokens .* was trained at"),
    ("base=BASE,context=1024", r"^config argument 'context' is unknown; valid keys: base, seq_len"),
    ("base=/no/such/run", r"model='/no/such/run' is not a preset"),
])
def test_bad_arguments_are_refused_in_one_line(short, arg, message):
    with pytest.raises(LlmjaxError, match=message) as e:
        config.load(f"{EXTEND}:{arg.replace('BASE', short[0])}")
    assert "\n" not in str(e.value)


def test_a_change_of_shapes_is_refused(short, tmp_path):
    """Raising max_seq_len changes no shape under RoPE, but one of a learned position table, and any other change of
    the model's shapes is refused before anything compiles."""
    cfg = config.load(f"{EXTEND}:base={short[0]},seq_len=128")
    cfg.model.d_ff *= 2
    with pytest.raises(LlmjaxError, match=r"holds a 'tiny' model whose parameters differ from this config's"):
        registry.task(cfg, "", one_device())
    learned = str(tmp_path / "learned")
    saved_run(tiny_config(**{"model.pos": "learned", "model.max_seq_len": 64}), learned)
    with pytest.raises(LlmjaxError, match=r"parameters differ"):
        registry.task(config.load(f"{EXTEND}:base={learned},seq_len=128,rope=default"), "", one_device())


@pytest.mark.slow
def test_the_experiment_end_to_end_on_tiny_and_resumed(tmp_path):
    """Pretraining at 64 tokens, its evaluation at 64 and 128 by distance, each extension's (and for a scaled RoPE,
    the pretrained parameters under it before any step); run again, nothing is redone."""
    plan = run.Plan(model="tiny", steps=4, extend_steps=2, short=64, long=128, ropes=("linear",), n=8)
    out = run.run(str(tmp_path), plan)
    assert [(r["model"], r["rope"], r["length"]) for r in out["rows"]] == [
        (model, rope, length) for model, rope in (("pretrained", "default"), ("scaled", "linear"),
                                                  ("extended", "linear"))
        for length in (64, 128)]
    for r in out["rows"]:
        assert 0 <= r["accuracy"] <= 1 and r["perplexity"] > 1
        assert {k for k in r if k.startswith("accuracy/")} == {"accuracy/d0-127"}  # at 128 tokens, keys 4-109 back
    long = runs.run_config(str(tmp_path / "extend_linear"))
    assert (long.seq_len, long.model.rope_type, long.model.rope_scaling, long.data.tasks) == (
        128, "linear", 2.0, "passkey_126_1")
    assert runs.run_config(str(tmp_path / "pretrain")).data.tasks == "passkey_30_1,passkey_62_1"
    done = sorted(tmp_path.rglob("eval_*.json")) + sorted(tmp_path.rglob("metrics.jsonl"))
    mtimes = [p.stat().st_mtime_ns for p in done]
    again = run.run(str(tmp_path), plan)
    assert [p.stat().st_mtime_ns for p in done] == mtimes and again["rows"] == out["rows"]
    table = run.table(out)
    assert table.count("\n| extended |") == 2 and "| pretrain |" in table
