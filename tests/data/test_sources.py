import json
import os
import re

import pytest
import tensorflow_datasets as tfds

from llmjax.data import sources


def write(folder, files: dict[str, str | bytes | list]) -> str:
    """Writes name -> text, raw bytes, or a list of JSON objects (one per line) under folder."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            content = "".join(json.dumps(obj) + "\n" for obj in content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(folder)


def read(folder, data_dir, split="train", validation=0.0, **options) -> list[dict]:
    """The records of a split; with no validation split unless asked, so all of them are in train, in order."""
    return list(sources.load(f"files:{folder}", str(data_dir), split, validation=validation, **options))


def test_text_reads_back_in_file_then_line_order(tmp_path):
    folder = write(tmp_path / "in", {
        "b.jsonl": [{"text": "j1", "id": 7}, {"text": "j2 \u2028 é"}],
        "a.txt": "first doc\nits second line\n\n\nsecond doc\r\n",
        "sub/c.txt": "nested",
        "notes.md": "not read",
    })
    records = sources.load(f"files:{folder}", str(tmp_path / "tfds"), "train", kind="text", validation=0)
    expected = ["first doc\nits second line", "second doc", "j1", "j2 \u2028 é", "nested"]
    assert list(records) == [{"text": t} for t in expected]
    assert len(records) == 5 and records[-1] == {"text": "nested"}
    with pytest.raises(IndexError):
        records[5]


def test_python_file_is_one_document_and_installed_packages_are_skipped(tmp_path, caplog):
    code = "import os\n\n\ndef f():\n    return 1\n\n\nclass C:\n    pass\n"
    folder = write(tmp_path / "lib", {
        "mod.py": code, "pkg/__init__.py": "x = 1\n\ny = 2\n", "notes.txt": "a\n\nb", "empty/__init__.py": "",
        "site-packages/numpy/core.py": "installed", "pkg/dist-packages/six.py": "installed",
    })
    assert read(folder, tmp_path / "tfds", strict=True) == [{"text": t} for t in (code, "a", "b", "x = 1\n\ny = 2\n")]
    assert not [r for r in caplog.records if r.name == sources.logger.name]  # an empty __init__.py is no problem
    # A folder named explicitly is read, even an installed package's.
    assert read(tmp_path / "lib" / "site-packages", tmp_path / "tfds") == [{"text": "installed"}]


@pytest.mark.parametrize("kind, lines, expected", [
    ("sft", [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "", "meta": 1}],
     [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": ""}]),
    ("preference", [{"prompt": "p", "chosen": "good", "rejected": "bad"},
                    {"prompt": "q", "responses": ["best", "middle", "worst"]}],
     [{"prompt": "p", "responses": ["good", "bad"]}, {"prompt": "q", "responses": ["best", "middle", "worst"]}]),
    ("prompts", [{"prompt": "add 1 + 2 = "}], [{"prompt": "add 1 + 2 = "}]),
])
def test_each_kind_reads_back_and_is_inferred(tmp_path, kind, lines, expected):
    folder = write(tmp_path / "in", {"data.jsonl": lines})
    builder = sources.prepare(folder, kind="auto", data_dir=str(tmp_path / "tfds"), validation=0)
    assert set(builder.info.features) == set(sources.KINDS[kind]) | ({"extra_json"} if kind == "prompts" else set())
    assert read(folder, tmp_path / "tfds", kind=kind) == expected
    assert read(folder, tmp_path / "tfds") == expected  # inferred from the first record


def test_prompts_from_txt_blocks(tmp_path):
    folder = write(tmp_path / "in", {"p.txt": "sort 321 = \n\nreverse abc = "})
    assert read(folder, tmp_path / "tfds", kind="prompts") == [{"prompt": "sort 321 = "}, {"prompt": "reverse abc = "}]


def test_prompts_keep_their_other_fields_in_both_splits(tmp_path):
    lines = [{"prompt": f"q{i}", "answer": i, "meta": {"k": [1, 2.5, None]}, "id": f"x{i}", "ok": i % 2 == 0}
             for i in range(60)] + [{"prompt": "bare"}]
    folder = write(tmp_path / "in", {"p.jsonl": lines, "t.txt": "a prompt\n\nanother"})
    splits = [read(folder, tmp_path / "tfds", split, validation=0.3, kind="prompts", strict=True)
              for split in ("train", "validation")]
    assert all(splits) and sorted(splits[0] + splits[1], key=str) == sorted(
        [*lines, {"prompt": "a prompt"}, {"prompt": "another"}], key=str)
    assert all(type(r.get("answer", 0)) is int and type(r.get("ok", True)) is bool for r in splits[0] + splits[1])


def test_validation_split_follows_content(tmp_path):
    docs = [{"text": f"document {i}"} for i in range(300)]
    folder = write(tmp_path / "in", {"a.jsonl": docs[:200]})
    train, validation = (read(folder, tmp_path / "tfds", split, validation=0.1) for split in ("train", "validation"))
    assert 5 < len(validation) < 50 and sorted(train + validation, key=str) == sorted(docs[:200], key=str)
    write(tmp_path / "in", {"b.jsonl": docs[200:]})  # more files: every earlier record keeps its split
    for split, before in (("train", train), ("validation", validation)):
        after = read(folder, tmp_path / "tfds", split, validation=0.1)
        assert set(map(str, before)) < set(map(str, after))


def test_empty_split_is_not_written(tmp_path):
    folder = write(tmp_path / "in", {"a.txt": "one document"})
    assert read(folder, tmp_path / "tfds") == [{"text": "one document"}]
    with pytest.raises(ValueError, match=r"Unknown split 'validation'.*no records is not written"):
        read(folder, tmp_path / "tfds", "validation")


def test_prepared_once_then_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    folder = write(tmp_path / "in", {"a.jsonl": [{"text": "old"}], "b.txt": "kept"})
    data_dir = str(tmp_path / "tfds")
    first = sources.prepare(folder, data_dir=data_dir, validation=0)

    def fail(*args):
        raise AssertionError("inputs were read again")

    monkeypatch.setattr(sources, "_items", fail)
    assert sources.prepare(folder, data_dir=data_dir, validation=0).data_dir == first.data_dir
    path = tmp_path / "in" / "a.jsonl"
    stat = path.stat()
    write(tmp_path / "in", {"a.jsonl": [{"text": "new"}]})  # same size: only the modification time tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="read again"):
        sources.prepare(folder, data_dir=data_dir, validation=0)
    monkeypatch.undo()
    second = sources.prepare(folder, data_dir=data_dir, validation=0)
    assert second.data_dir != first.data_dir
    assert list(sources.Records(second.as_data_source("train"))) == [{"text": "new"}, {"text": "kept"}]


class TinyCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A named dataset as tfds would prepare it, with one text and one sequence feature."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see sources._FilesBuilder

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "tags": tfds.features.Sequence(tfds.features.Text())}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield "only", {"text": "héllo", "tags": ["a", "b"]}


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="'tiny_corpus' is neither .*`tfds build tiny_corpus"):
        sources.load("tfds:tiny_corpus", data_dir, "train")
    TinyCorpus(data_dir=data_dir).download_and_prepare(file_format="array_record")
    assert list(sources.load("tfds:tiny_corpus", data_dir, "train")) == [{"text": "héllo", "tags": ["a", "b"]}]
    with pytest.raises(FileNotFoundError, match="'mnist' is not prepared in .* --file_format=array_record"):
        sources.load("tfds:mnist", data_dir, "train")
    builder = sources.prepare(write(tmp_path / "in", {"a.txt": "doc"}), data_dir=data_dir, validation=0)
    name = f"{builder.name}/{builder.builder_config.name}"  # a files: build is a tfds dataset too
    assert list(sources.load(f"tfds:{name}", data_dir, "train")) == [{"text": "doc"}]


@pytest.mark.parametrize("files, kind, message, kept", [
    ({"a.jsonl": '{"text": "ok"}\n{"text": "x"\n'}, "text",
     r"a\.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 13\); line skipped", ["ok"]),
    ({"a.jsonl": '{"text": "ok"}\n\n["text"]\n'}, "text", r"a\.jsonl:3: not a JSON object but list", ["ok"]),
    ({"a.jsonl": '{"text": "ok"}\n{"text": 3}\n'}, "text", r'a\.jsonl:2: "text" is int, not a string', ["ok"]),
    ({"p.jsonl": [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "q", "chosen": "c"}]}, "preference",
     r'p\.jsonl:2: preference record lacks "rejected"; record skipped', [["c", "r"]]),
    ({"p.jsonl": [{"prompt": "p", "responses": ["c", "r"]}, {"prompt": "q", "responses": ["only"]}]}, "preference",
     r'p\.jsonl:2: "responses" is not a list of two or more strings', [["c", "r"]]),
    ({"p.jsonl": [{"prompt": "p", "responses": ["c", "r"]}, {"prompt": "q", "responses": ["c", "r"], "chosen": "c"}]},
     "preference", r'p\.jsonl:2: has both "responses" and "chosen"/"rejected"', [["c", "r"]]),
    ({"s.jsonl": [{"prompt": "p", "response": "r"}], "t.txt": "text"}, "sft",
     r"t\.txt: a \.txt file holds plain text, not sft records \(use \.jsonl\); file skipped", ["r"]),
    ({"s.jsonl": [{"prompt": "p", "chosen": "c", "rejected": "r"}], "m.py": "x = 1"}, "preference",
     r"m\.py: a \.py file holds plain text, not preference records \(use \.jsonl\); file skipped", [["c", "r"]]),
    ({"a.txt": b"caf\xe9\n\nok"}, "text", r"a\.txt:1: invalid UTF-8 \(byte 3\); undecodable bytes replaced",
     ["caf\ufffd", "ok"]),
])
def test_bad_input_is_reported_and_skipped_or_raised(tmp_path, caplog, files, kind, message, kept):
    folder = write(tmp_path / "in", files)
    records = read(folder, tmp_path / "tfds", kind=kind)
    assert [next(v for k, v in r.items() if k != "prompt") for r in records] == kept
    assert any(os.path.join(folder, "") in r.message and re.search(message, r.message)
               for r in caplog.records), caplog.text
    with pytest.raises(ValueError, match=message.split(";")[0]):
        read(folder, tmp_path / "tfds", kind=kind, strict=True)


def test_invalid_utf8_can_skip_the_file(tmp_path, caplog):
    folder = write(tmp_path / "in", {"a.jsonl": b'{"text": "ok"}\n{"text": "\xff"}\n', "b.txt": "fine"})
    builder = sources.prepare(folder, data_dir=str(tmp_path / "tfds"), invalid_utf8="skip", validation=0)
    assert list(sources.Records(builder.as_data_source("train"))) == [{"text": "fine"}]
    assert "a.jsonl:2: invalid UTF-8 (byte 25); file skipped" in caplog.text


def test_empty_files_are_only_noted(tmp_path, caplog):
    folder = write(tmp_path / "in", {"a.txt": "", "b.jsonl": "\n \n", "c.txt": "doc"})
    assert read(folder, tmp_path / "tfds", strict=True) == [{"text": "doc"}]
    assert "a.txt: empty file; skipped" in caplog.text and "b.jsonl: empty file; skipped" in caplog.text
    write(tmp_path / "in", {"c.txt": "\n"})
    with pytest.raises(ValueError, match="cannot infer the record kind"):
        read(folder, tmp_path / "tfds")
    with pytest.raises(ValueError, match=r"no usable text records in 3 files"):
        read(folder, tmp_path / "tfds", kind="text")


def test_unusable_sources_say_why(tmp_path):
    write(tmp_path / "in", {"notes.md": "x"})
    for source, error, message in [
        (f"files:{tmp_path / 'in'}", ValueError, "no .txt, .jsonl or .py files at"),
        (f"files:{tmp_path / 'missing'}", FileNotFoundError, "does not exist"),
        ("hf:lm1b", ValueError, "is not files:PATH or tfds:NAME"),
        ("tfds:", ValueError, "is not files:PATH or tfds:NAME"),
    ]:
        with pytest.raises(error, match=message):
            sources.load(source, str(tmp_path / "tfds"), "train")
    with pytest.raises(ValueError, match="kind='chat' is not one of"):
        sources.prepare(str(tmp_path / "in"), kind="chat", data_dir=str(tmp_path / "tfds"))


def test_an_input_with_no_valid_json_says_so_at_its_first_line(tmp_path, caplog):
    folder = write(tmp_path / "in", {"a.jsonl": '{"text": "unclosed\n{text: 1}\n'})
    with pytest.raises(ValueError, match=r"a\.jsonl:1: not valid JSON \(.*\), as is every other line \(2 in all\); "
                                         "write one JSON object per line$"):
        read(folder, tmp_path / "tfds")
    with pytest.raises(ValueError, match=r"no usable sft records in 1 files; the first of 2 problems: .*a\.jsonl:1: "
                                         r"not valid JSON"):
        read(folder, tmp_path / "tfds", kind="sft")
    assert not [r for r in caplog.records if r.name == sources.logger.name]  # the one error, not a warning per line


def test_unknown_fields_are_named_with_the_fields_to_use(tmp_path):
    folder = write(tmp_path / "in", {"a.jsonl": [{"id": 1, "colour": "red"}, {"id": 2}]})
    with pytest.raises(ValueError) as e:
        read(folder, tmp_path / "tfds")
    assert re.search(r"cannot infer the record kind: the records hold 'colour', 'id', and none has a \"text\"",
                     str(e.value)) and '"prompt" and "response" (SFT)' in str(e.value), e.value
    assert "kind=" not in str(e.value)  # no option a config could set


def test_a_folder_without_readable_files_says_what_it_holds(tmp_path):
    folder = write(tmp_path / "in", {"a.csv": "x", "b.csv": "y", "c.md": "z"})
    with pytest.raises(ValueError, match=r"no \.txt, \.jsonl or \.py files at .* \(found: 2 \.csv, 1 \.md\); write "):
        read(folder, tmp_path / "tfds")


def test_degenerate_records_are_counted_per_split(tmp_path):
    sft = [{"prompt": f"p{i}", "response": " " if i % 4 == 0 else f"r{i}"} for i in range(40)]
    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"c{i}" if i % 5 == 0 else "x"} for i in range(40)]
    ranked = [{"prompt": "p", "responses": ["same", "other", "same"]}, {"prompt": "q", "responses": ["a", "b", "c"]}]
    for name, lines, degenerate in (("sft", sft, sft[::4]), ("pairs", pairs, pairs[::5]), ("ranked", ranked, [0])):
        folder = write(tmp_path / name, {"a.jsonl": lines})
        for validation in (0.0, 0.5):
            splits = {s: sources.load(f"files:{folder}", str(tmp_path / "tfds"), s, validation=validation)
                      for s in (("train",) if validation == 0 else ("train", "validation"))}
            assert sum(r.degenerate for r in splits.values()) == len(degenerate), (name, validation)
            assert sum(len(r) for r in splits.values()) == len(lines)
    assert sources.load(f"files:{folder}", str(tmp_path / "tfds"), "train[:1]", validation=0.0).degenerate is None


def test_a_runs_source_problems_are_one_config_error(tmp_path):
    from llmjax import config

    cfg = config.base("tiny")
    cfg.data.data_dir = str(tmp_path / "tfds")
    cfg.data.source = f"files:{tmp_path / 'missing'}"
    with pytest.raises(config.LlmjaxError, match=r"^data.source='files:.*missing': '.*missing' does not exist"):
        sources.for_run(cfg, "train")
    cfg.data.source = "files:" + write(tmp_path / "in", {"a.txt": "one document"})
    assert list(sources.for_run(cfg, "train")) == [{"text": "one document"}]
    with pytest.raises(config.LlmjaxError, match=r"has no validation records \(.*Unknown split 'validation'.*\); "
                                                 r"raise --config.data.validation or set --config.eval_every=0$"):
        sources.for_run(cfg, "validation")
