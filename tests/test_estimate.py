"""The estimator against hand computations (GPT-2 124M; LoRA's adapters) and against XLA's memory analysis of the
compiled step (full fine-tuning, LoRA, DPO's reference)."""

import json
import subprocess
import sys

import pytest

from llmjax import config
from llmjax.estimate import abstract_mesh, estimate, scored_keys, state_bytes, xla_memory


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


def test_context_axis_divides_tokens_per_device():
    """Context parallelism splits each sequence: context=2 holds half the tokens' activations and logits, and the
    same parameters (the weights are not split over it)."""
    whole, split = gpt2(), gpt2()
    split.mesh.context = 2
    act, halved = estimate(whole, 8)["activation_bytes"], estimate(split, 16)["activation_bytes"]
    assert halved["saved_layers"] == act["saved_layers"] / 2 and halved["logits"] == act["logits"] / 2
    assert halved["weights"] == act["weights"]


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


def tiny(spec: str = "configs/sft.py", **overrides):
    return config.load(f"{spec}:model=tiny", **overrides)


def test_lora_adapters_by_hand():
    """tiny (D 64, 4 heads and 2 kv heads of 16, d_ff 128, 2 layers) on one device: an adapter holds r (in + out)
    numbers per matrix and layer; the gradients and both Adam moments are the adapters' alone, while the frozen
    base is still held. Under remat=dots each adapter keeps x A (r) per token and layer; (x A) B is recomputed."""
    D, Q, KV, F, L, r = 64, 4 * 16, 2 * 16, 128, 2, 4
    in_out = {"wq": (D, Q), "wk": (D, KV), "wv": (D, KV), "wo": (Q, D), "w_gate": (D, F), "w_up": (D, F),
              "w_down": (F, D)}
    for targets, names in (("all", list(in_out)), ("wq,wv", ["wq", "wv"])):
        full, adapted = (estimate(tiny(**{"lora.targets": t, "lora.rank": r, "model.remat": "dots", "batch_size": 2,
                                          "seq_len": 16}), 1) for t in ("", targets))
        adapters = L * r * sum(i + o for i, o in map(in_out.get, names))
        b = adapted["bytes"]
        assert adapted["trainable_params"] == adapters and full["trainable_params"] == full["params"]
        assert b["grads"] == 4 * adapters and b["optimizer"] == 2 * 4 * adapters
        assert b["params"] == full["bytes"]["params"] + 4 * (adapters + L * len(names))  # + each one's scale (L,)
        saved = adapted["activation_bytes"]["saved_layers"] - full["activation_bytes"]["saved_layers"]
        assert saved == L * 2 * 16 * sum(r for n in names) * 4


@pytest.mark.parametrize("spec, overrides, copies", [
    ("configs/sft.py", {}, 0),
    ("configs/dpo.py", {}, 1),
    ("configs/dpo.py", {"dpo.reference": "precomputed"}, 0),
    ("configs/ppo.py", {}, 1),
    ("configs/ppo.py", {"ppo.algorithm": "grpo"}, 1),
])
def test_reference_is_a_copy_in_full_finetuning_and_none_with_lora(spec, overrides, copies):
    """DPO (live) and PPO/GRPO keep the starting language model frozen beside the policy: one more copy of its
    parameters in full fine-tuning; with LoRA the reference is the base with the adapters off."""
    mesh = abstract_mesh(tiny(), 8)
    lm = estimate(tiny(), 8)["bytes"]["params"]
    assert state_bytes(tiny(spec, **overrides), mesh)["reference"] == copies * lm
    assert state_bytes(tiny(spec, **overrides, **{"lora.targets": "all"}), mesh)["reference"] == 0


@pytest.fixture(scope="module", params=[("configs/sft.py", "all"), ("configs/dpo.py", "all"), ("configs/dpo.py", "")],
                ids=["sft-lora", "dpo-lora", "dpo-full"])
