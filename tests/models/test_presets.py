"""Model presets: the published architectures have their published parameter counts, and a preset is every model
key with its default unless the preset says otherwise; an unknown name lists the known ones."""

import re

import ml_collections
import numpy as np
import pytest

from llmjax import config
from llmjax.errors import LlmjaxError
from llmjax.hf import families
from llmjax.models import layers, presets, transformer
from llmjax.train import registry


@pytest.mark.parametrize("name, count", [
    ("gpt2-124m", 124_439_808),
    ("llama-1b", 1_235_814_400),
    ("llama3-8b", 8_030_261_248),  # published as 8.03B
    ("llama3-70b", 70_553_706_496),  # published as 70.6B
])
def test_param_count_matches_published(name, count):
    assert transformer.param_count(config.model_config(name)) == count


def test_mixture_of_experts_counts_total_and_active_parameters():
    """Mixtral 8x7B: 46.7B parameters, 12.9B of them used per token (2 of 8 experts); moe-small uses as many
    per token as small."""
    mixtral = config.model_config("mixtral-8x7b")
    assert transformer.param_count(mixtral) == 46_702_792_704
    assert transformer.active_param_count(mixtral) == 12_879_925_248
    small, moe_small = config.model_config("small"), config.model_config("moe-small")
    router = 4 * 256 * 8
    assert transformer.active_param_count(moe_small) == transformer.param_count(small) + router
    assert transformer.matmul_param_count(moe_small) == transformer.matmul_param_count(small) + router


def test_preset_fills_every_key_from_defaults():
    tiny = presets.preset("tiny")
    assert set(tiny) == set(presets.DEFAULTS) and tiny["name"] == "tiny"
    assert tiny["d_model"] == 64 and tiny["remat"] == presets.DEFAULTS["remat"] == "none"


def test_unknown_preset_names_the_known_ones():
    known = ", ".join(presets.PRESETS)
    assert known.startswith("tiny, small, gpt2-124m")
    with pytest.raises(ValueError, match=re.escape(f"model='nope' is not a preset; choose one of {known}") + "$"):
        presets.preset("nope")


NEW_ROPE_KEYS = ("rope_type", "rope_beta_fast", "rope_beta_slow", "rope_attn_factor")


def test_a_config_saved_before_rope_types_reads_as_it_ran():
    """Its one RoPE scaling was Llama 3.1's: rope_scaling != 1 is llama3, and 1 the default (unscaled) frequencies;
    the keys it lacks take their defaults, and its export writes what it did then."""
    old = {k: v for k, v in presets.preset("llama-1b").items() if k not in NEW_ROPE_KEYS}
    assert presets.rope(old) == presets.rope(presets.preset("llama-1b")) | dict(rope_type="llama3")
    unscaled = {k: v for k, v in presets.preset("tiny").items() if k not in NEW_ROPE_KEYS}
    assert presets.rope(unscaled)["rope_type"] == "default" and presets.rope(unscaled)["rope_scaling"] == 1.0
    assert presets.complete(unscaled) == presets.preset("tiny")  # a saved tiny run is the tiny preset
    np.testing.assert_array_equal(layers.rope_frequencies(16, 10_000.0, "llama3", 1.0),
                                  layers.rope_frequencies(16, 10_000.0))
    hf = families.hf_config(ml_collections.ConfigDict(unscaled | dict(vocab_size=320)), "float32", None, 1, 2)
    assert hf["rope_scaling"] is None and hf["max_position_embeddings"] == unscaled["max_seq_len"]


@pytest.mark.parametrize("change, message", [
    (dict(rope_type="ntk"), "model.rope_type='ntk' is not one of"),
    (dict(rope_type="linear", rope_scaling=0.5), "model.rope_scaling=0.5 is below 1"),
    (dict(rope_scaling=4.0), "model.rope_scaling=4.0 scales nothing with model.rope_type='default'"),
    (dict(rope_type="yarn", rope_scaling=4.0, rope_beta_fast=1.0),
     "model.rope_beta_slow=1.0 is not below model.rope_beta_fast=1.0"),
])
def test_rope_settings_that_mean_nothing_are_refused_in_one_line(change, message):
    with pytest.raises(LlmjaxError, match="^[^\n]*--config.model.rope_[^\n]*$") as e:
        presets.rope(presets.preset("tiny") | change)
    assert message in str(e.value)


@pytest.mark.parametrize("key, value, message", [
    ("rope_type", "ntk", "model.rope_type='ntk' is not one of"),
    ("rope_scaling", 0.5, "model.rope_scaling=0.5 is below 1"),
    ("rope_beta_slow", 0.0, "model.rope_beta_slow=0.0 is outside (0, inf)"),
])
def test_rope_keys_are_validated_before_a_run(key, value, message):
    cfg = config.base("tiny")
    cfg.model[key] = value
    with pytest.raises(LlmjaxError, match="^[^\n]*$") as e:
        registry.validate(cfg, 1)
    assert message in str(e.value)


@pytest.mark.parametrize("change, want", [
    (dict(), [0, 0]),
    (dict(sliding_window=8), [8, 8]),
    (dict(sliding_window=8, layer_types="sliding,full"), [8, 0]),
    (dict(sliding_window=8, layer_types="full,sliding"), [0, 8]),
    (dict(sliding_window=8, n_layers=4, layer_types="sliding,full"), [8, 0, 8, 0]),
])
def test_windows_per_layer(change, want):
    assert presets.windows(presets.preset("tiny") | change) == want


@pytest.mark.parametrize("change, message", [
    (dict(sliding_window=-1), "model.sliding_window=-1 is negative"),
    (dict(sliding_window=8, layer_types="sliding,local"), "model.layer_types='sliding,local' is not"),
    (dict(sliding_window=8, layer_types="sliding,full,full"), "whose length divides model.n_layers=2"),
    (dict(layer_types="sliding,full"), "names sliding layers but model.sliding_window=0"),
    (dict(sliding_window=8, layer_types="full"), "model.sliding_window=8 windows no layer"),
])
def test_window_settings_that_mean_nothing_are_refused_in_one_line(change, message):
    with pytest.raises(LlmjaxError, match="^[^\n]*--config.model.[^\n]*$") as e:
        presets.windows(presets.preset("tiny") | change)
    assert message in str(e.value)
