"""Model presets: the published architectures have their published parameter counts, and a preset is every model
key with its default unless the preset says otherwise; an unknown name lists the known ones."""

import re

import pytest

from llmjax import config
from llmjax.models import presets, transformer


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
