"""configs/stdlib.py: the Python standard library's source is a corpus every machine has; a model trained on
a package of it predicts its held-out files better and better."""

import sysconfig

import pytest
from helpers import metric_rows

from configs import stdlib as stdlib_config
from llmjax import config
from llmjax.train import registry


def test_config_reads_the_standard_library():
    cfg = stdlib_config.get_config()
    assert cfg.data.source == f"files:{sysconfig.get_paths()['stdlib']}"
    assert cfg.data.tokenizer == "byte" and 0 < cfg.data.validation < 1
    registry.validate(cfg, n_devices=1)
    with pytest.raises(config.LlmjaxError, match=r"subdir='no_such_package': .* is not a folder; .*subdir=json"):
        stdlib_config.get_config("subdir=no_such_package")


@pytest.mark.slow
def test_held_out_perplexity_falls_on_a_stdlib_package(tmp_path):
    cfg = stdlib_config.get_config("subdir=email,validation=0.2,model=tiny,steps=24")
    cfg.batch_size, cfg.seq_len = 8, 64
    cfg.data.data_dir = str(tmp_path / "tfds")
    cfg.eval_every, cfg.log_every, cfg.checkpoint.every = 8, 8, 24
    cfg.peak_flops = 1e12  # skip measuring the matmul rate
    registry.train(cfg, str(tmp_path / "run"))
    perplexity = {row["step"]: row["eval/perplexity"] for row in metric_rows(tmp_path / "run")
                  if "eval/perplexity" in row}
    assert sorted(perplexity) == [8, 16, 24]
    assert perplexity[24] < perplexity[16] < perplexity[8] and perplexity[24] < 0.6 * perplexity[8], perplexity
