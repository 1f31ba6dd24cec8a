"""Training records from a folder of .txt / .jsonl / .py files or a prepared tfds dataset, read with random access:

    records = load("files:/data/chats", data_dir="/data/tfds", split="train")  # prepared on first use, then cached
    records = load("tfds:lm1b", data_dir="/data/tfds", split="validation")     # already prepared in data_dir
    records[0]  # {"prompt": "...", "response": "..."}: plain str (list[str] for "responses")

Files are turned into a tensorflow-datasets builder written as array_record, so both kinds of source are read the
same way (`builder.as_data_source`), with no TensorFlow installed.

Record kinds and the fields they are stored and read back with:
    text        {"text"}
    sft         {"prompt", "response"}
    preference  {"prompt", "responses"}: responses ranked best first. A {"prompt", "chosen", "rejected"} line is
                stored as responses=[chosen, rejected]; a {"prompt", "responses": [...]} line (two or more) as given.
    prompts     {"prompt"}, and a JSON line's other fields as they were ("answer", "id", ...: one string, extra_json)
A .jsonl file holds one JSON object per line; fields beyond its kind's are ignored (but for prompts). A .txt file
holds one document per blank-line-separated block, as in llmjax.data.curate, read as a text record (or a prompt, for
kind "prompts"). A .py file is one document, as code keeps blank lines inside it. In a folder, files below a
site-packages or dist-packages folder are not read: installed packages, which some installs keep inside the standard
library. With kind="auto" the first record decides: a .txt block or .py file is text; a JSON object with "chosen" or
"responses" is preference, else with "response" sft, else with "text" text, else with "prompt" prompts. Later records
that do not fit that kind are input problems, so pass the kind when the first record might mislead.

Input problems are reported as FILE[:LINE]: problem. By default they are logged and worked around (a malformed line
or a record lacking a field is skipped; invalid UTF-8 is replaced with U+FFFD, or its file skipped with
invalid_utf8="skip"); with strict=True the first one raises ValueError. Empty files are only logged, empty .py files
(a package's __init__.py) not even that.

Records that train on nothing are counted per split as the files are prepared (`Records.degenerate`): an SFT
record with an empty response, a preference record whose best response is its worst (chosen == rejected).

Splits: "validation" holds the records whose content hashes into the lowest `validation` fraction (1% by default),
"train" the rest, so a record keeps its split when files are added and duplicates never straddle the two. A split
that would be empty (a handful of records) is not written. Within a split records keep the input order: files
sorted by path, then by line or block.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from llmjax.errors import LlmjaxError

logger = logging.getLogger(__name__)

KINDS = {"text": ("text",), "sft": ("prompt", "response"), "preference": ("prompt", "responses"),
         "prompts": ("prompt",)}
SUFFIXES = (".txt", ".jsonl", ".py")
_WHOLE = (".py",)  # suffixes of files read as one document each
_INSTALLED = {"site-packages", "dist-packages"}
# For kind="auto": the first kind whose key a JSON record has.
_INFER = (("chosen", "preference"), ("responses", "preference"), ("response", "sft"), ("text", "text"),
          ("prompt", "prompts"))
_BUILDER_NAME = "llmjax_files"
_EXTRA = "extra_json"  # the feature holding a prompts record's other fields


@dataclasses.dataclass
class _Report:
    """Reports input problems: raised under strict, else logged with the workaround, or dropped when quiet (the
    builder reads its inputs once per split after a first, reporting pass). Held problems (`held` a list) are
    kept until `release`: an input with no usable record is then refused in one line naming its first problem,
    not after a warning per line."""

    strict: bool = False
    quiet: bool = False
    held: list[str] | None = None

    def __call__(self, where: str, problem: str, workaround: str, fatal: bool = True) -> None:
        if self.strict and fatal:
            raise ValueError(f"{where}: {problem}")
        if self.held is not None:
            self.held.append(f"{where}: {problem}; {workaround}")
        elif not self.quiet:
            logger.warning("%s: %s; %s", where, problem, workaround)

    def release(self) -> None:
        """Logs the held problems, and any later one as it comes."""
        for problem in self.held or ():
            if not self.quiet:
                logger.warning("%s", problem)
        self.held = None


def _find(path: Path) -> list[Path]:
    """The .txt, .jsonl and .py files at `path`: itself, or every one below it but in installed packages, sorted."""
    if path.is_dir():
        files, others = [], Counter()
        for folder, subfolders, names in os.walk(path):  # pruned as it goes: site-packages can hold 100k files
            subfolders[:] = [d for d in subfolders if d not in _INSTALLED]
            files += [f for f in map(Path(folder).joinpath, names) if f.suffix in SUFFIXES and f.is_file()]
            others.update(Path(name).suffix or "suffix-less" for name in names)
        files.sort()
    elif path.is_file():
        files, others = ([path], None) if path.suffix in SUFFIXES else ([], Counter([path.suffix or "suffix-less"]))
    else:
        raise FileNotFoundError(f"{str(path)!r} does not exist; point files: at a folder of .txt / .jsonl / .py files")
    if not files:
        found = ", ".join(f"{n} {suffix}" for suffix, n in others.most_common(3)) if others else "nothing"
        raise ValueError(f"no .txt, .jsonl or .py files at {str(path)!r} (found: {found}); write the records as "
                         ".jsonl (one JSON object per line) or the documents as .txt")
    return files


def _read(path: Path, invalid_utf8: str, report: _Report) -> str | None:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        skip = invalid_utf8 == "skip"
        report(f"{path}:{line}", f"invalid UTF-8 (byte {e.start})",
               "file skipped" if skip else "undecodable bytes replaced with U+FFFD")
        return None if skip else data.decode("utf-8-sig", errors="replace")


def _items(path: Path, invalid_utf8: str, report: _Report) -> Iterator[tuple[int, str, Any]]:
    """(number, where, item) for each block of a .txt file or whole .py file (item: str) or line of a .jsonl file
    (parsed JSON)."""
    text = _read(path, invalid_utf8, report)
    if text is None:
        return
    if path.suffix in _WHOLE:
        if text.strip():  # an empty module (many a package's __init__.py) is usual code, not an input problem
            yield 1, str(path), text
    elif not text.strip():
        report(str(path), "empty file", "skipped", fatal=False)
    elif path.suffix == ".txt":
        blocks = (block.strip("\r\n") for block in re.split(r"\n\s*\n", text) if block.strip())
        yield from ((n, str(path), block) for n, block in enumerate(blocks, 1))
    else:
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold raw U+2028
            if not line.strip():
                continue
            try:
                yield n, f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                report(f"{path}:{n}", f"not valid JSON ({e.msg} at column {e.colno})", "line skipped")


def _record(item: Any, kind: str) -> dict[str, Any] | str:
    """The record of `kind` that a .txt block or a JSON line holds, or what is wrong with it."""
    if isinstance(item, str):
        item = {KINDS[kind][0]: item}
    elif not isinstance(item, dict):
        return f"not a JSON object but {type(item).__name__}"
    fields = KINDS[kind]
    if kind == "preference" and "responses" not in item:
        fields = ("prompt", "chosen", "rejected")
    elif kind == "preference" and {"chosen", "rejected"} & item.keys():
        return 'has both "responses" and "chosen"/"rejected"; give one form'
    missing = [f for f in fields if f not in item]
    if missing:
        return f"{kind} record lacks " + ", ".join(f'"{f}"' for f in missing)
    for f in fields:
        value = item[f]
        if f == "responses":
            if not (isinstance(value, list) and len(value) > 1 and all(isinstance(r, str) for r in value)):
                return '"responses" is not a list of two or more strings (ranked best first)'
        elif not isinstance(value, str):
            return f'"{f}" is {type(value).__name__}, not a string'
    if "chosen" in fields:
        return {"prompt": item["prompt"], "responses": [item["chosen"], item["rejected"]]}
    if kind == "prompts":  # item is this line's own parse; keys sorted, as a split hashes content, not key order
        return {"prompt": item.pop("prompt"), _EXTRA: json.dumps(item, sort_keys=True)}
    return {f: item[f] for f in fields}


def _records(files: list[Path], kind: str, invalid_utf8: str, report: _Report) -> Iterator[tuple[int, dict]]:
    """(key, record) for every good record; keys grow with file then line, so tfds keeps this order."""
    for i, path in enumerate(files):
        if path.suffix != ".jsonl" and kind in ("sft", "preference"):
            report(str(path), f"a {path.suffix} file holds plain text, not {kind} records (use .jsonl)", "file skipped")
            continue
        # Spread over the key space by file: tfds sorts on-disk buckets chosen by the key's top bits.
        start = (i << 128) // len(files)
        for n, where, item in _items(path, invalid_utf8, report):
            record = _record(item, kind)
            if isinstance(record, str):
                report(where, record, "record skipped")
            else:
                yield start + n, record


def _infer_kind(files: list[Path]) -> str:
    """The kind of the first record that has one; else what the records are instead, in one line."""
    report, fields = _Report(quiet=True, held=[]), set()
    for path in files:
        for _, where, item in _items(path, "replace", report):
            kind = "text" if isinstance(item, str) else next(
                (k for key, k in _INFER if isinstance(item, dict) and key in item), None)
            if kind:
                logger.info("%s: records are %s (kind inferred from this record)", where, kind)
                return kind
            fields |= set(item) if isinstance(item, dict) else {f"a JSON {type(item).__name__}"}
    invalid = [p for p in report.held if ": not valid JSON (" in p]
    if invalid and not fields:
        raise ValueError(f"{invalid[0].rsplit(';', 1)[0]}, as is every other line ({len(invalid)} in all); write one "
                         "JSON object per line")
    names = sorted(fields)
    found = f"the records hold {', '.join(map(repr, names[:8]))}{', ...' * (len(names) > 8)}" if names else (
        "every file is empty")
    raise ValueError(f"{os.path.commonpath(files)}: cannot infer the record kind: {found}, and none has a "
                     '"text", "prompt", "response", "chosen" or "responses" field; write records as "text", "prompt" '
                     'and "response" (SFT), "prompt", "chosen" and "rejected" (preference), or "prompt" alone')


def _degenerate(record: dict) -> bool:
    """Whether a record trains on nothing: an SFT record's response is empty (only eos is learnt, to answer
    nothing), a preference record's best response is its worst (chosen == rejected: DPO's and the Bradley-Terry
    loss's gradients are exactly 0)."""
    if "response" in record:
        return not record["response"].strip()
    return "responses" in record and record["responses"][0] == record["responses"][-1]


