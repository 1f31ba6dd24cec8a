"""Model presets: the one table of architectures a config can name with `model=NAME`.

Published sizes the parameter-count test checks: GPT-2 small 124.4M (tied embeddings), Llama 3 8B 8.03B,
Llama 3 70B 70.6B; `llama-1b` is Llama 3.2 1B (1.24B, tied embeddings, llama3 RoPE scaling); Mixtral 8x7B 46.7B total,
12.9B active per token.
"""

from llmjax.errors import LlmjaxError

ROPE_TYPES = ("default", "llama3", "linear", "dynamic", "yarn")  # llmjax.models.layers.rope_frequencies
ATTENTION = ("xla", "blockwise", "cudnn", "splash")  # llmjax.models.attention, llmjax.models.splash
LLAMA = dict(norm="rms", pos="rope", mlp="swiglu", bias="none", norm_eps=1e-5, rope_theta=500_000.0)
GPT2 = dict(norm="layer", pos="learned", mlp="gelu", bias="all", tie_embeddings=True, norm_eps=1e-5)

PRESETS: dict[str, dict] = {
    # vocab_size=320 fits the default tokenizer, the shipped sentencepiece model (303 pieces), and bytes (262).
    # Tests: compiles in seconds, exercises every sharded axis (heads, kv_heads, mlp all divisible by 2).
    "tiny": dict(LLAMA, vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 d_ff=128, max_seq_len=256, rope_theta=10_000.0),
    # CPU demo: the default run trains this on the synthetic tasks in a few minutes on 2 cores. On XLA:CPU,
    # saving all matmul outputs for the backward pass and skipping masked attention blocks are fastest.
    "small": dict(LLAMA, vocab_size=320, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                  d_ff=768, max_seq_len=512, rope_theta=10_000.0, remat="all_dots", attn_causal_block=64),
    "gpt2-124m": dict(GPT2, vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                      head_dim=64, d_ff=3072, max_seq_len=1024),
    "llama-1b": dict(LLAMA, vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     head_dim=64, d_ff=8192, max_seq_len=131072, tie_embeddings=True, rope_type="llama3",
                     rope_scaling=32.0),
    "llama3-8b": dict(LLAMA, vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, d_ff=14336, max_seq_len=8192),
    "llama3-70b": dict(LLAMA, vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       head_dim=128, d_ff=28672, max_seq_len=8192),
    "mixtral-8x7b": dict(LLAMA, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                         d_ff=14336, max_seq_len=32768, rope_theta=1_000_000.0, moe_experts=8, moe_top_k=2,
                         moe_balance_coef=0.04),  # Mixtral's router_aux_loss_coef 0.02 (moe.py: ours x top_k)
    # CPU mixture of experts: `small`'s attention, 8 experts of width 192 of which 4 run per token, so its active
    # parameters equal `small`'s (4 x 192 = 768 = small's d_ff) while it holds twice the MLP parameters.
    "moe-small": dict(LLAMA, vocab_size=320, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                      d_ff=768, max_seq_len=512, rope_theta=10_000.0, remat="all_dots", attn_causal_block=64,
                      moe_experts=8, moe_top_k=4, moe_d_ff=192),
    "moe-tiny": dict(LLAMA, vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     d_ff=128, max_seq_len=256, rope_theta=10_000.0, moe_experts=4, moe_top_k=2, moe_d_ff=64),
}

