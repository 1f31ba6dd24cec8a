"""C4-style cleaning and de-duplication of raw web-style text, as pure functions over documents (str).

Pipeline, per document in input order (each filter can be switched off in `CurationConfig.enabled`):
  1. line filters drop lines (after stripping; blank lines are dropped uncounted): `terminal_punct`,
     `line_words`, `boilerplate`. A document left with no lines is dropped as `empty`.
  2. document filters see only the surviving lines, as in C4, so a code line that the punctuation filter already
     dropped does not cost the whole page: `lorem_ipsum`, `curly_brace`, `bad_words`, `min_sentences`, `min_words`.
  3. `exact_dedup` drops a document whose normalised text (lower case, whitespace collapsed) was kept before.
  4. `minhash` drops a document whose word-shingle Jaccard similarity with a kept one reaches the threshold.
A line or document is counted against the first filter that rejects it, so the counts add up. Kept documents are
their surviving lines joined by newlines. Everything is deterministic: no Python `hash()`, seeded permutations.

Thresholds follow the released C4 code (tensorflow_datasets c4_utils): lines need 5 words, pages 3 sentences. The
C4 paper's text says 3 words and 5 sentences; the code is what built the dataset. `min_words` (50) is Gopher's
lower bound, since a 3-sentence page of one-word sentences says nothing.
"""

import dataclasses
import functools
import hashlib
import re
import zlib
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

LINE_FILTERS = ("terminal_punct", "line_words", "boilerplate")
DOC_FILTERS = ("lorem_ipsum", "curly_brace", "bad_words", "min_sentences", "min_words")
DEDUP_FILTERS = ("exact_dedup", "minhash")
FILTERS = LINE_FILTERS + DOC_FILTERS + DEDUP_FILTERS
# What `curate` reports, in pipeline order: input sizes, lines removed by each line filter, documents removed by
# `empty` and each later filter, and the documents kept.
COUNT_KEYS = ("docs_in", "lines_in", *LINE_FILTERS, "empty", *DOC_FILTERS, *DEDUP_FILTERS, "docs_out")

END_MARKS = (".", "!", "?", '"', "\u201d")  # C4's marks, plus the typographic closing quote
# C4 drops "javascript must be enabled" notices and cookie/policy lines by these substrings (lower-cased).
BOILERPLATE = ("javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
               "use cookies")
# A deliberately short stand-in for C4's "List of Dirty, Naughty, Obscene or Otherwise Bad Words"; pass the real
# list as `bad_words` (the CLI's --bad_words_file). Such lists also remove benign pages (medical, LGBTQ+ topics),
# which is why this filter can be switched off.
BAD_WORDS = ("fuck", "fucked", "fucking", "motherfucker", "shit", "bullshit", "asshole")

_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_WORD = re.compile(r"\w+")
_PRIME = np.uint64((1 << 61) - 1)  # universal hashing (a*x + b) mod p; x, a, b < 2**32 keep a*x + b below 2**64


@dataclasses.dataclass(frozen=True)
class CurationConfig:
    """Which filters run and their thresholds; defaults are C4's (see the module docstring)."""

    enabled: frozenset[str] = frozenset(FILTERS)
    min_line_words: int = 5
    min_sentences: int = 3
    min_words: int = 50
    boilerplate: tuple[str, ...] = BOILERPLATE
    bad_words: tuple[str, ...] = BAD_WORDS
    shingle_words: int = 5        # word n-grams MinHash compares
    num_perm: int = 128           # MinHash permutations
    bands: int = 16               # LSH bands of num_perm // bands rows: 16 x 8 finds pairs from Jaccard ~0.7 up
    minhash_threshold: float = 0.8  # exact shingle Jaccard at which a candidate pair counts as a duplicate
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "enabled", frozenset(self.enabled))
        unknown = sorted(self.enabled - set(FILTERS))
        if unknown:
            raise ValueError(f"unknown filters {unknown}; choose from {', '.join(FILTERS)}")
        if self.bands < 1 or self.num_perm % self.bands:
            raise ValueError(f"bands={self.bands} must divide num_perm={self.num_perm}")
        if not 0 < self.minhash_threshold <= 1:
            raise ValueError(f"minhash_threshold={self.minhash_threshold} must be in (0, 1]")
        if self.shingle_words < 1:
            raise ValueError(f"shingle_words={self.shingle_words} must be at least 1")

    def without(self, *names: str) -> "CurationConfig":
        """This config with the named filters switched off."""
        return dataclasses.replace(self, enabled=self.enabled - set(names))


def count_sentences(text: str) -> int:
    """Runs of end marks (optionally closed by a quote or bracket) before whitespace: a cheap sentence count."""
    return len(_SENTENCE_END.findall(text))


