import json
import time
from collections import Counter

import numpy as np
import pytest

from llmjax.data import pipeline
from llmjax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
SEQ_LEN = 64


def records(n: int, format: str, max_len: int = 40, seed: int = 0) -> list[dict]:
    """Unique documents of random lengths; their rendering stays under a row unless max_len is large."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdef "), rng.integers(0, max_len))) for _ in range(n)]
    if format == "text":
        return [{"text": f"{i}:{w}"} for i, w in enumerate(words)]
    return [{"prompt": f"{i}?", "response": w} for i, w in enumerate(words)]


def iterate(source, batch_size=4, process_index=0, process_count=1, seed=0, format="text", epochs=1, **kw):
    return pipeline.make_iterator(source, tokenizer=TOK, seq_len=SEQ_LEN, batch_size=batch_size, seed=seed,
                                  process_index=process_index, process_count=process_count, format=format,
                                  epochs=epochs, **kw)


def segments(batch: dict[str, np.ndarray]) -> list[tuple[list[int], list[float]]]:
    """Each packed segment's tokens and their weights as targets, after checking the row layout: segments are
    contiguous with positions from 0, padding (segment 0, pad id, no loss) fills only the tail, and no target
    that crosses into another segment or padding carries loss."""
    out = []
    for row in range(len(batch["inputs"])):
        seg, inputs, targets, mask = (batch[k][row] for k in ("segment_ids", "inputs", "targets", "loss_mask"))
        used = np.count_nonzero(seg)
        assert np.all(seg[:used] > 0) and np.all(np.diff(seg[:used]) >= 0)
        assert np.all(seg[used:] == 0) and np.all(inputs[used:] == TOK.pad_id) and np.all(mask[used:] == 0)
        for s in np.unique(seg[:used]):
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(batch["positions"][row, idx], np.arange(len(idx)))
            tokens, weights = inputs[idx].tolist(), [0.0, *mask[idx[:-1]]]
            if idx[-1] == SEQ_LEN - 1 and targets[-1] != TOK.pad_id:  # the row's last token ends this segment
                tokens.append(int(targets[-1]))
                weights.append(float(mask[-1]))
            else:
                assert mask[idx[-1]] == 0, "a target in the next segment or padding carries loss"
            out.append((tokens, weights))
    return out


def all_segments(it) -> list[tuple[list[int], list[float]]]:
    return [s for batch in it for s in segments(batch)]


def rendered(source, format: str) -> list[tuple[list[int], list[float]]]:
    docs = (pipeline.render(r, TOK, format) for r in source)
    return [(d["tokens"].tolist(), d["weights"].tolist()) for d in docs]


def key(doc) -> tuple:
    return tuple(doc[0]), tuple(doc[1])


@pytest.mark.parametrize("format", ["text", "chat"])
def test_packs_whole_documents_into_rows(format):
    source = records(200, format)
    batches = list(iterate(source, format=format))
    for b in batches:
        assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
        for k, v in b.items():
            assert v.shape == (4, SEQ_LEN) and v.dtype == (np.float32 if k == "loss_mask" else np.int32)
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    got = Counter(map(key, all_segments(batches)))
    assert max(b["segment_ids"].max() for b in batches) > 1, "rows hold several documents"
    assert not got - Counter(map(key, rendered(source, format))), "a segment is not exactly one rendered document"
    assert sum(got.values()) > 0.9 * len(source)  # only the last incomplete batch is dropped


@pytest.mark.parametrize("format", ["text", "chat"])
def test_long_documents_are_split_not_truncated(format):
    source = records(6, format, max_len=300, seed=1)
    docs = rendered(source, format)
    assert max(len(t) for t, _ in docs) > 3 * (SEQ_LEN + 1)
    chunks = all_segments(iterate(source, batch_size=1, format=format))
    assert all(len(t) <= SEQ_LEN + 1 for t, _ in chunks)
    joined = []  # with one row per batch the chunks come in order; only a document's first chunk starts with bos
    for tokens, weights in chunks:
        if tokens[0] == TOK.bos_id:
            joined.append((tokens, weights))
        else:  # consecutive chunks share one token, which the later one holds as context only
            assert weights[0] == 0
            joined[-1][0].extend(tokens[1:])
            joined[-1][1].extend(weights[1:])
    assert sorted(map(key, joined)) == sorted(map(key, docs))
    all_segments(iterate(source * 4, batch_size=8, format=format))  # first-fit puts short last chunks mid-row


def test_truncate_keeps_only_the_first_row_of_a_document():
    source = records(6, "text", max_len=300, seed=1)
    got = sorted(map(key, all_segments(iterate(source, batch_size=1, truncate=True))))
    want = sorted((tuple(t[:SEQ_LEN + 1]), tuple(w[:SEQ_LEN + 1])) for t, w in rendered(source, "text"))
    assert got == want


def test_resumes_exactly_from_saved_state():
    source = records(40, "chat", max_len=150)  # short and long documents; batches cross epochs
    it = iterate(source, format="chat", epochs=None)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    resumed = iterate(source, format="chat", epochs=None)
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        assert all(np.array_equal(got[k], w[k]) for k in w)


def test_processes_read_disjoint_records_that_cover_an_epoch():
    source = records(101, "text")
    parts = [all_segments(iterate(source, batch_size=2, process_index=p, process_count=2)) for p in range(2)]
    first = next(iterate(source, batch_size=2, process_index=0, process_count=2))
    assert first["inputs"].shape == (1, SEQ_LEN)
    a, b = (Counter(map(key, p)) for p in parts)
    assert a and b and not a & b
    assert a + b == Counter(map(key, rendered(source, "text")))


def test_shuffle_is_deterministic_in_the_seed_and_new_each_epoch():
    source = records(100, "text")
    first = [next(iterate(source, seed=s))["inputs"] for s in (0, 0, 1)]
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first[0], first[2])
    order = [key(s) for s in all_segments(iterate(source, batch_size=1, epochs=2))]  # one row keeps the order
    assert sorted(order[:100]) == sorted(order[100:]) and order[:100] != order[100:]


def test_reads_bytes_as_tfds_gives_them():
    source = records(10, "chat")
    as_bytes = [{k: v.encode() for k, v in r.items()} for r in source]
    got = all_segments(iterate(as_bytes, batch_size=1, format="chat"))
    assert got and got == all_segments(iterate(source, batch_size=1, format="chat"))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="format"):
        iterate(records(4, "text"), format="json")
    with pytest.raises(ValueError, match="divisible"):
        iterate(records(4, "text"), batch_size=3, process_count=2)


def test_throughput():
    """Reports speed only: tokens/s of whole [rows, seq_len] batches, padding included, and how full they are."""
    source = [{"text": f"record {i}: " + "lorem ipsum " * (i % 16)} for i in range(20_000)]
    start = time.perf_counter()
    it = pipeline.make_iterator(source, tokenizer=TOK, seq_len=512, batch_size=32, epochs=1)
    n, used = np.sum([(b["inputs"].size, np.count_nonzero(b["segment_ids"])) for b in it], axis=0)
    seconds = time.perf_counter() - start
    print(f"pipeline: {n / seconds:,.0f} tokens/s, {used / n:.1%} of them document tokens ({seconds:.2f} s)")
