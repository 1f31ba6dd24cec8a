"""Hugging Face architectures as llmjax model configs, and where each of our parameters lives in their files.

Llama (2, 3, 3.1, 3.2), Mistral, Qwen2/2.5 and Qwen3 share one layout of tensor names; GPT-2 has its own (Conv1D
weights stored (in, out), q, k and v fused in one tensor). Anything these families do that our model does not
(sliding windows, other RoPE scalings, biases elsewhere) is refused by name: an import is the same model or none.
Pure Python (no JAX), so a config can name a Hugging Face folder as its model.
"""

import json
import math
import os
from typing import NamedTuple

from llmjax.config import ConfigError
from llmjax.models import presets

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = (*LLAMA_LIKE, "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}  # float16 is kept exactly in float32


def read_config(hf_dir: str) -> dict:
    path = os.path.join(os.path.expanduser(hf_dir), "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{hf_dir!r} is not a Hugging Face model folder (no config.json); point at a folder "
                          "written by save_pretrained or downloaded from the Hub")
    with open(path) as f:
        return json.load(f)


def _rope(hf: dict, where: str) -> dict:
    """Our RoPE keys from transformers 4's `rope_theta` + `rope_scaling` or transformers 5's `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out = dict(rope_theta=float(hf.get("rope_theta", params.get("rope_theta", 10_000.0))))
    if kind == "default":
        return out
    if kind != "llama3":
        raise ConfigError(f"{where}: rope scaling of type {kind!r} is not implemented (llmjax has 'llama3' and none)")
    return out | dict(rope_scaling=float(scaling["factor"]), rope_low_freq_factor=float(scaling["low_freq_factor"]),
                      rope_high_freq_factor=float(scaling["high_freq_factor"]),
                      rope_original_max_len=int(scaling["original_max_position_embeddings"]))


def _refuse(where: str, hf: dict, **unsupported) -> None:
    """Refuses the first key whose value is one the model does not implement (`key=(bad?, what it means)`)."""
    for key, (bad, meaning) in unsupported.items():
        if bad:
            raise ConfigError(f"{where}: {key}={hf.get(key)!r} ({meaning}) is not supported by llmjax's model")


def model_config(hf: dict, where: str, dtype: str | None = None) -> dict:
    """Our model config (every key of presets.DEFAULTS) for a Hugging Face config.json; `where` names it in errors.
    Parameters stay in the checkpoint's dtype (float16 widened to float32) unless `dtype` says otherwise."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ConfigError(f"{where}: model_type={kind!r} ({', '.join(hf.get('architectures') or [])}) is not "
                          f"supported; llmjax imports {', '.join(FAMILIES)}")
    _refuse(where, hf, quantization_config=("quantization_config" in hf, "quantized weights"))
    stored = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if (dtype or stored) not in DTYPES:
        raise ConfigError(f"{where}: parameters in {dtype or stored} are not supported; pass --dtype=float32")
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
    layer_types = hf.get("layer_types") or ["full_attention"]
    window = hf.get("sliding_window") if kind == "mistral" or hf.get("use_sliding_window") else None
    _refuse(where, hf, hidden_act=(hf.get("hidden_act", "silu") != "silu", "an MLP activation other than SiLU"),
            attention_bias=(hf.get("attention_bias") and kind != "qwen2", "biases on every attention projection"),
            mlp_bias=(hf.get("mlp_bias"), "biases in the MLP"),
            layer_types=(set(layer_types) != {"full_attention"}, "layers other than full attention"),
            use_sliding_window=(kind != "mistral" and window, "sliding-window attention"))
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    max_len = hf["max_position_embeddings"]
    if window and window < max_len:
        max_len = window  # Mistral's window: up to it, full attention is exactly the same model
    return out | dict(presets.LLAMA, **_rope(hf, where), d_model=D, n_layers=hf["num_hidden_layers"], n_heads=N,
                      n_kv_heads=hf.get("num_key_value_heads") or N, head_dim=hf.get("head_dim") or D // N,
                      d_ff=hf["intermediate_size"], max_seq_len=max_len, norm_eps=hf.get("rms_norm_eps", 1e-6),
                      bias="qkv" if kind == "qwen2" else "none", qk_norm=kind == "qwen3",
                      tie_embeddings=hf.get("tie_word_embeddings", False))


def family(model) -> str:
    """The Hugging Face architecture of an llmjax model, by its switches; Mistral is Llama's layout, kept by name."""
    if ((model.norm, model.pos, model.mlp, model.bias) == ("layer", "learned", "gelu", "all") and model.tie_embeddings
            and model.n_kv_heads == model.n_heads and model.n_heads * model.head_dim == model.d_model):
        return "gpt2"
    if (model.norm, model.pos, model.mlp) == ("rms", "rope", "swiglu") and model.bias != "all":
        if model.qk_norm:
            return "qwen3" if model.bias == "none" else ""
        if model.bias == "qkv":
            return "qwen2"
        return "mistral" if model.name.startswith("mistral") else "llama"
    return ""


