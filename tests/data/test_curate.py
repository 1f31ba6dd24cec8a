"""The curation CLI: it reads .jsonl and .txt files, reports each bad input as one line (or stops on it with
--strict), writes the kept documents and prints what each filter removed."""

import json
import os
import subprocess
import sys

from tests.data.test_curation import CLEAN, DOC_CASES, OTHER

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmjax.data.curate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_cli_reports_bad_input_and_counts(tmp_path):
    texts = [CLEAN, CLEAN, DOC_CASES["min_words"], DOC_CASES["lorem_ipsum"]]
    lines = [json.dumps({"text": t}) for t in texts]
    lines[1:1] = ["{not json"]  # line 2
    lines.append(json.dumps(["no", "text"]))  # line 6
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.txt").write_text(OTHER + "\n\n\nHome | About | Contact\n")
    (tmp_path / "c.txt").write_bytes(b"")
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe broken bytes")
    out = tmp_path / "out" / "clean.jsonl"
    result = run_cli(f"--input={tmp_path}", f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{tmp_path / 'a.jsonl'}:2: not valid JSON" in result.stderr
    assert f"{tmp_path / 'a.jsonl'}:6: not an object" in result.stderr
    assert f"{tmp_path / 'c.txt'}: empty file" in result.stderr
    assert f"{tmp_path / 'd.txt'}: invalid UTF-8 at byte 0" in result.stderr
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [CLEAN, OTHER]
    table = {row.split()[0]: row.split()[1:] for row in result.stdout.splitlines()[2:]}
    assert table["exact_dedup"] == ["1", "docs", "14.3%"]  # of 7 documents: 4 in a.jsonl, 2 in b.txt, 1 in d.txt
    assert table["lorem_ipsum"][0] == table["min_words"][0] == "1"
    assert table["empty"][0] == "2" and table["kept"][:2] == ["2", "docs"]

    result = run_cli(f"--input={tmp_path}/*.jsonl", f"--output={out}", "--no_dedup", "--filters=")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [CLEAN, DOC_CASES["min_words"]]
    table = {row.split()[0]: row.split()[1] for row in result.stdout.splitlines()[2:]}
    assert table["exact_dedup"] == table["lorem_ipsum"] == "off"
    assert table["minhash"] == "2"  # CLEAN's copy, and the lorem-ipsum doc (CLEAN plus one line)

    result = run_cli(f"--input={tmp_path / 'a.jsonl'}", f"--output={tmp_path / 'strict.jsonl'}", "--strict")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'a.jsonl'}:2: not valid JSON" in result.stderr
    assert not (tmp_path / "strict.jsonl").exists()
