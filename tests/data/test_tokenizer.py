import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from llmjax import config
from llmjax.data import tasks, tokenizer
from llmjax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, get_tokenizer
from llmjax.models import presets
from llmjax.train import registry

TEXT = "héllo wörld ✓ 日本"
UNSEEN = "héllo wörld ✓ 日本 🙂"  # none of it is in the training corpus: byte fallback carries it
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory with synthetic task lines and, one level down, a .jsonl of two-line "zebra" documents."""
    root = tmp_path_factory.mktemp("corpus")
    tokenizer.write_synthetic_corpus(str(root / "tasks.txt"), n=1000, seed=0)
    (root / "sub").mkdir()
    docs = [json.dumps({"text": "zebra\nzebra"})] * 50 + [""]
    (root / "sub" / "docs.jsonl").write_text("\n".join(docs), encoding="utf-8")
    return root


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def model(request, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(request.param) / "tok.model")
    assert tokenizer.train([str(corpus)], vocab_size=400, model_type=request.param, out=out) == out
    return out


def test_sentencepiece_round_trip_unicode(model):
    tok = get_tokenizer(model)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 400
    for text in (UNSEEN, "add 12 + 345 = 357", "  two  spaces\n\ttab "):
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text
        assert tok.decode(np.array(ids, np.int32)) == text
    assert len(tok.encode("zebra")) == 1  # learnt from the .jsonl, so directories and documents were read
    assert len(tok.encode("12345")) == 5  # digits split


def test_sentencepiece_specials_match_bytes(model):
    tok, byte = get_tokenizer(model), ByteTokenizer()
    assert tok.special_ids == byte.special_ids
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (byte.pad_id, byte.bos_id, byte.eos_id) == (0, 1, 2)
    s = tok.special_ids
    ids = [s["bos"], s["<|user|>"], *tok.encode("hi"), s["<|end|>"], s["<|assistant|>"], s["eos"], s["pad"]]
    assert tok.decode(ids) == "hi"
    assert not set(tok.encode("x<|end|>y")) & set(s.values())  # text never spells a special token


def test_sentencepiece_out_of_range_ids_raise(model):
    with pytest.raises(ValueError, match=r"\[0, 400\)"):
        get_tokenizer(model).decode([400])


def test_model_without_specials_is_rejected(corpus, tmp_path):
    path = tmp_path / "plain.model"
    proto = io.BytesIO()
    with open(os.devnull, "w") as quiet:  # sentencepiece's defaults: no pad, no chat markers
        spm.SentencePieceTrainer.train(input=str(corpus / "tasks.txt"), model_writer=proto, vocab_size=100,
                                       logstream=quiet)
    path.write_bytes(proto.getvalue())
    with pytest.raises(ValueError, match=r"'pad', '<\|user\|>', '<\|assistant\|>', '<\|end\|>'\].*retrain"):
        SentencePieceTokenizer(str(path))


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one with"):
        get_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match=r"\.model"):
        get_tokenizer("tok.vocab")
    (tmp_path / "bad.model").write_text("not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        get_tokenizer(str(tmp_path / "bad.model"))
    with pytest.raises(ValueError, match="unigram"):
        tokenizer.train([str(tmp_path)], vocab_size=300, model_type="wordpiece", out=str(tmp_path / "t.model"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"txt": "typo"}\n')
    with pytest.raises(RuntimeError, match=r"bad.jsonl:3: a .jsonl line must be an object"):
        tokenizer.train([str(tmp_path / "bad.jsonl")], vocab_size=300, model_type="bpe", out=str(tmp_path / "t.model"))
    with pytest.raises(FileNotFoundError, match="nope"):
        tokenizer.train([str(tmp_path / "nope")], vocab_size=300, model_type="bpe", out=str(tmp_path / "t.model"))


def test_synthetic_corpus_is_seeded_task_text(tmp_path):
    def lines(name: str, seed: int) -> list[str]:
        path = tokenizer.write_synthetic_corpus(str(tmp_path / name), n=20, seed=seed)
        return Path(path).read_text(encoding="utf-8").splitlines()

    first = lines("a.txt", seed=3)
    assert len(first) == 20 and all(" = " in line for line in first)
    assert lines("b.txt", seed=3) == first != lines("c.txt", seed=4)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmjax.data.tokenizer", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_cli_trains_a_loadable_model(corpus, tmp_path):
    out = tmp_path / "cli" / "tok.model"
    inputs = f"{corpus / 'tasks.txt'},{corpus / 'sub'}"
    run = _cli("train", f"--input={inputs}", "--vocab_size=320", "--model_type=unigram", f"--out={out}")
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}: vocab size 320" in run.stdout and "tokens per character on 1100 input lines" in run.stdout
    assert get_tokenizer(str(out)).decode(get_tokenizer(str(out)).encode(UNSEEN)) == UNSEEN

    run = _cli("train", f"--input={tmp_path / 'nope'}", f"--out={out}")
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"error: tokenizer training input {str(tmp_path / 'nope')!r} does not exist"]


def test_validate_checks_tokenizer_against_model_vocab(model, tmp_path):
    cfg = config.base("tiny")
    cfg.data.tokenizer = model
    with pytest.raises(config.LlmjaxError, match=r"has 400 tokens but model.vocab_size=320; .*vocab_size=400"):
        registry.validate(cfg, n_devices=1)
    cfg.model.vocab_size = 400
    registry.validate(cfg, n_devices=1)
    for name, message in (("gpt2", "unknown tokenizer 'gpt2'"), (str(tmp_path / "x.model"), "does not exist")):
        cfg.data.tokenizer = name
        with pytest.raises(config.LlmjaxError, match=f"data.tokenizer: .*{message}"):
            registry.validate(cfg, n_devices=1)


def test_shipped_synthetic_model_fits_the_tasks_and_presets():
    tok = get_tokenizer("synthetic")
    assert isinstance(tok, SentencePieceTokenizer) and tok.special_ids == ByteTokenizer().special_ids
    assert all(tok.vocab_size <= presets.preset(name)["vocab_size"] for name in ("tiny", "small"))
    rng = np.random.default_rng(0)
    examples = [tasks.sample(rng, [name]) for name in tasks.TASKS for _ in range(200)]
    for ex in examples:
        ids = tok.encode(ex.text)
        assert tok.decode(ids) == ex.text
        assert len(ids) == len(ex.text), ex.text  # one token per character: no merges (see the tokenizer docstring)
        # What evaluation feeds the model is what it was trained on; a chat answer encoded alone is as in the text.
        assert ids == tok.encode(ex.prompt) + tok.encode(ex.answer), ex.text
    assert tok.decode(tok.encode(UNSEEN, bos=True, eos=True)) == UNSEEN


def test_shipped_synthetic_model_is_reproduced_by_its_documented_command(tmp_path):
    command = re.search(r"python -m llmjax\.data\.tokenizer (train --input=synthetic .*?) --out=(\S+)",
                        " ".join(tokenizer.__doc__.replace("\\\n", " ").split()))
    assert command and Path(ROOT, command[2]) == tokenizer.SYNTHETIC_MODEL, tokenizer.__doc__
    out = tmp_path / "synthetic.model"
    run = _cli(*command[1].split(), f"--out={out}")
    assert run.returncode == 0, run.stderr
    rebuilt, shipped = (spm.SentencePieceProcessor(model_file=str(p)) for p in (out, tokenizer.SYNTHETIC_MODEL))
    assert [rebuilt.id_to_piece(i) for i in range(rebuilt.get_piece_size())] == [
        shipped.id_to_piece(i) for i in range(shipped.get_piece_size())]
