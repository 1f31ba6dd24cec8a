import numpy as np
import pytest

from llmjax.data.tokenizer import ByteTokenizer, get_tokenizer

TEXT = "héllo wörld ✓ 日本"


def test_round_trip_unicode():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == len(TEXT.encode("utf-8")) + 2
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == TEXT
    assert tok.decode(np.array(ids, np.int32)) == TEXT


def test_layout_and_specials():
    tok = ByteTokenizer()
    assert tok.special_ids == {"pad": 0, "bos": 1, "eos": 2, "<|user|>": 3, "<|assistant|>": 4, "<|end|>": 5}
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 262)
    assert tok.encode("a") == [ord("a") + 6]
    assert tok.decode(list(tok.special_ids.values())) == ""
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]) == "hi"


def test_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    assert tok.decode([0xFF + 6, ord("a") + 6]) == "\ufffda"


def test_out_of_range_ids_raise():
    with pytest.raises(ValueError):
        ByteTokenizer().decode([262])


def test_get_tokenizer():
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="byte"):
        get_tokenizer("gpt2")