@functools.cache
def _bad_word_pattern(words: tuple[str, ...]) -> re.Pattern | None:
    """Whole-word (or whole-phrase) matches only, so a bad word inside an innocent longer word does not count."""
    words = tuple(w.strip().lower() for w in words if w.strip())
    if not words:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)")


def reject_line(line: str, cfg: CurationConfig) -> str | None:
    """The first enabled line filter that drops this (stripped, non-empty) line, or None to keep it."""
    on = cfg.enabled
    if "terminal_punct" in on and (not line.endswith(END_MARKS) or line.endswith("...")):
        return "terminal_punct"
    if "line_words" in on and len(line.split()) < cfg.min_line_words:
        return "line_words"
    if "boilerplate" in on and any(p in line.lower() for p in cfg.boilerplate):
        return "boilerplate"
    return None


def reject_doc(text: str, cfg: CurationConfig) -> str | None:
    """The first enabled document filter that drops this (line-filtered) document, or None to keep it."""
    on, lower = cfg.enabled, text.lower()
    if "lorem_ipsum" in on and "lorem ipsum" in lower:
        return "lorem_ipsum"
    if "curly_brace" in on and "{" in text:
        return "curly_brace"
    if "bad_words" in on and (pattern := _bad_word_pattern(cfg.bad_words)) and pattern.search(lower):
        return "bad_words"
    if "min_sentences" in on and count_sentences(text) < cfg.min_sentences:
        return "min_sentences"
    if "min_words" in on and len(text.split()) < cfg.min_words:
        return "min_words"
    return None


def normalise(text: str) -> str:
    """What exact de-duplication compares: case and whitespace differences do not make a document new."""
    return " ".join(text.lower().split())


def shingles(text: str, n: int) -> np.ndarray:
    """Sorted unique 32-bit hashes (crc32: stable across runs) of the text's lower-cased word n-grams; a text of
    fewer than n words is one shingle, a text without words has none."""
    words = _WORD.findall(text.lower())
    grams = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()
    return np.unique(np.array([zlib.crc32(g.encode()) for g in grams], dtype=np.uint64))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique shingle arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class MinHashIndex:
    """Near-duplicate detection over the documents kept so far. MinHash signatures are split into LSH bands; documents
    sharing any band are candidates, and a candidate is confirmed by exact shingle Jaccard, so banding only decides
    what gets compared. Comparing against kept documents only means no two kept documents are near duplicates."""

    def __init__(self, cfg: CurationConfig):
        rng = np.random.default_rng(cfg.seed)
        self._a = rng.integers(1, 1 << 32, cfg.num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 32, cfg.num_perm, dtype=np.uint64)
        self._cfg = cfg
        self._buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
        self._kept: list[np.ndarray] = []

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """Per permutation, the smallest permuted shingle hash: equal entries estimate the Jaccard similarity."""
        return ((hashes[:, None] * self._a + self._b) % _PRIME).min(axis=0)

    def add_if_new(self, text: str) -> bool:
        """False if text is a near duplicate of a kept document; otherwise keeps it (for later comparisons), True."""
        hashes = shingles(text, self._cfg.shingle_words)
        if not len(hashes):
            return True
        rows = self._cfg.num_perm // self._cfg.bands
        sig = self.signature(hashes)
        keys = [(band, sig[band * rows:(band + 1) * rows].tobytes()) for band in range(self._cfg.bands)]
        candidates = sorted({i for key in keys for i in self._buckets.get(key, ())})
        if any(jaccard(hashes, self._kept[i]) >= self._cfg.minhash_threshold for i in candidates):
            return False
        for key in keys:
            self._buckets[key].append(len(self._kept))
        self._kept.append(hashes)
        return True


def curate(docs: Iterable[str], cfg: CurationConfig = CurationConfig()) -> tuple[list[str], dict[str, int]]:
    """Cleans and de-duplicates docs; returns the kept documents and COUNT_KEYS -> count (line filters count lines,
    the rest documents; disabled filters count 0)."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    seen: set[bytes] = set()
    index = MinHashIndex(cfg) if "minhash" in cfg.enabled else None
    kept = []
    for doc in docs:
        counts["docs_in"] += 1
        lines = [s for s in (line.strip() for line in doc.splitlines()) if s]
        counts["lines_in"] += len(lines)
        good = []
        for line in lines:
            reason = reject_line(line, cfg)
            if reason:
                counts[reason] += 1
            else:
                good.append(line)
        text = "\n".join(good)
        reason = reject_doc(text, cfg) if text else "empty"
        if reason is None and "exact_dedup" in cfg.enabled:
            digest = hashlib.blake2b(normalise(text).encode(), digest_size=16).digest()
            reason = "exact_dedup" if digest in seen else None
            seen.add(digest)
        if reason is None and index is not None and not index.add_if_new(text):
            reason = "minhash"
        if reason:
            counts[reason] += 1
        else:
            kept.append(text)
    counts["docs_out"] = len(kept)
    return kept, counts
