"""Preference data: synthetic ranked lists put the correct answer first, and a row's loss mask ends on the last
response token (or its eos), where a reward model reads its score."""

from llmjax.data import preference, tasks
from llmjax.data.tokenizer import ByteTokenizer
from llmjax.models import heads


def test_reads_the_last_response_token_or_the_eos():
    ranked = preference.synthetic(0, ["sort"], 2)
    prompt, responses = ranked(0, 0)
    tok = ByteTokenizer()
    for eos_input, last_input in ((False, tok.encode(responses[0])[-1]), (True, tok.eos_id)):
        rows = preference.make(ranked, step=0, rows=range(1), seq_len=64, tokenizer=tok, layout="ranked",
                               eos_input=eos_input)["responses"]
        index = int(heads.last_index(rows["loss_mask"][0, :1])[0])
        assert rows["inputs"][0, 0, index] == last_input
        assert rows["inputs"][0, 0, index + 1] == 0  # nothing after it


def test_ranked_lists_are_ordered_and_wrong_after_the_first():
    for name in ("sort", "add"):
        prompt, responses = preference.synthetic(3, [name], 4)(5, 1)
        check = tasks.TASKS[name].check
        assert len(set(responses)) == 4 and check(prompt, responses[0])
        assert not any(check(prompt, r) for r in responses[1:])