def hf_config(model, dtype: str, bos_id: int | None, eos_id: int, pad_id: int) -> dict:
    """config.json for an llmjax model, in the layout published checkpoints use (transformers 4's, which 5 reads)."""
    kind = family(model)
    if not kind:
        raise ConfigError(f"model {model.name!r} (norm={model.norm}, pos={model.pos}, mlp={model.mlp}, bias="
                          f"{model.bias}, qk_norm={model.qk_norm}) matches no Hugging Face architecture llmjax writes "
                          f"({', '.join(FAMILIES)})")
    out = dict(architectures=[ARCHITECTURES[kind]], model_type=kind, vocab_size=model.vocab_size,
               bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=model.tie_embeddings,
               torch_dtype=dtype, initializer_range=model.init_std, use_cache=True)
    if kind == "gpt2":
        return out | dict(n_embd=model.d_model, n_layer=model.n_layers, n_head=model.n_heads, n_inner=model.d_ff,
                          n_positions=model.max_seq_len, n_ctx=model.max_seq_len, activation_function="gelu_new",
                          layer_norm_epsilon=model.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    rope = None
    if model.rope_scaling != 1.0:
        rope = dict(rope_type="llama3", factor=model.rope_scaling, low_freq_factor=model.rope_low_freq_factor,
                    high_freq_factor=model.rope_high_freq_factor,
                    original_max_position_embeddings=model.rope_original_max_len)
    out |= dict(hidden_size=model.d_model, intermediate_size=model.d_ff, num_hidden_layers=model.n_layers,
                num_attention_heads=model.n_heads, num_key_value_heads=model.n_kv_heads, head_dim=model.head_dim,
                hidden_act="silu", max_position_embeddings=model.max_seq_len, rms_norm_eps=model.norm_eps,
                rope_theta=model.rope_theta, rope_scaling=rope, attention_dropout=0.0)
    if kind in ("llama", "qwen3"):
        out |= dict(attention_bias=False, mlp_bias=False) if kind == "llama" else dict(attention_bias=False)
    if kind in ("qwen2", "qwen3"):
        out |= dict(use_sliding_window=False, sliding_window=None, max_window_layers=model.n_layers)
    if kind == "mistral":
        out |= dict(sliding_window=None)
    return out


class Tensor(NamedTuple):
    """Where one of our parameters (per layer, for a stacked one) lives in a Hugging Face tensor: the `cut` first
    of our dimensions flatten into the view's first axis, the rest into its second; the view is the stored tensor,
    transposed when it is stored (out, in); `offset` starts our part along the view's last axis (GPT-2's fused
    q, k, v)."""

    key: str  # "{i}" stands for the layer
    cut: int
    transpose: bool = False
    offset: int = 0


def tensors(model) -> dict[str, Tensor]:
    """Our parameter paths ("layers.wq", "final_norm.scale") -> where each lives, for the model's family."""
    if family(model) == "gpt2":
        D = model.d_model
        h = "transformer.h.{i}."
        out = {"embed": Tensor("transformer.wte.weight", 1), "pos_embed": Tensor("transformer.wpe.weight", 1),
               "final_norm.scale": Tensor("transformer.ln_f.weight", 1),
               "final_norm.bias": Tensor("transformer.ln_f.bias", 1),
               "layers.wo": Tensor(h + "attn.c_proj.weight", 2), "layers.bo": Tensor(h + "attn.c_proj.bias", 1),
               "layers.w_fc": Tensor(h + "mlp.c_fc.weight", 1), "layers.b_fc": Tensor(h + "mlp.c_fc.bias", 1),
               "layers.w_proj": Tensor(h + "mlp.c_proj.weight", 1), "layers.b_proj": Tensor(h + "mlp.c_proj.bias", 1)}
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out |= {f"layers.{ours}.{p}": Tensor(f"{h}{theirs}.{t}", 1) for p, t in (("scale", "weight"),
                                                                                   ("bias", "bias"))}
        for n, x in enumerate("qkv"):
            out[f"layers.w{x}"] = Tensor(h + "attn.c_attn.weight", 1, offset=n * D)
            out[f"layers.b{x}"] = Tensor(h + "attn.c_attn.bias", 2, offset=n * D)
        return out
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
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        out[f"layers.{ours}"] = Tensor(f"{h}mlp.{theirs}.weight", 1, transpose=True)
    if not model.tie_embeddings:
        out["unembed"] = Tensor("lm_head.weight", 1, transpose=True)
    return out


def view_shape(shape: tuple[int, ...], t: Tensor) -> tuple[int, ...]:
    """The stored tensor's part for one of our (per-layer) arrays, before transposition."""
    view = tuple(math.prod(g) for g in (shape[:t.cut], shape[t.cut:]) if g)
    return view[::-1] if t.transpose else view
