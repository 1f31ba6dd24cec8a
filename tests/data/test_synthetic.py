import hashlib

import numpy as np
import pytest
from helpers import tiny_config

from llmjax.data import chat, tasks
from llmjax.data.synthetic import check_rows, make_batch
from llmjax.data.tokenizer import ByteTokenizer
from llmjax.errors import LlmjaxError
from llmjax.train import registry

TOK = ByteTokenizer()
SEQ_LEN = 128
S = TOK.special_ids


def batch(rows=range(8), step=0, seed=0, names=tuple(tasks.TASKS), seq_len=SEQ_LEN, format="text"):
    return make_batch(seed=seed, step=step, rows=rows, seq_len=seq_len, tasks=names, tokenizer=TOK, format=format)


@pytest.fixture(scope="module", params=["text", "chat"])
def fmt(request):
    return request.param


@pytest.fixture(scope="module")
def b(fmt):
    return batch(format=fmt)


@pytest.fixture(scope="module")
def text():
    return batch()


@pytest.fixture(scope="module")
def chat_batch():
    return batch(rows=range(16), format="chat")


def test_shapes_and_dtypes(b):
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for key, value in b.items():
        assert value.shape == (8, SEQ_LEN)
        assert value.dtype == (np.float32 if key == "loss_mask" else np.int32)
    assert b["inputs"].min() >= 0 and b["inputs"].max() < TOK.vocab_size


def test_deterministic_in_seed_and_step(b, fmt):
    again = batch(format=fmt)
    assert all(np.array_equal(b[k], again[k]) for k in b)
    assert not np.array_equal(b["inputs"], batch(step=1, format=fmt)["inputs"])
    assert not np.array_equal(b["inputs"], batch(seed=1, format=fmt)["inputs"])


def test_rows_split_across_processes_match_one_process(b, fmt):
    halves = [batch(rows=range(0, 4), format=fmt), batch(rows=range(4, 8), format=fmt)]
    for key in b:
        np.testing.assert_array_equal(b[key], np.concatenate([h[key] for h in halves]))


def test_targets_are_shifted_inputs(b):
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    assert (b["inputs"][:, 0] == TOK.bos_id).all()


def test_segments_and_positions_restart_at_each_document(b):
    seg, pos, inputs = b["segment_ids"], b["positions"], b["inputs"]
    assert (seg[:, 0] == 1).all() and (pos[:, 0] == 0).all()
    new_doc = seg[:, 1:] != seg[:, :-1]
    np.testing.assert_array_equal(new_doc, pos[:, 1:] == 0)
    np.testing.assert_array_equal(np.diff(seg, axis=1), new_doc.astype(np.int32))
    np.testing.assert_array_equal(pos[:, 1:][~new_doc], pos[:, :-1][~new_doc] + 1)
    np.testing.assert_array_equal(inputs == TOK.bos_id, pos == 0)
    assert new_doc.any()


@pytest.mark.parametrize("seed, step, rows, seq_len, digest", [
    (0, 0, range(8), 128, "3014b8a6f74f4e1fbde8e472385c06bcd9baf0dc203ae537f1dd33e56e3273a9"),
    (3, 7, range(2, 5), 300, "c8dcbb6afb1ec8a7ba883242589d59430d23724f57360db752801b0638a95360"),
])
def test_text_batches_are_unchanged(seed, step, rows, seq_len, digest):
    """Digests recorded from the text-only code before the chat format was added: old runs resume exactly."""
    out = batch(rows=rows, step=step, seed=seed, seq_len=seq_len)
    h = hashlib.sha256()
    for key in sorted(out):
        h.update(key.encode())
        h.update(np.ascontiguousarray(out[key]).tobytes())
    assert h.hexdigest() == digest


def test_text_loss_mask_drops_only_cross_document_targets(text):
    crosses = text["targets"] == TOK.bos_id
    assert crosses.any()
    np.testing.assert_array_equal(text["loss_mask"], (~crosses).astype(np.float32))
    np.testing.assert_array_equal(text["inputs"][crosses], TOK.eos_id)


def test_text_documents_decode_to_checkable_examples(text):
    seen = set()
    for inputs, seg in zip(text["inputs"], text["segment_ids"], strict=True):
        complete = inputs[seg == 1]  # the first document never reaches the end of a 128-token row
        assert complete[0] == TOK.bos_id and complete[-1] == TOK.eos_id
        prompt, answer = TOK.decode(complete).rsplit(" = ", 1)
        name = prompt.split(" ", 1)[0]
        assert tasks.TASKS[name].check(prompt + " = ", answer)
        seen.add(name)
    assert len(seen) > 1


def _examples(b, row):
    """The row's whole token sequence (inputs and the last target) and each packed example's indices in it,
    found from the bos tokens alone, independently of segment_ids."""
    tokens = np.append(b["inputs"][row], b["targets"][row, -1])
    starts = np.flatnonzero(tokens == TOK.bos_id)
    return tokens, np.split(np.arange(len(tokens)), starts[1:])


