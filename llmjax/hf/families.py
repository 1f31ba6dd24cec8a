"""Hugging Face architectures as llmjax model configs, and where each of our parameters lives in their files.

Llama (2, 3, 3.1, 3.2), Mistral, Qwen2/2.5 and Qwen3 share one layout of tensor names, and so do their mixtures of
experts Mixtral, Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE, whose experts are stored one tensor per
expert, as the Hub's files hold them (transformers 5 fuses them on load and splits them again on save); GPT-2 has
its own (Conv1D weights stored (in, out), q, k and v fused in one tensor). Anything these families do that our model
does not (layers other than full and sliding-window attention, RoPE scalings but llama3, linear, dynamic and yarn,
biases elsewhere, experts in other layers than every n-th) is refused by name: an import is the same model or none.
Pure Python (no JAX), so a config can name a Hugging Face folder as its model.
"""

import json
import math
import os
from typing import NamedTuple

from llmjax.errors import LlmjaxError
from llmjax.models import presets

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
PER_LAYER_WINDOWS = ("qwen2", "qwen3", "qwen2_moe")  # the others window every layer or none
FAMILIES = (*LLAMA_LIKE, *MOE, "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "gpt2": "GPT2LMHeadModel"}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}  # float16 is kept exactly in float32


def read_config(hf_dir: str) -> dict:
    path = os.path.join(os.path.expanduser(hf_dir), "config.json")
    if not os.path.isfile(path):
        raise LlmjaxError(f"{hf_dir!r} is not a Hugging Face model folder (no config.json); point at a folder "
                          "written by save_pretrained or downloaded from the Hub")
    with open(path) as f:
        return json.load(f)


def _rope(hf: dict, where: str) -> tuple[dict, int]:
    """Our RoPE keys from transformers 4's `rope_theta` + `rope_scaling` or transformers 5's `rope_parameters`, and
    the context the model reaches: max_position_embeddings, or the length YaRN and dynamic NTK stretch to."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out = dict(rope_theta=float(hf.get("rope_theta", params.get("rope_theta", 10_000.0))), rope_type=kind)
    length = hf["max_position_embeddings"]
    if kind == "default":
        return out, length
    if kind not in presets.ROPE_TYPES:
        raise LlmjaxError(f"{where}: rope scaling of type {kind!r} is not implemented (llmjax has "
                          f"{', '.join(presets.ROPE_TYPES)})")
    if kind == "yarn" and scaling.get("factor") is None and "original_max_position_embeddings" in scaling:
        scaling = dict(scaling, factor=length / scaling["original_max_position_embeddings"])  # as transformers does
    need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if kind == "llama3" \
        else ("factor",)
    missing = [k for k in need if scaling.get(k) is None]
    if missing:
        raise LlmjaxError(f"{where}: rope scaling of type {kind!r} lacks {', '.join(missing)}; add "
                          f"{'them' if len(missing) > 1 else 'it'} to config.json's rope_scaling")
    out["rope_scaling"] = factor = float(scaling["factor"])
    if kind == "llama3":
        return out | dict(rope_low_freq_factor=float(scaling["low_freq_factor"]),
                          rope_high_freq_factor=float(scaling["high_freq_factor"]),
                          rope_original_max_len=int(scaling["original_max_position_embeddings"])), length
    if kind == "dynamic":  # transformers scales past max_position_embeddings, reaching factor times it
        return out | dict(rope_original_max_len=length), int(factor * length)
    if kind == "linear":
        return out, length
    if scaling.get("truncate", True) is not True:
        raise LlmjaxError(f"{where}: YaRN with truncate={scaling['truncate']!r} (correction dimensions not rounded) "
                          "is not supported by llmjax's model")
    original = int(scaling.get("original_max_position_embeddings") or length)  # transformers 5's default
    attn = scaling.get("attention_factor")
    if attn is None and scaling.get("mscale") and scaling.get("mscale_all_dim"):  # DeepSeek's way of writing it
        mscale = [0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
                  for m in (scaling["mscale"], scaling["mscale_all_dim"])]
        attn = mscale[0] / mscale[1]
    return out | dict(rope_original_max_len=original, rope_beta_fast=float(scaling.get("beta_fast") or 32.0),
                      rope_beta_slow=float(scaling.get("beta_slow") or 1.0),
                      rope_attn_factor=float(attn or 0.0)), max(length, int(factor * original))


def _rope_config(model) -> tuple[dict | None, int]:
    """config.json's `rope_scaling` for our RoPE keys (None: unscaled), and its max_position_embeddings."""
    r = presets.rope(model)
    kind, factor = r["rope_type"], r["rope_scaling"]
    if kind == "default" or kind == "llama3" and factor == 1.0:  # the latter: a run saved before rope_type
        return None, model.max_seq_len
    out = dict(rope_type=kind, factor=factor)
    if kind == "llama3":
        out |= dict(low_freq_factor=r["rope_low_freq_factor"], high_freq_factor=r["rope_high_freq_factor"],
                    original_max_position_embeddings=r["rope_original_max_len"])
    if kind == "dynamic":
        return out, r["rope_original_max_len"]
    if kind == "yarn":
        out |= dict(original_max_position_embeddings=r["rope_original_max_len"], beta_fast=r["rope_beta_fast"],
                    beta_slow=r["rope_beta_slow"])
        out |= dict(attention_factor=r["rope_attn_factor"]) if r["rope_attn_factor"] else {}
    return out, model.max_seq_len


def _refuse(where: str, hf: dict, **unsupported) -> None:
    """Refuses the first key whose value is one the model does not implement (`key=(bad?, what it means)`)."""
    for key, (bad, meaning) in unsupported.items():
        if bad:
            raise LlmjaxError(f"{where}: {key}={hf.get(key)!r} ({meaning}) is not supported by llmjax's model")


def model_config(hf: dict, where: str, dtype: str | None = None) -> dict:
    """Our model config (every key of presets.DEFAULTS) for a Hugging Face config.json; `where` names it in errors.
    Parameters stay in the checkpoint's dtype (float16 widened to float32) unless `dtype` says otherwise."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise LlmjaxError(f"{where}: model_type={kind!r} ({', '.join(hf.get('architectures') or [])}) is not "
                          f"supported; llmjax imports {', '.join(FAMILIES)}")
    _refuse(where, hf, quantization_config=("quantization_config" in hf, "quantized weights"))
    stored = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if (dtype or stored) not in DTYPES:
        raise LlmjaxError(f"{where}: parameters in {dtype or stored} are not supported; pass --dtype=float32")
    out = dict(presets.DEFAULTS, name=f"{kind}:{os.path.basename(os.path.normpath(where))}",
               param_dtype=DTYPES[dtype or stored], vocab_size=hf["vocab_size"], init_std=hf.get("initializer_range",
                                                                                               0.02))
    if kind == "gpt2":
        _refuse(where, hf, activation_function=(hf.get("activation_function", "gelu_new") not in (
                    "gelu_new", "gelu_pytorch_tanh"), "GELU other than the tanh approximation"),
                scale_attn_weights=(not hf.get("scale_attn_weights", True), "attention without 1/sqrt(H)"),
                scale_attn_by_inverse_layer_idx=(hf.get("scale_attn_by_inverse_layer_idx"), "per-layer scaling"),
                add_cross_attention=(hf.get("add_cross_attention"), "cross-attention"))
        D, N = hf["n_embd"], hf["n_head"]
        return out | dict(presets.GPT2, d_model=D, n_layers=hf["n_layer"], n_heads=N, n_kv_heads=N, head_dim=D // N,
                          d_ff=hf.get("n_inner") or 4 * D, max_seq_len=hf["n_positions"],
                          norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings",
                                                                                              True))
    _refuse(where, hf, hidden_act=(hf.get("hidden_act", "silu") != "silu", "an MLP activation other than SiLU"),
            attention_bias=(hf.get("attention_bias") and kind != "qwen2", "biases on every attention projection"),
            mlp_bias=(hf.get("mlp_bias"), "biases in the MLP"))
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    rope, max_len = _rope(hf, where)
    qkv = kind == "qwen2" or kind == "qwen2_moe" and hf.get("qkv_bias", True)  # transformers 4 has no qkv_bias
    out |= dict(presets.LLAMA, **rope, d_model=D, n_layers=hf["num_hidden_layers"], n_heads=N,
                n_kv_heads=hf.get("num_key_value_heads") or N, head_dim=hf.get("head_dim") or D // N,
                d_ff=hf["intermediate_size"], max_seq_len=max_len, norm_eps=hf.get("rms_norm_eps", 1e-6),
                bias="qkv" if qkv else "none", qk_norm=kind in ("qwen3", "qwen3_moe"),
                tie_embeddings=hf.get("tie_word_embeddings", False), **_windows(hf, where))
    return out | _experts(hf, where) if kind in MOE else out


def _windows(hf: dict, where: str) -> dict:
    """Our sliding_window and layer_types. Mistral and Mixtral window every layer when sliding_window is set, and
    so does Qwen3-MoE under use_sliding_window; Qwen2, Qwen3 and Qwen2-MoE window the layers their layer_types
    lists (transformers 5 writes them) or else, as transformers 5 reads a config without the list, those from
    max_window_layers on (Qwen2-MoE: the even layers below it). The list becomes its shortest repeating pattern
    ("sliding,full" for alternating layers)."""
    kind, L = hf["model_type"], hf["num_hidden_layers"]
    window = hf.get("sliding_window", 4096 if kind == "mistral" else None) if kind in ("mistral", "mixtral") or \
        hf.get("use_sliding_window") else None  # transformers' defaults for a config.json without the key
    types = hf.get("layer_types") if kind in PER_LAYER_WINDOWS else None
    if types is None:
        first = hf.get("max_window_layers", 28) if kind in PER_LAYER_WINDOWS else 0
        # transformers 5's Qwen2-MoE windows the even layers below max_window_layers, Qwen2 and Qwen3 those from it on
        windowed = (lambda i: i % 2 == 0 and i < first) if kind == "qwen2_moe" else (lambda i: i >= first)
        types = ["sliding_attention" if window and windowed(i) else "full_attention" for i in range(L)]
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    _refuse(where, hf, layer_types=(set(types) - set(names) or len(types) != L, "layers other than full and "
                                    "sliding-window attention"),
            sliding_window=("sliding_attention" in types and not window, "sliding layers without a window"))
    kinds = [names[t] for t in types]
    if "sliding" not in kinds:
        return dict(sliding_window=0, layer_types="")
    period = next(p for p in range(1, L + 1) if L % p == 0 and kinds == kinds[:p] * (L // p))
    return dict(sliding_window=window, layer_types="" if set(kinds) == {"sliding"} else ",".join(kinds[:period]))


def _experts(hf: dict, where: str) -> dict:
    """Our moe_* keys. Mixtral has experts of width intermediate_size in every layer and always renormalises its
    top-k gates; Qwen's are moe_intermediate_size wide, in the layers decoder_sparse_step and mlp_only_layers pick
    (its other layers are dense, intermediate_size wide), gates renormalised under norm_topk_prob, and Qwen2-MoE adds
    a shared expert behind a sigmoid gate. Mixtral's router_jitter_noise is accepted and not applied: it scales the
    router's input by noise in training only (never at inference), so the model is the same and a fine-tune here
    trains without it, as with dropout. HF's balancing loss is top_k times ours (its expert fractions sum to top_k,
    ours to 1), so its router_aux_loss_coef is ours divided by top_k; HF has no z-loss, so moe_z_coef stays llmjax's."""
    L, kind = hf["num_hidden_layers"], hf["model_type"]
    k = hf["num_experts_per_tok"]
    common = dict(moe_top_k=k, moe_balance_coef=k * float(hf.get("router_aux_loss_coef", 0.001)))
    if kind == "mixtral":
        return common | dict(moe_experts=hf["num_local_experts"], moe_every=1, moe_d_ff=hf["intermediate_size"],
                             moe_renormalize=True)
    E = hf.get("num_experts", hf.get("num_local_experts", 0))  # transformers 5 writes Qwen3-MoE's as the latter
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    sparse = [i for i in range(L) if E > 0 and i not in dense and (i + 1) % step == 0]
    every = next((n for n in range(1, L + 1) if L % n == 0 and sparse == list(range(n - 1, L, n))), 0)
    if not every:
        key = "num_experts" if not E else "mlp_only_layers" if dense else "decoder_sparse_step"
        raise LlmjaxError(f"{where}: {key}={hf.get(key)!r} (experts in layers {sparse}) is not supported by llmjax's "
                          f"model, which has them in every n-th of its {L} layers (moe_every=n, n dividing {L})")
    shared = hf.get("shared_expert_intermediate_size", 0) if kind == "qwen2_moe" else 0
    return common | dict(moe_experts=E, moe_every=every, moe_d_ff=hf["moe_intermediate_size"],
                         moe_renormalize=bool(hf.get("norm_topk_prob", False)), moe_shared_d_ff=shared,
                         moe_shared_gate=shared > 0)


