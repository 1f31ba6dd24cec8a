"""Training metrics: a JSONL + TensorBoard writer, the FLOPs convention, and MFU.

FLOPs convention (used for every MFU number this codebase reports):

    training FLOPs per token = 6 * N_matmul + 12 * n_layers * seq_len * attn_dim

N_matmul counts the parameters that take part in matrix multiplies: every weight matrix, including the
output (unembedding) projection, but not the input embedding lookup, norms or biases. Each such parameter
costs 2 FLOPs per token forward (multiply + add) and 4 backward (gradients w.r.t. activations and
weights), hence the 6.

The attention term follows the PaLM paper, appendix B: per layer and token, QK^T and AV each cost
2 * seq_len * attn_dim FLOPs forward, counted over the full T x T score matrix even under a causal mask,
and forward + backward is 3x forward: 3 * 2 * 2 * T * attn_dim = 12 * T * attn_dim.
attn_dim = n_heads * head_dim.

MFU = achieved FLOP/s under this convention / a peak FLOP/s. When no hardware peak is configured, the
peak is the machine's own measured dense matmul rate (`matmul_flops_per_s`), so MFU stays meaningful on
any machine, including a CPU.
"""

import json
import os
import time
from collections.abc import Mapping
from types import TracebackType

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from tensorboardX import SummaryWriter


def _drop_rows_after(path: str, step: int) -> None:
    """Keeps one row per step: a run resumed at `step` replays the steps after it, so their rows go (atomically:
    a crash here leaves the old file)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


class MetricsWriter:
    """Logs scalars twice: `metrics.jsonl` for scripts and notebooks, TensorBoard for watching a run.

    A disabled writer (non-zero processes of a multi-host run) creates and writes nothing, so every
    process can call `write` unconditionally.
    """

    def __init__(self, workdir: str, enabled: bool = True, resumed_at: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resumed_at is not None:  # a run (re)starting at this step: the rows after it are replayed
            _drop_rows_after(os.path.join(workdir, "metrics.jsonl"), resumed_at)
        # Append with line buffering: a resumed run extends the log and a crash loses no logged line.
        # The file stays open until close(), hence no context manager.
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)  # noqa: SIM115
        # tensorboardX names event files by the second and opens them with "wb"; the suffix keeps a run
        # resumed within the same second from truncating the previous file.
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record `metrics` at `step`; values may be Python, numpy or JAX scalars."""
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError('"step" is reserved for the step number')
        step = int(step)
        scalars = {name: float(value) for name, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)

    def flush(self) -> None:
        """Push buffered TensorBoard events towards disk (tensorboardX writes them from a thread)."""
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        """Write everything still queued and release the files; safe to call twice."""
        if self.enabled:
            self._jsonl.close()
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def flops_per_token(n_matmul_params: int, n_layers: int, seq_len: int, attn_dim: int) -> float:
    """Training (forward + backward) FLOPs per token under the convention in the module docstring."""
    return float(6 * n_matmul_params + 12 * n_layers * seq_len * attn_dim)


def matmul_flops_per_s(
    backend: str = "jax", n: int = 2048, seconds: float = 1.0, dtype: DTypeLike = jnp.float32
) -> float:
    """Measure the achieved dense n x n matmul FLOP/s, the MFU ceiling when no hardware peak is known.

    backend "jax" times a jitted product on the default JAX device; "numpy" times the machine's BLAS.
    Runs products for at least `seconds` after one untimed warm-up (compilation, caches).
    """
    if backend == "jax":
        key_a, key_b = jax.random.split(jax.random.key(0))
        a, b = jax.random.normal(key_a, (n, n), dtype), jax.random.normal(key_b, (n, n), dtype)
        matmul = jax.jit(jnp.matmul)

        def product() -> None:
            matmul(a, b).block_until_ready()

    elif backend == "numpy":
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((n, n)).astype(dtype), rng.standard_normal((n, n)).astype(dtype)

        def product() -> None:
            a @ b

    else:
        raise ValueError(f'backend must be "jax" or "numpy", got {backend!r}')

    product()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count == 0:
        product()
        count += 1
    return 2 * n**3 * count / elapsed


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the fraction of `peak_flops_per_s` the model's useful work achieves."""
    return tokens_per_s * flops_per_token / peak_flops_per_s
