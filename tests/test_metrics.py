import glob
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

from llmjax.metrics import MetricsWriter, flops_per_token, matmul_flops_per_s, mfu


def read_jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_tfrecords(path):
    """Yield the records of a TFRecord file, checking its framing and checksums."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert header_crc == masked_crc32c(header)
        record = data[pos + 12 : pos + 12 + length]
        (record_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert record_crc == masked_crc32c(record)
        yield record
        pos += 16 + length
    assert pos == len(data)


def read_scalars(workdir):
    """All (tag, step, value) scalars across the event files under workdir/tb."""
    paths = glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
    assert paths
    scalars = []
    for path in paths:
        for record in read_tfrecords(path):
            event = Event.FromString(record)
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return sorted(scalars)


def test_jsonl_exact_values_and_resume_appends(tmp_path):
    workdir = str(tmp_path / "run")
    with MetricsWriter(workdir) as writer:
        writer.write(1, {"loss": 2.5, "lr": np.float32(0.125)})
        writer.write(np.int64(2), {"loss": jnp.asarray(1.75, jnp.float32)})
    assert read_jsonl(workdir) == [{"step": 1, "loss": 2.5, "lr": 0.125}, {"step": 2, "loss": 1.75}]

    with MetricsWriter(workdir) as writer:
        writer.write(3, {"loss": 0.1})
    lines = read_jsonl(workdir)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[2] == {"step": 3, "loss": 0.1}
    assert all(type(line["step"]) is int for line in lines)


def test_tensorboard_events_match_writes(tmp_path):
    workdir = str(tmp_path)
    written = {(1, "loss"): 2.3, (1, "grad_norm"): 0.7, (2, "loss"): 1.9, (10, "loss"): 1.234567891}
    with MetricsWriter(workdir) as writer:
        for step in (1, 2, 10):
            writer.write(step, {tag: v for (s, tag), v in written.items() if s == step})
    with MetricsWriter(workdir) as writer:  # a resumed run adds a file and leaves the first intact
        writer.write(11, {"loss": 1.5})
    written[11, "loss"] = 1.5

    expected = sorted((tag, step, float(np.float32(v))) for (step, tag), v in written.items())
    assert read_scalars(workdir) == expected


def test_disabled_writer_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricsWriter(str(workdir), enabled=False) as writer:
        writer.write(1, {"loss": 1.0})
        writer.flush()
    assert not workdir.exists()


def test_step_is_reserved(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer, pytest.raises(ValueError):
        writer.write(1, {"step": 3.0})


def test_flops_per_token_by_hand():
    # 6 * 1000 + 12 * 2 layers * 8 tokens * 4 attn_dim
    assert flops_per_token(1000, 2, 8, 4) == 6000 + 768
    assert flops_per_token(1000, 0, 8, 4) == 6000


def test_mfu():
    assert mfu(tokens_per_s=100.0, flops_per_token=6768.0, peak_flops_per_s=1_353_600.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "backend, dtype", [("jax", jnp.float32), ("jax", jnp.bfloat16), ("numpy", np.float32)]
)
def test_matmul_flops_per_s_is_positive_and_finite(backend, dtype):
    rate = matmul_flops_per_s(backend, n=64, seconds=0.05, dtype=dtype)
    assert rate > 0 and math.isfinite(rate)


def test_matmul_flops_per_s_rejects_unknown_backend():
    with pytest.raises(ValueError):
        matmul_flops_per_s("torch", n=8, seconds=0.0)


def test_a_resumed_writer_keeps_one_row_per_step(tmp_path):
    """A run resumed at step 5 replays steps 6-8: their old rows go, so readers need no special case."""
    writer = MetricsWriter(str(tmp_path))
    for step in range(1, 9):
        writer.write(step, {"loss": float(step)})
    writer.close()
    writer = MetricsWriter(str(tmp_path), resumed_at=5)
    writer.write(6, {"loss": 60.0})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                                                                      (5, 5.0), (6, 60.0)]
