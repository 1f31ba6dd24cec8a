"""The entry points' shared CLI: a config mistake exits non-zero with one line naming the key and the fix, before
anything compiles. That a good config runs end to end (exit 0, config.json with the overrides, metrics, TensorBoard
events, checkpoints) is checked on the single-process run of tests/test_multiprocess.py, the same command."""

import os
import subprocess
import sys

import pytest

from llmjax import config, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8 fake devices and the tests' compilation cache (see conftest.py) in every subprocess.
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
           JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
PRETRAIN = "--config=configs/pretrain.py"

# name -> (CLI arguments, fragments stderr must contain: the key and the fix)
CLI_CASES = {
    "unknown_preset": ([f"{PRETRAIN}:model=nope"], ["model='nope'", "tiny, small"]),
    "misspelt_config_arg": ([f"{PRETRAIN}:modle=tiny"], ["'modle'", "valid keys: model, steps"]),
    "misspelt_override": ([PRETRAIN, "--config.optim.lrr=1"], ["no config key named 'lrr'; did you mean 'lr'?"]),
    "mesh_product": ([PRETRAIN, "--config.mesh.fsdp=3", "--config.mesh.data=1", "--config.mesh.tensor=1"],
                     ["has 3 devices but 8 are present", "--config.mesh.fsdp=-1"]),
    "batch_not_divisible": ([PRETRAIN, "--config.batch_size=12"], ["batch_size=12", "multiple of 8"]),
    "heads_not_divisible_by_kv_heads": ([f"{PRETRAIN}:model=tiny", "--config.model.n_kv_heads=3"],
                                        ["model.n_heads=4", "model.n_kv_heads=3"]),
    "kv_heads_not_divisible_by_tensor": ([f"{PRETRAIN}:model=tiny", "--config.mesh.tensor=4"],
                                         ["model.n_kv_heads=2", "mesh.tensor=4"]),
    "seq_len_too_long": ([PRETRAIN, "--config.seq_len=4096"], ["seq_len=4096", "--config.model.max_seq_len"]),
}


# Bad input, whatever the entry point: name -> (module, arguments, fragments stderr must contain). {in} is a folder
# of inputs (see `bad_inputs`), {lm} and {rm} workdirs holding only the config.json and parts.json of a language
# model and of a reward model run. Runs that were accepted before these checks are 2 tiny steps, so that they fail fast.
DPO = "--config=configs/dpo.py:model=tiny"
TINY = f"{PRETRAIN}:model=tiny,steps=2"
FILES = [f"{PRETRAIN}:model=tiny", "--config.data.data_dir={in}/tfds"]
INPUT_CASES = {
    "config_file_missing": ("llmjax.main", ["--config=configs/nope.py"], ["--config=configs/nope.py: no such file"]),
    "config_file_missing_overridden": ("llmjax.main", ["--config=configs/nope.py", "--config.optim.lr=1"],
                                       ["--config=configs/nope.py: no such file", "configs/*.py"]),
    "files_empty_folder": ("llmjax.main", [*FILES, "--config.data.source=files:{in}/empty"],
                           ["data.source='files:", "no .txt, .jsonl or .py files", "found: nothing"]),
    "files_only_csv": ("llmjax.main", [*FILES, "--config.data.source=files:{in}/csv"],
                       ["data.source='files:", "no .txt, .jsonl or .py files", "found: 2 .csv"]),
    "files_missing_path": ("llmjax.main", [*FILES, "--config.data.source=files:{in}/missing"],
                           ["/missing' does not exist"]),
    "files_all_malformed_jsonl": ("llmjax.main", [*FILES, "--config.data.source=files:{in}/bad.jsonl"],
                                  ["bad.jsonl:1: not valid JSON", "write one JSON object per line"]),
    "files_unknown_keys": ("llmjax.main", [*FILES, "--config.data.source=files:{in}/keys.jsonl"],
                           ["cannot infer the record kind", "'colour', 'id'", '"prompt" and "response"']),
    "validation_out_of_range": ("llmjax.main", [TINY, "--config.data.validation=1.5"],
                                ["data.validation=1.5 is outside [0, 1)"]),
    "zero_learning_rate": ("llmjax.main", [TINY, "--config.optim.lr=0"], ["optim.lr=0.0 is outside (0, inf)"]),
    "negative_weight_decay": ("llmjax.main", [TINY, "--config.optim.weight_decay=-0.1"],
                              ["optim.weight_decay=-0.1 is outside [0, inf)"]),
    "ipo_beta_zero": ("llmjax.main", [DPO, "--config.dpo.loss=ipo", "--config.dpo.beta=0"],
                      ["dpo.beta=0.0 is outside (0, inf)", "--config.dpo.beta"]),
    "score_input_missing": ("llmjax.score", ["--workdir={rm}", "--input={in}/nope.jsonl"],
                            ["--input='", "nope.jsonl' does not exist"]),
    "score_input_malformed": ("llmjax.score", ["--workdir={rm}", "--input={in}/pairs.jsonl"],
                              ["pairs.jsonl:2: not valid JSON"]),
    "score_response_too_long": ("llmjax.score", ["--workdir={rm}", "--prompt=sort 21 = ", "--response=" + "1" * 300],
                                ["--response='111", "tokens, more than the reward model's max_seq_len=256"]),
    "generate_prompts_file_missing": ("llmjax.generate", ["--workdir={lm}", "--prompts_file={in}/nope.txt"],
                                      ["--prompts_file='", "nope.txt' does not exist"]),
    "generate_prompt_too_long": ("llmjax.generate", ["--workdir={lm}", "--prompt=" + "9" * 300],
                                 ["prompt 1 ('9999", "max_seq_len=256; shorten the prompt or lower --max_new_tokens"]),
}


