"""Preference data: synthetic ranked lists put the correct answer first, a row's loss mask ends on the last
response token (or its eos), where a reward model reads its score, and pairs that train on nothing are counted."""

import json
import logging
import re

import numpy as np
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
    with pytest.raises(config.LlmjaxError, match=r"all 6 records have the same best and worst response .* learns "
                                                 r"nothing; give pairs whose chosen and rejected responses differ$"):
        preference.source(pairs_config(tmp_path, [("12", "12")] * 6))


KINDS = tuple(tasks.NEGATIVES)
NAMES = list(tasks.TASKS)


def test_each_pair_draws_one_kind_uniformly_and_deterministically():
    """Row (step, r) of a mixture of kinds is that row of its kind's source alone (the same prompt whatever the
    kinds), so a corrupt-only run makes the rows it made before there were kinds."""
    mixed = preference.synthetic(5, NAMES, 2, KINDS)
    alone = {kind: preference.synthetic(5, NAMES, 2, (kind,)) for kind in KINDS}
    assert all(preference.synthetic(5, NAMES, 2)(s, r) == alone["corrupt"](s, r) for s in range(2) for r in range(20))
    counts = dict.fromkeys(KINDS, 0.0)
    for step in range(3):
        for r in range(100):
            row = mixed(step, r)
            assert row == mixed(step, r)
            kinds = [kind for kind in KINDS if alone[kind](step, r) == row]  # a swap may be corrupt's and permute's
            for kind in kinds:
                counts[kind] += 1 / len(kinds)
    assert all(75 <= n <= 125 for n in counts.values()), counts  # 100 each expected, sd 8


@pytest.mark.parametrize("kind", KINDS)
def test_every_kinds_rejected_answers_are_wrong_and_ranked_by_distance(kind):
    """The kind's wrong answer second (permute: the right answer's characters, but for lookup's one digit; corrupt:
    them too when it swaps two), then corruptions of it, which keep its length."""
    ranked = preference.synthetic(1, NAMES, 3, (kind,))
    same = 0
    for r in range(200):
        prompt, (right, wrong, worse) = ranked(0, r)
        check = tasks.TASKS[prompt.split()[0]].check
        assert check(prompt, right) and not check(prompt, wrong) and not check(prompt, worse)
        assert len({right, wrong, worse}) == 3 and len(worse) == len(wrong)
        same += sorted(wrong) == sorted(right)
    low, high = {"corrupt": (0.2, 0.6), "permute": (0.6, 1.0), "neighbour": (0.0, 0.05)}[kind]  # swaps: half
    assert low * 200 <= same <= high * 200, same


def test_mix_takes_about_its_fraction_of_rows_deterministically():
    mixed = preference.mix(lambda s, r: ("a", []), lambda s, r: ("b", []), 0.25, seed=3)
    taken = [mixed(s, r)[0] == "b" for s in range(4) for r in range(200)]
    assert abs(np.mean(taken) - 0.25) < 0.05
    assert taken == [mixed(s, r)[0] == "b" for s in range(4) for r in range(200)]
    assert taken != [preference.mix(lambda s, r: ("a", []), lambda s, r: ("b", []), 0.25, seed=4)(s, r)[0] == "b"
                     for s in range(4) for r in range(200)]