def _split(record: dict, validation: float) -> str:
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()
    return "validation" if int.from_bytes(digest[:8]) < validation * 2**64 else "train"


class _FilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The records of some files as a tfds dataset; each set of files and options is its own builder config.

    Not registered: tfds reads a prepared one back from its directory (`tfds.builder_from_directory`).
    """

    name = _BUILDER_NAME
    VERSION = tfds.core.Version("1.2.0")  # 1.1.0: counts of degenerate records in metadata.json; 1.2.0: extra_json
    # tfds looks for download checksums beside a builder's code, which for a builder in a package needs the
    # importlib_resources backport (not a tfds dependency); there is nothing to download.
    code_path = None

    def __init__(self, *, files: list[Path], kind: str, strict: bool, invalid_utf8: str, validation: float,
                 **kwargs):
        self._files, self._kind, self._strict = files, kind, strict
        self._invalid_utf8, self._validation = invalid_utf8, validation
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        fields = KINDS[self._kind] + ((_EXTRA,) if self._kind == "prompts" else ())
        features = {f: tfds.features.Sequence(text) if f == "responses" else text for f in fields}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True,  # keep the input order; training samples its own
                                     metadata=tfds.core.MetadataDict())  # the degenerate records of each split

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        """Reads everything once to report problems, find the non-empty splits (tfds rejects empty ones) and count
        each split's degenerate records (Records.degenerate)."""
        del dl_manager
        report = _Report(strict=self._strict, held=[])
        counts, degenerate = Counter(), Counter()
        for _, record in _records(self._files, self._kind, self._invalid_utf8, report):
            report.release()
            split = _split(record, self._validation)
            counts[split] += 1
            degenerate[split] += _degenerate(record)
        if not counts:
            first = f"; the first of {len(report.held)} problems: {report.held[0]}" if report.held else ""
            raise ValueError(f"{os.path.commonpath(self._files)}: no usable {self._kind} records in "
                             f"{len(self._files)} files{first}")
        self.info.metadata["degenerate"] = {split: degenerate[split] for split in counts}
        return {split: self._generate_examples(split) for split in sorted(counts)}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        for key, record in _records(self._files, self._kind, self._invalid_utf8, _Report(quiet=True)):
            if _split(record, self._validation) == split:
                yield key, record


