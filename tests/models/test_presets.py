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


def test_preset_fills_every_key_from_defaults():
    tiny = presets.preset("tiny")
    assert set(tiny) == set(presets.DEFAULTS) and tiny["name"] == "tiny"
    assert tiny["d_model"] == 64 and tiny["remat"] == presets.DEFAULTS["remat"] == "none"


def test_unknown_preset_names_the_known_ones():
    known = ", ".join(presets.PRESETS)
    assert known.startswith("tiny, small, gpt2-124m")
    with pytest.raises(ValueError, match=re.escape(f"model='nope' is not a preset; choose one of {known}") + "$"):
        presets.preset("nope")
