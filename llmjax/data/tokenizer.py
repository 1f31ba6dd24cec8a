"""Tokenizers: a byte-level one that needs no training or files, so every stage runs out of the box,
sentencepiece models (BPE or unigram) trained here with the same special tokens at the same ids, and Hugging Face
tokenizer folders ("hf:DIR", llmjax.data.hf_tokenizer) to fine-tune pretrained models in their own vocabulary.

    python -m llmjax.data.tokenizer train --input=docs/,more.jsonl --vocab_size=8000 --model_type=bpe --out=tok.model

`get_tokenizer("synthetic")` loads the model shipped beside this file, trained on the built-in synthetic corpus
(100,000 task lines, seed 0) by exactly this command, which reproduces it (sentencepiece trains deterministically):

    python -m llmjax.data.tokenizer train --input=synthetic --vocab_size=303 --model_type=bpe \\
        --out=llmjax/data/synthetic.model

Its 303 pieces are 7 specials (pad, bos, eos, the chat markers, unk), 256 byte-fallback bytes and the corpus's 40
characters, with no merges: one token per character. The tasks (reverse, sort, copy, add, lookup) work on
characters, and merges cost accuracy on them. Measured after the default pretraining and SFT runs (chat accuracy;
sort in brackets): 303 pieces 22.8% (80%), 310 pieces (7 merges: " =", "re", "co", ...) 19.1% (64%), 320 pieces
(17 merges, up to "lookup") 13.8% (38%), bytes 23.4% (84%).
"""

import io
import itertools
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import sentencepiece as spm

from llmjax.data import tasks

if TYPE_CHECKING:
    from llmjax.data.hf_tokenizer import HFTokenizer

# Specials come first so their ids never depend on the byte table; the chat markers are reserved for SFT.
SPECIAL_TOKENS = ("pad", "bos", "eos", "<|user|>", "<|assistant|>", "<|end|>")
_OFFSET = len(SPECIAL_TOKENS)
_MARKERS = SPECIAL_TOKENS[3:]
_TRAIN_HINT = "python -m llmjax.data.tokenizer train --input=... --out=tok.model"
SYNTHETIC_MODEL = Path(__file__).with_name("synthetic.model")


def _check_ids(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    return ids


class ByteTokenizer:
    """UTF-8 bytes shifted past the special tokens: byte b has id b + len(SPECIAL_TOKENS)."""

    pad_id = SPECIAL_TOKENS.index("pad")
    bos_id = SPECIAL_TOKENS.index("bos")
    eos_id = SPECIAL_TOKENS.index("eos")
    vocab_size = _OFFSET + 256

    @property
    def special_ids(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(SPECIAL_TOKENS)}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [b + _OFFSET for b in text.encode("utf-8")]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Drops special tokens, so a generated sequence decodes to its text alone."""
        ids = _check_ids(ids, self.vocab_size)
        data = (ids[ids >= _OFFSET] - _OFFSET).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A sentencepiece .model behind ByteTokenizer's interface.

    Any model loads if it has pad, bos and eos ids and the chat markers as pieces (control or user-defined
    symbols), because the chat template and the samplers need them; `train` makes such models.
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist; train one with {_TRAIN_HINT}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except RuntimeError as e:
            raise ValueError(f"tokenizer model {path!r} is not a sentencepiece model ({e})") from None
        ids = {"pad": self._sp.pad_id(), "bos": self._sp.bos_id(), "eos": self._sp.eos_id()}
        ids |= {marker: self._sp.piece_to_id(marker) for marker in _MARKERS}  # an unknown piece maps to unk
        missing = [token for token, i in ids.items() if i < 0 or i == self._sp.unk_id()]
        if missing:
            raise ValueError(f"tokenizer model {path!r} lacks the special tokens {missing}; retrain it with "
                             f"{_TRAIN_HINT}, which adds pad/bos/eos and the chat markers")
        self._special_ids = ids
        self._specials = np.array(list(ids.values()))
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.vocab_size = self._sp.get_piece_size()

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self._special_ids)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self._sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Drops special tokens, so a generated sequence decodes to its text alone."""
        ids = _check_ids(ids, self.vocab_size)
        return self._sp.decode(ids[~np.isin(ids, self._specials)].tolist())


Tokenizer = Union[ByteTokenizer, SentencePieceTokenizer, "HFTokenizer"]


def get_tokenizer(name: str) -> Tokenizer:
    """Builds a tokenizer from its config name: "byte", "synthetic" (the shipped model, see the module docstring),
    the path of a sentencepiece .model file, or "hf:DIR", a Hugging Face tokenizer folder."""
    if name.startswith("hf:"):
        from llmjax.data.hf_tokenizer import HFTokenizer  # here, as that module builds on this one

        return HFTokenizer(name[3:])
    if name == "byte":
        return ByteTokenizer()
    if name == "synthetic":
        return SentencePieceTokenizer(str(SYNTHETIC_MODEL))
    if name.endswith(".model"):
        return SentencePieceTokenizer(name)
    raise ValueError(f"unknown tokenizer {name!r}; valid choices: 'byte', 'synthetic', the path of a sentencepiece "
                     ".model file, or hf:DIR (a Hugging Face tokenizer folder)")


def _files(inputs: Sequence[str]) -> list[Path]:
    """Named files whatever their suffix; in directories, every .txt and .jsonl file below them."""
    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"tokenizer training input {str(path)!r} does not exist")
    if not files:
        raise ValueError(f"no .txt or .jsonl files in {list(inputs)}")
    return files


