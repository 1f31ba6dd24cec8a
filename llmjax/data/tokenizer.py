"""Tokenizers: a byte-level one that needs no training or files, so every stage runs out of the box."""

from collections.abc import Sequence

import numpy as np

# Specials come first so their ids never depend on the byte table; the chat markers are reserved for SFT.
SPECIAL_TOKENS = ("pad", "bos", "eos", "<|user|>", "<|assistant|>", "<|end|>")
_OFFSET = len(SPECIAL_TOKENS)


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
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        data = (ids[ids >= _OFFSET] - _OFFSET).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


_TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str) -> ByteTokenizer:
    """Builds a tokenizer from its config name."""
    if name not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; valid choices: {sorted(_TOKENIZERS)}")
    return _TOKENIZERS[name]()