def tiny_step(request):
    spec, targets = request.param
    cfg = tiny(spec, batch_size=8, seq_len=128, eval_every=0, **{"mesh.fsdp": 4, "mesh.tensor": 2,
                                                                  "model.remat": "dots", "lora.targets": targets})
    return estimate(cfg, 8), xla_memory(cfg)


def test_lora_and_reference_state_match_xla(tiny_step):
    """LoRA's frozen base, its adapters and their moments, and DPO's reference argument: XLA's arguments less the
    batch, to 0.1%, as in full fine-tuning."""
    est, xla = tiny_step
    b = est["bytes"]
    assert b["params"] + b["optimizer"] + b["reference"] == pytest.approx(xla["state"], rel=1e-3)


def test_lora_and_dpo_temporaries_near_xla(tiny_step):
    est, xla = tiny_step
    assert est["bytes"]["grads"] + est["bytes"]["activations"] == pytest.approx(xla["temp"], rel=0.25)


def test_cli_lora_beside_full_finetuning():
    """Llama 3 8B, LoRA rank 16 on every projection: 16 x 32 layers x 81920 (in + out over the seven matrices)
    trained numbers; the DPO reference is gone, and the full fine-tuning it saves against is shown beside it."""
    out = subprocess.run([sys.executable, "-m", "llmjax.estimate", "--config=configs/dpo.py:model=llama3-8b",
                          "--config.mesh.fsdp=8", "--config.lora.targets=all", "--config.lora.rank=16", "--json"],
                         capture_output=True, text=True, check=True).stdout
    est = json.loads(out)
    full = est["full_finetuning"]
    assert est["trainable_params"] == 16 * 32 * 81920 and full["trainable_params"] == 8_030_261_248
    assert full["bytes"]["reference"] == full["bytes"]["params"] == 8_030_261_248 * 4 / 8
    assert est["bytes"]["reference"] == 0 and est["bytes"]["optimizer"] == 2 * est["bytes"]["grads"]
    assert est["bytes"]["total"] < full["bytes"]["total"] / 2


@pytest.mark.parametrize("model, context", [({"attention": "blockwise", "attn_block": 64, "remat": "all_dots"}, 1),
                                             ({"context_parallel": "allgather"}, 2)])
def test_attention_memory_near_xla(model, context):
    """At T=1024 the scores dominate: blockwise attention holds a block pair's, not T x T (XLA's temporaries 12 MiB
    against xla attention's 76), even under remat=all_dots, which would keep every block pair's scores but is dots
    there; the formula follows each implementation to within 25%."""
    cfg = config.base("tiny")
    cfg.batch_size, cfg.seq_len, cfg.eval_every, cfg.model.max_seq_len = 8, 1024, 0, 1024
    cfg.mesh.update(fsdp=4 // context, context=context, tensor=2)
    cfg.model.update(**{"remat": "dots", **model})
    est, xla = estimate(cfg, 8), xla_memory(cfg)
    assert est["bytes"]["grads"] + est["bytes"]["activations"] == pytest.approx(xla["temp"], rel=0.25)


def test_fused_kernels_hold_a_block_pair_like_blockwise():
    """splash and cudnn (on a whole sequence) keep what flash attention keeps: the log-sum-exp and one block pair's
    scores, 1 + 128^2 / 1024 = 17 per query at T=1024 in blocks of 128; under context parallelism cudnn falls back to
    the ring over materialised chunks, 1 + 512 with the sequence in two."""
    cfg = tiny(seq_len=1024, **{"model.attn_block": 128})
    for attention in ("blockwise", "splash", "cudnn"):
        cfg.model.attention = attention
        assert scored_keys(cfg, abstract_mesh(cfg, 8)) == 17
    cfg.mesh.update(fsdp=4, context=2, tensor=1)
    assert scored_keys(cfg, abstract_mesh(cfg, 8)) == 513
