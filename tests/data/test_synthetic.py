import numpy as np
import pytest

from llmjax.data import tasks
from llmjax.data.synthetic import make_batch
from llmjax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SEQ_LEN = 128


def batch(rows=range(8), step=0, seed=0, names=tuple(tasks.TASKS)):
    return make_batch(seed=seed, step=step, rows=rows, seq_len=SEQ_LEN, tasks=names, tokenizer=TOK)


@pytest.fixture(scope="module")
def b():
    return batch()


def test_shapes_and_dtypes(b):
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for key, value in b.items():
        assert value.shape == (8, SEQ_LEN)
        assert value.dtype == (np.float32 if key == "loss_mask" else np.int32)
    assert b["inputs"].min() >= 0 and b["inputs"].max() < TOK.vocab_size


def test_deterministic_in_seed_and_step(b):
    again = batch()
    assert all(np.array_equal(b[k], again[k]) for k in b)
    assert not np.array_equal(b["inputs"], batch(step=1)["inputs"])
    assert not np.array_equal(b["inputs"], batch(seed=1)["inputs"])


def test_rows_split_across_processes_match_one_process(b):
    halves = [batch(rows=range(0, 4)), batch(rows=range(4, 8))]
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


def test_loss_mask_drops_only_cross_document_targets(b):
    crosses = b["targets"] == TOK.bos_id
    assert crosses.any()
    np.testing.assert_array_equal(b["loss_mask"], (~crosses).astype(np.float32))
    np.testing.assert_array_equal(b["inputs"][crosses], TOK.eos_id)


def test_documents_decode_to_checkable_examples(b):
    seen = set()
    for inputs, seg in zip(b["inputs"], b["segment_ids"], strict=True):
        complete = inputs[seg == 1]  # the first document never reaches the end of a 128-token row
        assert complete[0] == TOK.bos_id and complete[-1] == TOK.eos_id
        text = TOK.decode(complete)
        prompt, answer = text.rsplit(" = ", 1)
        name = prompt.split(" ", 1)[0]
        assert tasks.TASKS[name].check(prompt + " = ", answer)
        seen.add(name)
    assert len(seen) > 1


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="bogus"):
        batch(names=("bogus",))