def prepare(path: str, kind: str = "auto", data_dir: str = "~/tensorflow_datasets", strict: bool = False,
            invalid_utf8: str = "replace", validation: float = 0.01) -> tfds.core.DatasetBuilder:
    """Writes the records of `path` (a .txt / .jsonl / .py file or a folder of them) as an array_record tfds dataset
    in `data_dir` and returns its builder (`.as_data_source(split)` reads it).

    It is written once: its directory is named after the input folder and a hash of every file's relative name,
    size and modification time and of the options, so the same call later reuses it without reading the inputs,
    and a changed file makes a new one (old ones are left for you to delete).
    """
    if kind != "auto" and kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {['auto', *KINDS]}")
    if invalid_utf8 not in ("replace", "skip"):
        raise ValueError(f"invalid_utf8={invalid_utf8!r} is not 'replace' or 'skip'")
    if not 0 <= validation < 1:
        raise ValueError(f"validation={validation} must be a fraction in [0, 1)")
    root, data_dir = Path(path).expanduser().resolve(), Path(data_dir).expanduser()
    files = _find(root)
    digest = hashlib.sha256(json.dumps([kind, strict, invalid_utf8, float(validation)]).encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(root) if f != root else f.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    config = re.sub(r"[^\w.-]", "_", root.name) + "-" + digest.hexdigest()[:16]
    build_dir = data_dir / _BUILDER_NAME / config / str(_FilesBuilder.VERSION)
    if not (build_dir / "dataset_info.json").exists():  # tfds renames a finished build into place
        builder = _FilesBuilder(files=files, kind=_infer_kind(files) if kind == "auto" else kind, strict=strict,
                                invalid_utf8=invalid_utf8, validation=validation,
                                config=tfds.core.BuilderConfig(name=config), data_dir=str(data_dir))
        builder.download_and_prepare(file_format="array_record")
    return tfds.builder_from_directory(str(build_dir))


def _plain(value: Any) -> Any:
    """tfds returns text as bytes (lists of them as lists or object arrays); training wants str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.dtype.kind in "OS"):
        return [_plain(v) for v in value]
    return value


class Records(Sequence[dict]):
    """A tfds data source (len, random access, iteration) whose records come back as dicts of str / list[str] (and
    a prompt's other JSON fields). `degenerate`: how many of them train on nothing (see `_degenerate`), as counted
    when a files: source was prepared; None where not known (a tfds dataset prepared elsewhere, a sliced split)."""

    def __init__(self, source: Sequence[dict], degenerate: int | None = None):
        self._source, self.degenerate = source, degenerate

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):  # array_record raises ValueError, and Sequence iterates to IndexError
            raise IndexError(f"record {index} is out of range for {len(self)} records")
        record = _plain(self._source[index % len(self)])
        return record | json.loads(record.pop(_EXTRA, "{}"))  # the pop comes first: extra_json is not returned


class NoSplit(ValueError):
    """The source has no such split: for a files: source, no record of its files fell in it."""


def _tfds_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    hint = (f"prepare it there as array_record first, e.g. `tfds build {name} --data_dir={data_dir} "
            "--file_format=array_record`")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(f"tfds dataset {name!r} is neither in the tfds catalog nor in {data_dir}; check "
                                f"the name, or {hint}") from None
    if not builder.is_prepared():
        raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {data_dir}; {hint}")
    return builder


def load(source: str, data_dir: str, split: str, **options: Any) -> Records:
    """The records of `split` of "files:PATH" (prepared into data_dir with `prepare`'s options if not yet) or
    "tfds:NAME" (NAME[/CONFIG][:VERSION], already prepared as array_record in data_dir). `split` may be sliced
    ("train[:10%]")."""
    scheme, _, rest = source.partition(":")
    if scheme == "files" and rest:
        builder = prepare(rest, data_dir=data_dir, **options)
    elif scheme == "tfds" and rest and not options:
        builder = _tfds_builder(rest, data_dir)
    else:
        raise ValueError(f"data source {source!r} is not files:PATH or tfds:NAME (which takes no options)")
    try:
        data = builder.as_data_source(split)
    except ValueError as e:  # an unknown split
        empty = " (a split with no records is not written)" if scheme == "files" else ""
        raise NoSplit(f"{source}: {str(e).splitlines()[0]}{empty}") from None
    except NotImplementedError as e:  # a dataset prepared as tfrecord
        raise ValueError(f"{source}: {str(e).splitlines()[0]}") from None
    return Records(data, ((builder.info.metadata or {}).get("degenerate") or {}).get(split))


def for_run(cfg, split: str, **options: Any) -> Records:
    """`load` of a run's cfg.data (a files: source with its data.validation and `options`), with any problem of
    the input refused as one LlmjaxError naming data.source: what the CLI prints as its one line, before anything
    compiles."""
    source = cfg.data.source
    options = {"validation": cfg.data.validation, **options} if source.startswith("files:") else {}
    try:
        return load(source, cfg.data.data_dir, split, **options)
    except NoSplit as e:
        fix = "lower --config.data.validation" if split == "train" else (
            "raise --config.data.validation or set --config.eval_every=0")
        raise LlmjaxError(f"data.source={source!r} has no {split} records ({e}); {fix}") from None
    except (OSError, ValueError) as e:
        raise LlmjaxError(f"data.source={source!r}: {str(e).splitlines()[0]}") from None


def check_degenerate(records: Records, source: str, what: str, fix: str) -> None:
    """Warns (one line on the llmjax logger) how many records train on nothing, `what` saying how ("have an empty
    response"); refuses, saying the `fix`, a source where every one does: its run would learn nothing, exit 0."""
    n = records.degenerate
    if not n:
        return
    if n == len(records):
        raise LlmjaxError(f"data.source={source!r}: all {n} records {what}, so training on them learns nothing; {fix}")
    logging.getLogger("llmjax").warning("data.source=%r: %d of %d records %s; they train on nothing", source, n,
                                        len(records), what)