def cli(args: list[str], workdir, module: str = "llmjax.main") -> subprocess.Popen:
    workdir_arg = [f"--workdir={workdir}"] if module == "llmjax.main" else []
    return subprocess.Popen([sys.executable, "-m", module, *args, *workdir_arg], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """All bad-config runs at once: name -> (exit code, stderr, whether the workdir was created)."""
    root = tmp_path_factory.mktemp("bad")
    procs = {name: cli(args, root / name) for name, (args, _) in CLI_CASES.items()}
    out = {}
    for name, p in procs.items():
        _, stderr = p.communicate(timeout=60)
        out[name] = (p.returncode, stderr, (root / name).exists())
    return out


# Each fixture's cases run in one worker (pytest-xdist --dist loadgroup), which starts its processes once.
@pytest.mark.slow
@pytest.mark.xdist_group("cli_bad_runs")
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_rejects_bad_config(bad_runs, case):
    code, stderr, started = bad_runs[case]
    assert code != 0
    assert "Traceback" not in stderr, stderr
    for fragment in CLI_CASES[case][1]:
        assert fragment in stderr, stderr
    assert not started  # failed before claiming the workdir, so before anything compiled


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """All bad-input runs at once: name -> (exit code, stderr, whether a training run created its workdir)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty").mkdir()
    (root / "csv").mkdir()
    (root / "csv" / "a.csv").write_text("prompt,response\n")
    (root / "csv" / "b.csv").write_text("text\n")
    (root / "bad.jsonl").write_text('{"text": "unclosed\n{text: "unquoted key"}\n')
    (root / "keys.jsonl").write_text('{"id": 1, "colour": "red"}\n{"id": 2}\n')
    (root / "pairs.jsonl").write_text('{"prompt": "sort 21 = ", "response": "12"}\n{"prompt": "sort 21 = "\n')
    reward_cfg = config.load(f"{ROOT}/configs/reward.py:model=tiny")
    for name, cfg, parts, made in (("lm", config.base("tiny"), {"lm": ()}, "pretrain"),
                                   ("rm", reward_cfg, {"scorer": ()}, "reward")):
        runs.claim_workdir(str(root / name), cfg, parts, made)
    procs = {}
    for name, (module, args, _) in INPUT_CASES.items():
        args = [a.replace("{in}", str(root)).replace("{lm}", str(root / "lm")).replace("{rm}", str(root / "rm"))
                for a in args]
        procs[name] = cli(args, root / "out" / name, module)
    out = {}
    for name, p in procs.items():
        _, stderr = p.communicate(timeout=120)
        out[name] = (p.returncode, stderr, (root / "out" / name).exists())
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("cli_bad_inputs")
@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_cli_rejects_bad_input(bad_inputs, case):
    """Each bad input: exit status 2 and one line, naming the input and the fix, before anything is written."""
    code, stderr, started = bad_inputs[case]
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in INPUT_CASES[case][2]:
        assert fragment in lines[0], stderr
    assert not started

