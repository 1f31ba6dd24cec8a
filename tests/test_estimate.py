"""The estimator against a hand computation (GPT-2 124M) and against XLA's memory analysis of the compiled step."""

import json
import subprocess
import sys

import pytest

from llmjax import config
from llmjax.estimate import estimate, xla_memory


def gpt2(**model):
    cfg = config.base("gpt2-124m")
    cfg.batch_size, cfg.seq_len, cfg.steps = 16, 1024, 1000
    cfg.mesh.update(fsdp=4, tensor=2)
    cfg.model.update(dict(remat="full") | model)
    return cfg


def test_gpt2_by_hand():
    """GPT-2 small (V 50257, D 768, L 12, 12 heads of 64, d_ff 3072, tied embeddings, learned positions) on
    fsdp=4 x tensor=2: embed -> fsdp (/4), heads and mlp -> tensor (/2); 50257 is odd, so vocab stays whole."""
    V, D, L, T, F = 50257, 768, 12, 1024, 3072
    per_device = (
        V * D // 4 + T * D // 4 + 2 * D // 4           # embed (vocab replicated), pos_embed, final norm
        + 4 * L * D // 4                               # attn_norm + mlp_norm scales and biases
        + 4 * L * D * D // 8                           # wq, wk, wv, wo: embed/4 x heads/2
        + 2 * L * D * F // 8                           # w_fc, w_proj: embed/4 x mlp/2
        + 3 * L * D // 2 + L * D // 4                  # bq, bk, bv (heads/2); bo (embed/4)
        + L * F // 2 + L * D // 4)                     # b_fc (mlp/2); b_proj (embed/4)
    est = estimate(gpt2(), n_devices=8, mfu=0.5, peak_tflops=100.0, tokens=1e9)
    assert est["params"] == 124_439_808
    matmul = L * (4 * D * D + 2 * D * F) + V * D  # the unembedding (tied) counts; lookups, norms, biases not
    assert est["matmul_params"] == matmul
    assert est["flops_per_token"] == 6 * matmul + 12 * L * T * D
    assert est["accelerator_hours"] == pytest.approx((6 * matmul + 12 * L * T * D) * 1e9 / (0.5 * 100e12) / 3600)
    b = est["bytes"]
    assert b["params"] == 4 * per_device and b["grads"] == 4 * per_device and b["optimizer"] == 8 * per_device

    # Activations: 4 rows per device (16 / fsdp 4), remat=full saves the D-wide carry per layer.
    tokens, n, f = 4 * T, 12 // 2, F // 2  # heads and d_ff per device under tensor=2
    scores = n * T  # float32 scores, per token and layer
    none = 4 * D + (2 * n + 2 * n) * 64 + (2 * 1 + 1) * f + 2 * scores  # GELU: one MLP matmul before the activation
    layer = 4 * D + 4 * D * D // 2 + 2 * D * F // 2 + 3 * D // 2 + D + F // 2 + D  # norms, matrices, biases
    act = est["activation_bytes"]
    assert act["saved_layers"] == L * tokens * D * 4
    assert act["layer_workspace"] == tokens * (none + scores) * 4
    assert act["logits"] == 2 * tokens * V * 4
    assert act["weights"] == 2 * layer * 4  # one layer gathered over fsdp, and its gradient
    assert b["activations"] == pytest.approx(act["saved_layers"] + act["layer_workspace"] + act["logits"]
                                             + act["weights"])


def test_more_memory_for_weaker_remat_and_bf16_halves_saved_activations():
    def saved(**model):
        return estimate(gpt2(**model), 8)["activation_bytes"]["saved_layers"]

    by_policy = [saved(remat=r) for r in ("full", "dots", "all_dots", "none")]
    assert by_policy == sorted(by_policy) and len(set(by_policy)) == 4
    assert saved(compute_dtype="bfloat16") == saved() / 2


@pytest.fixture(scope="module")
def tiny_sharded():
    cfg = config.base("tiny")
    cfg.batch_size, cfg.seq_len, cfg.eval_every = 8, 128, 0
    cfg.mesh.update(fsdp=4, tensor=2)
    cfg.model.remat = "dots"
    return cfg, estimate(cfg, 8), xla_memory(cfg)


def test_state_matches_xla(tiny_sharded):
    """Parameters + AdamW moments per device: XLA's argument bytes less the batch, to 0.1% (the difference is
    the step and optimizer counters)."""
    _, est, xla = tiny_sharded
    assert est["bytes"]["params"] + est["bytes"]["optimizer"] == pytest.approx(xla["state"], rel=1e-3)


def test_gradients_and_activations_near_xla_temporaries(tiny_sharded):
    """XLA's temporaries hold the gradients and activations; the formula is an estimate: within 25%."""
    _, est, xla = tiny_sharded
    assert est["bytes"]["grads"] + est["bytes"]["activations"] == pytest.approx(xla["temp"], rel=0.25)


def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "llmjax.estimate", "--config=configs/pretrain.py:model=llama3-8b",
                          "--config.mesh.fsdp=8", "--json"], capture_output=True, text=True, check=True).stdout
    est = json.loads(out)
    assert est["devices"] == 8 and est["params"] == 8_030_261_248 and est["xla"] is None
    assert est["bytes"]["params"] == 8_030_261_248 * 4 / 8  # every llama3-8b leaf divides by fsdp=8