def _lines(inputs: Sequence[str]) -> Iterator[str]:
    """The inputs' non-empty lines: sentencepiece trains on lines, so a .jsonl document's "text" is split too."""
    for path in _files(inputs):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if path.suffix != ".jsonl":
                    if line := line.rstrip("\r\n"):
                        yield line
                elif line.strip():
                    try:
                        doc = json.loads(line)
                    except json.JSONDecodeError:
                        doc = None
                    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                        raise ValueError(f"{path}:{n}: a .jsonl line must be an object with a string \"text\" field")
                    yield from filter(None, doc["text"].splitlines())


def train(inputs: Sequence[str], vocab_size: int, model_type: str, out: str) -> str:
    """Trains a sentencepiece model on the text of `inputs` (files or directories of .txt and .jsonl files
    with a "text" field) and writes it to `out`, a .model path; returns `out`.

    The ids match ByteTokenizer's: pad=0, bos=1, eos=2 and the chat markers 3..5 (control symbols, so text
    that spells "<|end|>" never encodes to the marker, as with bytes); unk is 6. Byte fallback makes every
    string encodable, and identity normalization with whitespace kept as is makes decode(encode(s)) == s.
    Digits are split so arithmetic sees one token per digit. The same inputs give the same model: the sample
    of a big corpus is seeded, and the thread count is sentencepiece's fixed default, not the machine's.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r} is not one of ('bpe', 'unigram')")
    if not out.endswith(".model"):
        raise ValueError(f"out={out!r} must end in .model, the suffix get_tokenizer loads")
    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # process-wide; sentencepiece draws its sample of a big corpus from it
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(inputs), model_writer=model, logstream=quiet,
            vocab_size=vocab_size, model_type=model_type, pad_id=0, bos_id=1, eos_id=2, unk_id=len(SPECIAL_TOKENS),
            control_symbols=list(_MARKERS),  # sentencepiece fills the free ids 3, 4, 5 in this order
            byte_fallback=True, character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            input_sentence_size=5_000_000, shuffle_input_sentence=True,  # a sample bounds memory on big corpora
        )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(model.getvalue())
    return out


def write_synthetic_corpus(path: str, n: int = 100_000, seed: int = 0) -> str:
    """Writes n synthetic task documents, one per line, so a tokenizer can be trained without external data."""
    rng = np.random.default_rng(seed)
    names = list(tasks.TASKS)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(tasks.sample(rng, names).text + "\n" for _ in range(n))
    return path


def _train_cli(inputs: str, vocab_size: int, model_type: str, out: str) -> str:
    """Trains from the CLI's comma-separated --input (or the synthetic corpus) and returns a summary line."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [p for p in inputs.split(",") if p]
        if inputs == "synthetic":
            paths = [write_synthetic_corpus(os.path.join(tmp, "synthetic.txt"))]
        tok = SentencePieceTokenizer(train(paths, vocab_size, model_type, out))
        sample = list(itertools.islice(_lines(paths), 10_000))
    per_char = sum(len(tok.encode(line)) for line in sample) / max(1, sum(map(len, sample)))
    return f"wrote {out}: vocab size {tok.vocab_size}, {per_char:.3f} tokens per character on {len(sample)} input lines"


if __name__ == "__main__":
    from absl import flags

    from llmjax.cli import run_main
    from llmjax.errors import LlmjaxError

    _INPUT = flags.DEFINE_string("input", None, "comma-separated files or directories (.txt, .jsonl with a 'text' "
                                 "field), or 'synthetic' for the built-in task corpus", required=True)
    _VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8000, "pieces in the model, specials and 256 bytes included")
    _MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "sentencepiece algorithm")
    _OUT = flags.DEFINE_string("out", None, "where to write the .model file", required=True)

    def main(argv: list[str]) -> None:
        if argv[1:] != ["train"]:
            raise LlmjaxError(f"expected the command 'train', got {argv[1:]}; run {_TRAIN_HINT}")
        try:
            print(_train_cli(_INPUT.value, _VOCAB_SIZE.value, _MODEL_TYPE.value, _OUT.value))
        except (OSError, ValueError, RuntimeError) as e:
            # Bad inputs and sentencepiece's complaints; errors raised while it reads lines carry a traceback below.
            raise LlmjaxError(str(e).strip().splitlines()[0]) from None

    run_main(main)