# Every model key with its default; a preset overrides what differs. Overriding an unknown key fails.
DEFAULTS = dict(
    name="",
    vocab_size=0, d_model=0, n_layers=0, n_heads=0, n_kv_heads=0, head_dim=0, d_ff=0, max_seq_len=0,
    norm="rms",             # rms | layer
    pos="rope",             # rope | learned
    mlp="swiglu",           # swiglu | gelu
    bias="none",            # none | qkv: on the q, k, v projections (Qwen2) | all: every projection (GPT-2)
    qk_norm=False,          # RMSNorm over each head's q and k before RoPE (Qwen3)
    tie_embeddings=False,   # unembedding = embedding^T
    norm_eps=1e-5,
    rope_theta=10_000.0,
    # RoPE scaling (llmjax.models.layers.rope_frequencies), transformers' rope_type of the same name: default (none)
    # | llama3 (Llama 3.1) | linear (position interpolation) | dynamic (dynamic NTK) | yarn
    rope_type="default",
    rope_scaling=1.0,       # the scaling factor: how many times the context is stretched
    rope_original_max_len=8192,  # llama3, yarn: the pretraining length; dynamic: the length past which it scales
    rope_low_freq_factor=1.0,   # llama3: wavelengths above original / low_freq_factor are fully scaled
    rope_high_freq_factor=4.0,  # llama3: wavelengths below original / high_freq_factor are kept
    rope_beta_fast=32.0,    # yarn: dimensions turning more often than this over the original length are kept
    rope_beta_slow=1.0,     # yarn: dimensions turning less often than this are fully interpolated
    rope_attn_factor=0.0,   # yarn: what cos and sin are multiplied by; 0 = 0.1 * ln(rope_scaling) + 1
    init_std=0.02,
    param_dtype="float32",  # float32 | bfloat16: how parameters are stored
    compute_dtype="float32",  # float32 | bfloat16: matmuls and activations; logits and loss stay float32
    remat="none",           # none | full | dots | all_dots: what the scanned layer saves for the backward pass
    attn_causal_block=0,    # xla, >0: attention in query blocks that skip the masked upper triangle (CPU); 0: one block
    # How attention is computed (llmjax.models.attention): xla (the reference: scores materialised, T x S) |
    # blockwise (flash attention in pure JAX, O(T) memory, any backend) | cudnn (fused, GPU only) |
    # splash (the Pallas splash-attention kernel, TPU only, no context parallelism; llmjax.models.splash)
    attention="xla",
    attn_block=512,         # blockwise, splash: queries and keys per block (splash: a multiple of 128)
    context_parallel="ring",  # with rules.seq on a mesh axis > 1 (llmjax.models.ring): ring | allgather
    # Sliding-window attention (Mistral, Qwen2): on a windowed layer a query sees only the sliding_window most recent
    # keys, itself included; 0 = none. layer_types: "" windows every layer; else comma-separated full | sliding,
    # repeated over the layers ("sliding,full" alternates; Qwen2's max_window_layers lists every layer).
    sliding_window=0,
    layer_types="",
    # Mixture of experts (llmjax.models.moe): moe_experts > 0 replaces the MLP of every moe_every-th layer (layer i
    # when (i + 1) % moe_every == 0, as Qwen-MoE's decoder_sparse_step) by moe_experts SwiGLU experts of width
    # moe_d_ff (0: d_ff), moe_top_k of which run per token.
    moe_experts=0,
    moe_top_k=2,
    moe_every=1,
    moe_d_ff=0,
    moe_renormalize=True,   # the top-k gates rescaled to sum to 1 (Mixtral; Qwen's norm_topk_prob)
    moe_shared_d_ff=0,      # >0: an always-on SwiGLU expert of this width beside the routed ones (Qwen-MoE, DeepSeek)
    moe_shared_gate=False,  # the shared expert's output scaled by sigmoid(x . w) (Qwen2-MoE)
    moe_dispatch="dropless",  # dropless: grouped by expert, jax.lax.ragged_dot | capacity: fixed slots, overflow lost
    moe_capacity_factor=1.25,  # capacity: slots per expert = factor * tokens * top_k / experts
    moe_balance_coef=0.01,  # load-balancing loss E * sum_e f_e P_e (Switch, Mixtral), added to every objective's loss
    moe_z_coef=0.001,       # router z-loss mean(logsumexp(router logits)^2) (ST-MoE)
)


def rope(model) -> dict:
    """The model's rope_* keys, checked. A config saved before rope_type existed lacks the new keys: they are read
    as their defaults, and its type as llama3 where it scaled (the one scaling there was), else default."""
    out = {k: model.get(k, v) for k, v in DEFAULTS.items() if k.startswith("rope_")}
    if "rope_type" not in model:
        out["rope_type"] = "default" if out["rope_scaling"] == 1 else "llama3"
    kind, factor = out["rope_type"], out["rope_scaling"]
    if kind not in ROPE_TYPES:
        raise LlmjaxError(f"model.rope_type={kind!r} is not one of {ROPE_TYPES}; set --config.model.rope_type=...")
    if not factor >= 1:
        raise LlmjaxError(f"model.rope_scaling={factor} is below 1, which would shrink the context; set "
                          "--config.model.rope_scaling to 1 or more")
    if kind == "default" and factor != 1:
        raise LlmjaxError(f"model.rope_scaling={factor} scales nothing with model.rope_type='default'; set "
                          f"--config.model.rope_type to one of {ROPE_TYPES[1:]}, or rope_scaling=1")
    if kind == "yarn" and not 0 < out["rope_beta_slow"] < out["rope_beta_fast"]:
        raise LlmjaxError(f"model.rope_beta_slow={out['rope_beta_slow']} is not below model.rope_beta_fast="
                          f"{out['rope_beta_fast']}: YaRN ramps from one to the other; set "
                          "--config.model.rope_beta_slow between 0 and it (1 and 32 by default)")
    return out


def windows(model) -> list[int]:
    """Every layer's attention window (0 = the whole context), checked."""
    window, types = model.get("sliding_window", 0), model.get("layer_types", "")
    kinds = types.split(",") if types else ["sliding"]
    if window < 0:
        raise LlmjaxError(f"model.sliding_window={window} is negative; set --config.model.sliding_window to 0 "
                          "(no window) or a number of tokens")
    if set(kinds) - {"full", "sliding"} or model["n_layers"] % len(kinds):
        raise LlmjaxError(f"model.layer_types={types!r} is not a comma-separated list of full | sliding whose "
                          f"length divides model.n_layers={model['n_layers']}; e.g. --config.model.layer_types="
                          "sliding,full")
    if "sliding" in kinds and not window:
        if types:
            raise LlmjaxError(f"model.layer_types={types!r} names sliding layers but model.sliding_window=0; "
                              "set --config.model.sliding_window to the window's length")
        return [0] * model["n_layers"]
    if window and "sliding" not in kinds:
        raise LlmjaxError(f"model.sliding_window={window} windows no layer: model.layer_types={types!r} are all full; "
                          "set --config.model.sliding_window=0 or name sliding layers")
    return [window if kinds[i % len(kinds)] == "sliding" else 0 for i in range(model["n_layers"])]


def complete(model) -> dict:
    """A saved run's model config with every key this version has: one saved before a key existed reads as it
    ran."""
    return {**DEFAULTS, **model, **rope(model)}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"model={name!r} is not a preset; choose one of {', '.join(PRESETS)}")
    return dict(DEFAULTS, **PRESETS[name], name=name)
