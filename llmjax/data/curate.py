"""Cleans raw web-style text with C4-style heuristics and de-duplication (see llmjax.data.curation):

  python -m llmjax.data.curate --input=raw/ --output=clean.jsonl
  python -m llmjax.data.curate --input=a.jsonl,b.txt --output=clean.jsonl --no_minhash --filters=curly_brace

--input takes files, directories (their .txt and .jsonl files, recursively, sorted) and glob patterns. A .txt file
holds one document per blank-line-separated block (so a document's own paragraphs must not be blank-line separated;
use .jsonl for those); a .jsonl file holds one {"text": ...} object per line. Input problems are reported on stderr
as FILE[:LINE]: reason and worked around: a malformed JSONL line is skipped, invalid UTF-8 is replaced with U+FFFD,
an unreadable file is skipped; with --strict the first one stops the run (exit status 1). Empty files are only noted.
Writes one {"text": ...} line per kept document and prints what each filter removed.
"""

import glob
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from absl import flags

from llmjax.cli import run_main
from llmjax.data.curation import COUNT_KEYS, DEDUP_FILTERS, DOC_FILTERS, LINE_FILTERS, CurationConfig, curate
from llmjax.errors import LlmjaxError

HEURISTICS = LINE_FILTERS + DOC_FILTERS
SUFFIXES = (".txt", ".jsonl")
_DEFAULT = CurationConfig()

_INPUT = flags.DEFINE_list("input", None, "Input files, directories or globs (.txt, .jsonl), comma-separated.",
                           required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The .jsonl file to write.", required=True)
_FILTERS = flags.DEFINE_list("filters", list(HEURISTICS), "Line and document filters to run ('' for none).")
_NO_DEDUP = flags.DEFINE_bool("no_dedup", False, "Skip exact de-duplication.")
_NO_MINHASH = flags.DEFINE_bool("no_minhash", False, "Skip MinHash near-duplicate removal.")
_STRICT = flags.DEFINE_bool("strict", False, "Stop at the first input problem instead of working around it.")
_MIN_LINE_WORDS = flags.DEFINE_integer("min_line_words", _DEFAULT.min_line_words, "Words a line needs.")
_MIN_SENTENCES = flags.DEFINE_integer("min_sentences", _DEFAULT.min_sentences, "Sentences a document needs.")
_MIN_WORDS = flags.DEFINE_integer("min_words", _DEFAULT.min_words, "Words a document needs.")
_THRESHOLD = flags.DEFINE_float("minhash_threshold", _DEFAULT.minhash_threshold,
                                "Word-shingle Jaccard similarity at which a document is a near duplicate.")
_BAD_WORDS_FILE = flags.DEFINE_string("bad_words_file", None,
                                      "One bad word or phrase per line, replacing the short built-in list.")


def _problem(message: str, workaround: str) -> None:
    """Reports an input problem; under --strict it ends the run instead."""
    if _STRICT.value:
        sys.exit(f"error: {message} (--strict)")
    print(f"warning: {message}; {workaround}", file=sys.stderr)


def input_files(specs: list[str]) -> list[str]:
    """The files --input names, in order, each once."""
    files = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.suffix in SUFFIXES and p.is_file())
        else:
            found = [spec] if os.path.exists(spec) else sorted(glob.glob(spec, recursive=True))
        if not found:
            raise LlmjaxError(f"--input={spec}: no such file, and no .txt or .jsonl files match it")
        wrong = [f for f in found if not f.endswith(SUFFIXES)]
        if wrong:
            raise LlmjaxError(f"--input: {wrong[0]} is neither .txt nor .jsonl")
        files += found
    return list(dict.fromkeys(files))


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        _problem(f"{path}: cannot read ({e.strerror})", "file skipped")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        _problem(f"{path}: invalid UTF-8 at byte {e.start}", "undecodable bytes replaced with U+FFFD")
        return data.decode("utf-8-sig", errors="replace")


def read_docs(path: str) -> Iterator[str]:
    """The documents in one .txt or .jsonl file (see the module docstring)."""
    text = _read(path)
    if text is None:
        return
    if not text.strip():
        print(f"warning: {path}: empty file, no documents", file=sys.stderr)
    elif path.endswith(".jsonl"):
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold raw U+2028
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _problem(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})", "line skipped")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                _problem(f'{path}:{n}: not an object with a string "text" field', "line skipped")
                continue
            yield obj["text"]
    else:
        yield from (block for block in re.split(r"\n\s*\n", text) if block.strip())


def _config() -> CurationConfig:
    unknown = sorted(set(_FILTERS.value) - set(HEURISTICS))
    if unknown:
        raise LlmjaxError(f"--filters: unknown {unknown}; choose from {', '.join(HEURISTICS)} "
                          "(de-duplication is switched off with --no_dedup and --no_minhash)")
    enabled = set(_FILTERS.value) | set(DEDUP_FILTERS)
    enabled -= {"exact_dedup"} if _NO_DEDUP.value else set()
    enabled -= {"minhash"} if _NO_MINHASH.value else set()
    bad_words = _DEFAULT.bad_words
    if _BAD_WORDS_FILE.value:
        try:
            with open(_BAD_WORDS_FILE.value, encoding="utf-8", errors="replace") as f:
                bad_words = tuple(w.strip() for w in f if w.strip())
        except OSError as e:
            raise LlmjaxError(f"--bad_words_file={_BAD_WORDS_FILE.value}: cannot read ({e.strerror})") from None
    try:
        return CurationConfig(enabled=frozenset(enabled), min_line_words=_MIN_LINE_WORDS.value,
                              min_sentences=_MIN_SENTENCES.value, min_words=_MIN_WORDS.value,
                              minhash_threshold=_THRESHOLD.value, bad_words=bad_words)
    except ValueError as e:
        raise LlmjaxError(str(e)) from None


def report(counts: dict[str, int], cfg: CurationConfig) -> str:
    """A table of what each filter removed, in pipeline order, as a count and a share of the input."""
    rows = [f"{'filter':<15}{'removed':>10}  {'unit':<6}{'% of input':>10}"]
    for key in COUNT_KEYS[2:]:
        unit, total = ("lines", counts["lines_in"]) if key in LINE_FILTERS else ("docs", counts["docs_in"])
        if key in cfg.enabled or key in ("empty", "docs_out"):
            pct = f"{100 * counts[key] / total:.1f}%" if total else "-"
            rows.append(f"{'kept' if key == 'docs_out' else key:<15}{counts[key]:>10}  {unit:<6}{pct:>10}")
        else:
            rows.append(f"{key:<15}{'off':>10}")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    del argv
    cfg = _config()
    files = input_files(_INPUT.value)
    kept, counts = curate((doc for path in files for doc in read_docs(path)), cfg)
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in kept)
    print(f"read {counts['docs_in']} documents ({counts['lines_in']} lines) from {len(files)} files; "
          f"wrote {len(kept)} to {_OUTPUT.value}")
    print(report(counts, cfg))


if __name__ == "__main__":
    run_main(main)
