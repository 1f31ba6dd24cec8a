"""Preference data: synthetic ranked lists put the correct answer first, a row's loss mask ends on the last
response token (or its eos), where a reward model reads its score, and pairs that train on nothing are counted."""

import json
import logging
import re

import pytest

from llmjax import config
from llmjax.data import preference, tasks
from llmjax.data.tokenizer import get_tokenizer
from llmjax.models import heads


@pytest.mark.parametrize("tokenizer", ["byte", "hf:tests/fixtures/hf/qwen2"])
def test_reads_the_last_response_token_or_the_eos(tokenizer):
    """With ChatML (a newline after eos), eos_input still ends the sequence at an eos input."""
    ranked = preference.synthetic(0, ["sort"], 2)
    prompt, responses = ranked(0, 0)
    tok = get_tokenizer(tokenizer)
    last_answer = tok.encode(responses[0])[-1]
    for eos_input, last_input in ((False, last_answer), (True, tok.eos_id)):
        rows = preference.make(ranked, step=0, rows=range(1), seq_len=64, tokenizer=tok, layout="ranked",
                               eos_input=eos_input)["responses"]
        index = int(heads.last_index(rows["loss_mask"][0, :1])[0])
        assert rows["inputs"][0, 0, index] == last_input
        if eos_input or tokenizer == "byte":
            assert rows["inputs"][0, 0, index + 1] == 0  # nothing after it


def test_ranked_lists_are_ordered_and_wrong_after_the_first():
    for name in ("sort", "add"):
        prompt, responses = preference.synthetic(3, [name], 4)(5, 1)
        check = tasks.TASKS[name].check
        assert len(set(responses)) == 4 and check(prompt, responses[0])
        assert not any(check(prompt, r) for r in responses[1:])


def pairs_config(tmp_path, pairs: list[tuple[str, str]]):
    """A DPO/reward-style config reading `pairs` (chosen, rejected) from a files: source."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "p.jsonl").write_text("".join(json.dumps({"prompt": f"sort {i} = ", "chosen": c, "rejected": r}) + "\n"
                                            for i, (c, r) in enumerate(pairs)))
    cfg = config.base("tiny")
    cfg.data.update(source=f"files:{folder}", data_dir=str(tmp_path / "tfds"), validation=0.0)
    return cfg


def test_pairs_whose_chosen_is_the_rejected_are_counted_and_warned(tmp_path, caplog):
    """Such a pair's DPO and Bradley-Terry gradients are exactly 0: the run is told how many there are."""
    pairs = [("12", "12") if i % 4 == 0 else ("12", "21") for i in range(20)]
    with caplog.at_level(logging.WARNING, logger="llmjax"):
        ranked = preference.source(pairs_config(tmp_path, pairs))
    assert ranked(0, 0)[1] in (["12", "12"], ["12", "21"])
    warnings = [r.getMessage() for r in caplog.records if r.name == "llmjax" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and re.search(r"data.source='files:.*': 5 of 20 records have the same best and worst "
                                            r"response \(chosen == rejected\); they train on nothing", warnings[0])


def test_a_source_of_only_degenerate_pairs_is_refused(tmp_path):
    with pytest.raises(config.ConfigError, match=r"all 6 records have the same best and worst response .* learns "
                                                 r"nothing; give pairs whose chosen and rejected responses differ$"):
        preference.source(pairs_config(tmp_path, [("12", "12")] * 6))
