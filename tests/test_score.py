"""Scoring texts with a reward run: the CLI reads {"prompt", "response"} lines and writes each with its score."""

import json
import subprocess
import sys

import numpy as np


def test_score_cli(rm_dir, tmp_path):
    prompt = "sort: dcba"
    lines = tmp_path / "in.jsonl"
    lines.write_text("\n".join(json.dumps({"prompt": prompt, "response": r}) for r in ("abcd", "abdc")) + "\n")
    out = subprocess.run([sys.executable, "-m", "llmjax.score", f"--workdir={rm_dir}", f"--input={lines}",
                          f"--output={tmp_path / 'out.jsonl'}"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["response"] for r in rows] == ["abcd", "abdc"] and all(np.isfinite(r["score"]) for r in rows)
    assert "abcd" in out.stdout
