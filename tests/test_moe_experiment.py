"""experiments/moe: at equal active parameters and equal steps, the MoE model predicts held-out standard-library
source better than its dense twin; the load-balancing loss keeps every expert in use, and without it the routing
collapses onto a few experts."""

import jax
import numpy as np
import pytest

from experiments.moe import run

STEPS = 400


@pytest.mark.slow
def test_moe_beats_its_dense_twin_and_balances_its_experts(tmp_path):
    results = {}
    for name, changes in run.RUNS:
        cfg = run.run_config("moe-tiny", STEPS, "email", str(tmp_path / "tfds"), changes, batch_size=8, seq_len=64,
                             peak_flops=1e12, log_every=100, **{"mesh.fsdp": 1})
        results[name] = run.train(name, cfg, str(tmp_path), jax.devices()[:1])  # 8 fake devices: twice as slow
    moe, dense, off = results["moe"], results["dense"], results["moe_no_balance"]
    router = 2 * 64 * 4  # the MoE's only extra active parameters: 2 layers' routers
    assert moe["active_params"] == dense["active_params"] + router and moe["params"] > 1.4 * dense["params"]
    assert moe["heldout_loss"] < dense["heldout_loss"] - 0.01, results
    on_LE, off_LE = np.asarray(moe["utilisation"]), np.asarray(off["utilisation"])
    assert on_LE.shape == (2, 4) and np.allclose(on_LE.mean(axis=1), 1.0)
    # measured (2 cores): 0.83 .. 1.35 of an even share with the balancing loss, 0.25 .. 1.99 without it
    assert on_LE.min() > 0.6 and on_LE.max() < 1.5, on_LE
    assert off_LE.min() < 0.5 * on_LE.min() and off_LE.max() > 1.5, off_LE
    run.plot(results, str(tmp_path / "utilisation.png"))
    assert (tmp_path / "utilisation.png").stat().st_size > 10_000