def family(model) -> str:
    """The Hugging Face architecture of an llmjax model, by its switches; Mistral is Llama's layout, kept by name."""
    if ((model.norm, model.pos, model.mlp, model.bias) == ("layer", "learned", "gelu", "all") and model.tie_embeddings
            and model.n_kv_heads == model.n_heads and model.n_heads * model.head_dim == model.d_model):
        return "gpt2"
    if (model.norm, model.pos, model.mlp) == ("rms", "rope", "swiglu") and model.bias != "all":
        if getattr(model, "moe_experts", 0):
            return _moe_family(model)
        if model.qk_norm:
            return "qwen3" if model.bias == "none" else ""
        if model.bias == "qkv":
            return "qwen2"
        windowed = any(presets.windows(model))
        return "mistral" if model.name.startswith("mistral") or windowed else "llama"
    return ""


def _moe_family(model) -> str:
    """Qwen2-MoE: a gated shared expert (q, k, v biases or none); Qwen3-MoE: q/k norms, no biases, no shared expert;
    Mixtral: neither, renormalised gates, experts in every layer. Anything else has no Hugging Face architecture."""
    if model.moe_shared_d_ff:
        return "qwen2_moe" if model.moe_shared_gate and not model.qk_norm else ""
    if model.qk_norm:
        return "qwen3_moe" if model.bias == "none" else ""
    return "mixtral" if model.bias == "none" and model.moe_renormalize and model.moe_every == 1 else ""