def test_chat_loss_mask_is_exactly_the_responses_of_each_example(chat_batch):
    b = chat_batch
    n_complete = n_packed = n_truncated = 0
    for row in range(len(b["inputs"])):
        tokens, examples = _examples(b, row)
        answers = np.zeros(len(tokens), bool)  # tokens that are a response byte or eos of their example
        for k, idx in enumerate(examples):
            ex = tokens[idx].tolist()
            assert ex[:2] == [S["bos"], S["<|user|>"]][: len(ex)]
            start = ex.index(S["<|assistant|>"]) + 1 if S["<|assistant|>"] in ex else len(ex)
            answers[idx[start:]] = True
            if S["eos"] in ex:  # a complete example: the template holds and the answer is right
                assert ex[-1] == S["eos"] and ex.count(S["eos"]) == 1 and start < len(ex)
                prompt = TOK.decode(ex[2 : start - 2])
                response = TOK.decode(ex[start:])
                assert ex == chat.render(TOK, prompt, response)[0]
                assert tasks.TASKS[prompt.split(" ", 1)[0]].check(prompt, response)
                n_complete += 1
                n_packed += k > 0
            else:
                assert k == len(examples) - 1  # only the last example may be cut off
                n_truncated += 1
        mask = b["loss_mask"][row].astype(bool)
        # Every masked-in target is a response token or eos of the same example as its input...
        assert answers[1:][mask].all()
        example_of = np.cumsum(tokens == TOK.bos_id)
        np.testing.assert_array_equal(example_of[:-1][mask], example_of[1:][mask])
        # ...and every response token and eos is a masked-in target, the first one after a packing boundary too.
        np.testing.assert_array_equal(mask, answers[1:])
    assert n_complete > 2 * len(b["inputs"]) and n_packed > len(b["inputs"]) and n_truncated > 0


def test_chat_template_tokens_and_prompts_carry_no_loss(chat_batch):
    inputs, targets, mask = chat_batch["inputs"], chat_batch["targets"], chat_batch["loss_mask"]
    assert (mask[inputs == S["<|assistant|>"]] == 1).all()  # the first response token is never lost
    assert (mask[targets == S["eos"]] == 1).all()  # the model learns to stop
    for special in ("bos", "<|user|>", "<|end|>", "<|assistant|>"):
        assert (mask[targets == TOK.special_ids[special]] == 0).all()
    assert (mask[inputs == S["eos"]] == 0).all()  # nothing predicts the next example from the last
    assert 0 < mask.mean() < 0.5  # prompts are most of the tokens and add nothing


def test_chat_mask_is_the_same_alone_and_packed(monkeypatch):
    rng = np.random.default_rng(0)
    first, ex = tasks.TASKS["lookup"].generate(rng), tasks.TASKS["add"].generate(rng)
    n_first, n_ex = (len(chat.render(TOK, e.prompt, e.answer)[0]) for e in (first, ex))

    def packed(*examples):
        draws = iter(examples)
        monkeypatch.setattr(tasks, "sample", lambda rng, names: next(draws))
        n = sum(len(chat.render(TOK, e.prompt, e.answer)[0]) for e in examples)
        return batch(rows=range(1), seq_len=n - 1, format="chat")["loss_mask"][0]

    alone, after = packed(ex), packed(first, ex)
    expected = chat.render(TOK, ex.prompt, ex.answer)[1][1:]
    np.testing.assert_array_equal(alone, expected)
    np.testing.assert_array_equal(after[n_first:], alone)
    assert after[n_first - 1] == 0 and after[:n_first - 1].sum() == len(first.answer) + 1
    assert len(after) == n_first + n_ex - 1


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="bogus"):
        batch(names=("bogus",))


def test_unknown_format_raises():
    with pytest.raises(ValueError, match="chat"):
        batch(format="jsonl")


def test_a_long_range_document_fills_a_row_whole_and_a_longer_one_is_refused():
    """passkey_N at seq_len N - 1 (text): each row is one whole document, its key checkable; a document a row cannot
    hold (longer, or the chat template's extra tokens) is refused in one line, short tasks of any length never."""
    b = batch(rows=range(4), names=("passkey_65_1",), seq_len=64)
    for inputs, targets, seg in zip(b["inputs"], b["targets"], b["segment_ids"], strict=True):
        assert (seg == 1).all() and targets[-1] == TOK.eos_id
        prompt, answer = TOK.decode(np.append(inputs, targets[-1])).rsplit(" = ", 1)
        assert tasks.get("passkey").check(prompt + " = ", answer)
    cfg = tiny_config(**{"data.tasks": "sort,passkey_65_1", "data.tokenizer": "byte"})
    check_rows(cfg)
    cfg.data.format = "chat"
    with pytest.raises(LlmjaxError, match=r"^data.tasks='sort,passkey_65_1': a passkey_65_1 document is 68 tokens as "
                                          r"chat, more than a row of seq_len=64 holds whole; raise --config.seq_len to "
                                          r"67 or ask for a shorter one$"):
        registry.validate(cfg, 1)  # pretraining and SFT check their rows
    check_rows(tiny_config(**{"data.tasks": "copy,lookup", "seq_len": 8}))
