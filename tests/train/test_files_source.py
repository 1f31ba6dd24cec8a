"""Training on a folder of text files: tfds array_record + grain, with the iterator resumed exactly and the
validation split evaluated."""

import pytest
from helpers import losses, metric_rows, tiny_config

from llmjax.train import registry

DOC = "The quick brown fox jumps over the lazy dog number {i}. It was a sunny day in the park, number {i}."


@pytest.mark.slow
def test_files_source_resumes_exactly(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in range(3):
        (corpus / f"part{f}.txt").write_text("\n\n".join(DOC.format(i=10 * f + i) for i in range(10)))

    def cfg(steps):  # a constant learning rate, so a 3-step run is the first half of a 6-step one
        return tiny_config(steps=steps, log_every=1, **{
            "data.source": f"files:{corpus}", "data.data_dir": str(tmp_path / "tfds"), "data.validation": 0.2,
            "checkpoint.every": 3, "eval_every": 3, "optim.schedule": "constant", "optim.warmup_steps": 0})

    registry.train(cfg(6), str(tmp_path / "straight"))
    registry.train(cfg(3), str(tmp_path / "split"))
    registry.train(cfg(6), str(tmp_path / "split"))
    straight = losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 7))
    assert losses(tmp_path / "split") == straight
    assert straight[6] < straight[1]
    rows = metric_rows(tmp_path / "straight")
    perplexity = {row["step"]: row["eval/perplexity"] for row in rows if "eval/perplexity" in row}
    assert sorted(perplexity) == [3, 6] and perplexity[6] < perplexity[3]  # the held-out validation split