def hf_config(model, dtype: str, bos_id: int | None, eos_id: int, pad_id: int) -> dict:
    """config.json for an llmjax model, in the layout published checkpoints use (transformers 4's, which 5 reads)."""
    kind = family(model)
    if not kind:
        switches = ("moe_experts", "moe_every", "moe_renormalize", "moe_shared_d_ff", "moe_shared_gate")
        moe = "".join(f", {k}={getattr(model, k)}" for k in switches if getattr(model, "moe_experts", 0))
        raise LlmjaxError(f"model {model.name!r} (norm={model.norm}, pos={model.pos}, mlp={model.mlp}, bias="
                          f"{model.bias}, qk_norm={model.qk_norm}{moe}) matches no Hugging Face architecture llmjax "
                          f"writes ({', '.join(FAMILIES)})")
    out = dict(architectures=[ARCHITECTURES[kind]], model_type=kind, vocab_size=model.vocab_size,
               bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=model.tie_embeddings,
               torch_dtype=dtype, initializer_range=model.init_std, use_cache=True)
    if kind == "gpt2":
        return out | dict(n_embd=model.d_model, n_layer=model.n_layers, n_head=model.n_heads, n_inner=model.d_ff,
                          n_positions=model.max_seq_len, n_ctx=model.max_seq_len, activation_function="gelu_new",
                          layer_norm_epsilon=model.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    rope, max_len = _rope_config(model)
    out |= dict(hidden_size=model.d_model, intermediate_size=model.d_ff, num_hidden_layers=model.n_layers,
                num_attention_heads=model.n_heads, num_key_value_heads=model.n_kv_heads, head_dim=model.head_dim,
                hidden_act="silu", max_position_embeddings=max_len, rms_norm_eps=model.norm_eps,
                rope_theta=model.rope_theta, rope_scaling=rope, attention_dropout=0.0)
    if kind in ("llama", "qwen3", "qwen3_moe"):
        out |= dict(attention_bias=False, mlp_bias=False) if kind == "llama" else dict(attention_bias=False)
    return out | _windows_config(model, kind) | (_experts_config(model, kind) if kind in MOE else {})


def _windows_config(model, kind: str) -> dict:
    """The sliding-window keys of config.json (see _windows); a family that windows every layer or none takes
    only that."""
    windows = presets.windows(model)
    if kind not in PER_LAYER_WINDOWS and len(set(windows)) > 1:
        raise LlmjaxError(f"model {model.name!r} windows some layers (model.layer_types={model.layer_types!r}) but "
                          f"{ARCHITECTURES[kind]} windows all or none; export a model with windows on every layer")
    window = max(windows) or None
    if kind == "llama":  # no window (family names a windowed Llama Mistral): Llama's config has no such keys
        return {}
    if kind in ("mistral", "mixtral"):
        return dict(sliding_window=window)
    if kind == "qwen3_moe":
        return dict(use_sliding_window=bool(window), sliding_window=window)
    first = next((i for i, w in enumerate(windows) if w), model.n_layers)
    types = ["sliding_attention" if w else "full_attention" for w in windows]
    return dict(use_sliding_window=bool(window), sliding_window=window, max_window_layers=first, layer_types=types)


def _experts_config(model, kind: str) -> dict:
    """The MoE keys of config.json (see _experts); Qwen3-MoE's num_experts is written as the Hub's files have it,
    which transformers 5 reads as its num_local_experts."""
    width = model.moe_d_ff or model.d_ff
    out = dict(num_experts_per_tok=model.moe_top_k, router_aux_loss_coef=model.moe_balance_coef / model.moe_top_k,
               output_router_logits=False)
    if kind == "mixtral":
        return out | dict(num_local_experts=model.moe_experts, intermediate_size=width, router_jitter_noise=0.0)
    out |= dict(num_experts=model.moe_experts, moe_intermediate_size=width, decoder_sparse_step=model.moe_every,
                mlp_only_layers=[], norm_topk_prob=model.moe_renormalize)
    if kind == "qwen2_moe":
        out |= dict(shared_expert_intermediate_size=model.moe_shared_d_ff, qkv_bias=model.bias == "qkv")
    return out


class Tensor(NamedTuple):
    """Where one of our parameters (per layer and expert, for a stacked one) lives in a Hugging Face tensor: the
    `cut` first of our dimensions flatten into the view's first axis, the rest into its second (cut 0: a first axis
    of 1, Qwen2-MoE's (1, D) shared_expert_gate); the view is the stored tensor, transposed when it is stored (out,
    in); `offset` starts our part along the view's last axis (GPT-2's fused q, k, v)."""

    key: str  # "{i}" stands for the layer, "{j}" for the expert
    cut: int
    transpose: bool = False
    offset: int = 0
    layers: tuple[int, ...] = ()  # "{i}" keys: the Hugging Face layer of each entry of our stack


def stacked(t: Tensor) -> int:
    """How many of our leading axes index stored tensors: the layer stack ("{i}"), then the experts ("{j}")."""
    return ("{i}" in t.key) + ("{j}" in t.key)


def stored_key(t: Tensor, index: tuple[int, ...]) -> str:
    """The stored tensor that holds our parameter's part at `index` along its stacked axes."""
    return t.key.format(i=t.layers[index[0]], j=index[1] if len(index) > 1 else None) if index else t.key


def sparse_layers(model) -> tuple[int, ...]:
    """The layers with experts: every moe_every-th (Qwen-MoE's decoder_sparse_step); none for a dense model."""
    every = model.moe_every if getattr(model, "moe_experts", 0) else 0
    return tuple(range(every - 1, model.n_layers, every)) if every else ()


def tensors(model) -> dict[str, Tensor]:
    """Our parameter paths ("layers.wq", "final_norm.scale") -> where each lives, for the model's family."""
    every_layer = tuple(range(model.n_layers))
    return {path: t._replace(layers=t.layers or every_layer) if "{i}" in t.key else t
            for path, t in (_gpt2(model) if family(model) == "gpt2" else _llama(model)).items()}


def _gpt2(model) -> dict[str, Tensor]:
    D = model.d_model
    h = "transformer.h.{i}."
    out = {"embed": Tensor("transformer.wte.weight", 1), "pos_embed": Tensor("transformer.wpe.weight", 1),
           "final_norm.scale": Tensor("transformer.ln_f.weight", 1),
           "final_norm.bias": Tensor("transformer.ln_f.bias", 1),
           "layers.wo": Tensor(h + "attn.c_proj.weight", 2), "layers.bo": Tensor(h + "attn.c_proj.bias", 1),
           "layers.w_fc": Tensor(h + "mlp.c_fc.weight", 1), "layers.b_fc": Tensor(h + "mlp.c_fc.bias", 1),
           "layers.w_proj": Tensor(h + "mlp.c_proj.weight", 1), "layers.b_proj": Tensor(h + "mlp.c_proj.bias", 1)}
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        out |= {f"layers.{ours}.{p}": Tensor(f"{h}{theirs}.{t}", 1) for p, t in (("scale", "weight"), ("bias", "bias"))}
    for n, x in enumerate("qkv"):
        out[f"layers.w{x}"] = Tensor(h + "attn.c_attn.weight", 1, offset=n * D)
        out[f"layers.b{x}"] = Tensor(h + "attn.c_attn.bias", 2, offset=n * D)
    return out


def _llama(model) -> dict[str, Tensor]:
    """Llama's names; an MoE model's dense MLPs are the stack of its layers without experts, its experts' (router,
    experts, shared expert) the stack of those with them, one stored tensor per layer and expert."""
    h = "model.layers.{i}."
    out = {"embed": Tensor("model.embed_tokens.weight", 1), "final_norm.scale": Tensor("model.norm.weight", 1),
           "layers.attn_norm.scale": Tensor(h + "input_layernorm.weight", 1),
           "layers.mlp_norm.scale": Tensor(h + "post_attention_layernorm.weight", 1),
           "layers.wo": Tensor(h + "self_attn.o_proj.weight", 2, transpose=True)}
    for x in "qkv":
        out[f"layers.w{x}"] = Tensor(f"{h}self_attn.{x}_proj.weight", 1, transpose=True)
        if model.bias == "qkv":
            out[f"layers.b{x}"] = Tensor(f"{h}self_attn.{x}_proj.bias", 2)
    if model.qk_norm:
        out |= {f"layers.{x}_norm.scale": Tensor(f"{h}self_attn.{x}_norm.weight", 1) for x in "qk"}
    sparse = sparse_layers(model)
    dense = tuple(i for i in range(model.n_layers) if i not in sparse)
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        if dense:
            out[f"layers.w_{ours}"] = Tensor(f"{h}mlp.{theirs}.weight", 1, transpose=True, layers=dense)
        if sparse and model.moe_shared_d_ff:
            out[f"layers.shared_{ours}"] = Tensor(f"{h}mlp.shared_expert.{theirs}.weight", 1, True, layers=sparse)
    if sparse:
        mixtral = family(model) == "mixtral"
        moe = h + ("block_sparse_moe." if mixtral else "mlp.")
        out["layers.moe_router"] = Tensor(moe + "gate.weight", 1, transpose=True, layers=sparse)
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for ours, theirs in zip(("gate", "up", "down"), names, strict=True):
            out[f"layers.moe_{ours}"] = Tensor(f"{moe}experts.{{j}}.{theirs}.weight", 1, True, layers=sparse)
        if model.moe_shared_d_ff and model.moe_shared_gate:
            out["layers.shared_router"] = Tensor(h + "mlp.shared_expert_gate.weight", 0, layers=sparse)
    if not model.tie_embeddings:
        out["unembed"] = Tensor("lm_head.weight", 1, transpose=True)
    return out


def view_shape(shape: tuple[int, ...], t: Tensor) -> tuple[int, ...]:
    """The stored tensor's part for one of our (per-layer, per-expert) arrays, before transposition."""
    view = tuple(math.prod(g) for g in (shape[:t.cut], shape[t.cut:]) if g)
    view = (1, *view) if t.cut == 0 else view
    return view[::-1] if t.transpose else view
