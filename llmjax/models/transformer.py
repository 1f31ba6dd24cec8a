"""Decoder-only Transformer as pure functions over a parameter pytree.

Llama (RMSNorm, RoPE, grouped-query attention, SwiGLU), GPT-2 (LayerNorm, learned positions, GELU, biases,
tied embeddings), Qwen2 (biases on q, k, v) and Qwen3 (RMSNorm on each head's q and k) are the same forward with
different config switches; Mixtral and Qwen-MoE add routed experts (llmjax.models.moe) in every moe_every-th layer.
`specs(cfg)` is the one source of truth for parameters: shape, logical axes and initializer of every leaf;
initialisation, sharding, checkpoint layout and parameter counts all derive from it. Layers are stacked on a
leading "layers" axis (the dense MLPs and the experts on stacks of their own layers) and run with `jax.lax.scan`,
one step per moe_every layers.
"""

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from llmjax.models import attention, kvcache, layers, moe, paged, presets, ring, splash
from llmjax.sharding import Constrain, no_constrain

Params = dict[str, Any]


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
    trainable: bool = True  # False: a frozen base (llmjax.models.lora), neither differentiated nor optimised


def normal(std: float):
    return lambda key, shape, dtype: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def specs(cfg) -> Params:
    """Every parameter of the model (cfg = cfg.model)."""
    L, D, N, K, H, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                           cfg.vocab_size)
    w, w_out = normal(cfg.init_std), normal(cfg.init_std / math.sqrt(2 * L))  # GPT-2 residual scaling

    def norm(*lead):
        out = {"scale": ParamSpec((*lead, D), (*("layers",) * len(lead), "embed"), ones)}
        if cfg.norm == "layer":
            out["bias"] = ParamSpec((*lead, D), (*("layers",) * len(lead), "embed"), zeros)
        return out

    block = {
        "attn_norm": norm(L),
        "wq": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), w),
        "wk": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), w),
        "wv": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), w),
        "wo": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), w_out),
        "mlp_norm": norm(L),
    }
    Lm = moe_layers(cfg)
    Ld = L - Lm  # dense MLPs: every layer of a dense model, the others of an MoE one
    if cfg.mlp == "swiglu" and Ld:
        block["w_gate"] = ParamSpec((Ld, D, F), ("layers", "embed", "mlp"), w)
        block["w_up"] = ParamSpec((Ld, D, F), ("layers", "embed", "mlp"), w)
        block["w_down"] = ParamSpec((Ld, F, D), ("layers", "mlp", "embed"), w_out)
    elif Ld:
        block["w_fc"] = ParamSpec((Ld, D, F), ("layers", "embed", "mlp"), w)
        block["w_proj"] = ParamSpec((Ld, F, D), ("layers", "mlp", "embed"), w_out)
    if Lm:
        E, Fe, Fs = cfg.moe_experts, cfg.moe_d_ff or F, cfg.moe_shared_d_ff
        block["moe_router"] = ParamSpec((Lm, D, E), ("layers", "embed", None), w)
        block["moe_gate"] = ParamSpec((Lm, E, D, Fe), ("layers", "experts", "embed", "mlp"), w)
        block["moe_up"] = ParamSpec((Lm, E, D, Fe), ("layers", "experts", "embed", "mlp"), w)
        block["moe_down"] = ParamSpec((Lm, E, Fe, D), ("layers", "experts", "mlp", "embed"), w_out)
        if Fs:
            block["shared_gate"] = ParamSpec((Lm, D, Fs), ("layers", "embed", "mlp"), w)
            block["shared_up"] = ParamSpec((Lm, D, Fs), ("layers", "embed", "mlp"), w)
            block["shared_down"] = ParamSpec((Lm, Fs, D), ("layers", "mlp", "embed"), w_out)
        if Fs and cfg.moe_shared_gate:
            block["shared_router"] = ParamSpec((Lm, D), ("layers", "embed"), w)
    if cfg.qk_norm:
        block["q_norm"] = {"scale": ParamSpec((L, H), ("layers", "head_dim"), ones)}
        block["k_norm"] = {"scale": ParamSpec((L, H), ("layers", "head_dim"), ones)}
    if cfg.bias != "none":
        block["bq"] = ParamSpec((L, N, H), ("layers", "heads", "head_dim"), zeros)
        block["bk"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), zeros)
        block["bv"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), zeros)
    if cfg.bias == "all":
        block["bo"] = ParamSpec((L, D), ("layers", "embed"), zeros)
        if cfg.mlp == "gelu" and Ld:
            block["b_fc"] = ParamSpec((Ld, F), ("layers", "mlp"), zeros)
            block["b_proj"] = ParamSpec((Ld, D), ("layers", "embed"), zeros)
    out = {"embed": ParamSpec((V, D), ("vocab", "embed"), w), "layers": block, "final_norm": norm()}
    if cfg.pos == "learned":
        out["pos_embed"] = ParamSpec((cfg.max_seq_len, D), (None, "embed"), normal(0.01))
    if not cfg.tie_embeddings:
        out["unembed"] = ParamSpec((D, V), ("embed", "vocab"), w)
    return out


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def init_tree(tree: Params, key: jax.Array, dtype) -> Params:
    """Fresh parameters for any tree of ParamSpecs; jit it with out_shardings so each device creates only
    its own shard."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([s.init(k, s.shape, jnp.dtype(dtype)) for s, k in zip(leaves, keys, strict=True)])


def init(cfg, key: jax.Array) -> Params:
    return init_tree(specs(cfg), key, cfg.param_dtype)


def param_count(cfg) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(specs(cfg), is_leaf=is_spec))


def active_param_count(cfg) -> int:
    """Parameters a token uses: all but the routed experts it is not sent to (= param_count for a dense model)."""
    return param_count(cfg) - _unrouted(cfg)


def _unrouted(cfg) -> int:
    if not cfg.moe_experts:
        return 0
    experts = sum(math.prod(specs(cfg)["layers"][k].shape) for k in moe.EXPERT_AXES)
    return experts * (cfg.moe_experts - cfg.moe_top_k) // cfg.moe_experts


def matmul_param_count(cfg) -> int:
    """Parameters that take part in a token's matrix multiplies: the FLOPs count's N (no lookups, norms, biases;
    an MoE layer's router, shared expert and top_k of its experts)."""
    n = sum(math.prod(s.shape) for k, s in specs(cfg)["layers"].items() if k.startswith(("w", "moe_", "shared_")))
    return n - _unrouted(cfg) + cfg.vocab_size * cfg.d_model  # the unembedding, tied or not


def moe_layers(cfg) -> int:
    """How many layers have a mixture of experts for an MLP (every moe_every-th)."""
    return cfg.n_layers // cfg.moe_every if cfg.moe_experts else 0


def _norm(x, p, cfg):
    if cfg.norm == "rms":
        return layers.rms_norm(x, p["scale"], cfg.norm_eps)
    return layers.layer_norm(x, p["scale"], p["bias"], cfg.norm_eps)


REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "all_dots": jax.checkpoint_policies.dots_saveable,
}


def remat(cfg) -> str:
    """cfg.remat as it applies: all_dots keeps attention's scores, which only materialised (xla) attention has;
    saving a blockwise or fused kernel's block-pair dots would make its memory quadratic again, so there it is
    `dots`."""
    return "dots" if cfg.remat == "all_dots" and cfg.attention != "xla" else cfg.remat


class Output(NamedTuple):
    logits_BTV: jax.Array  # float32
    h_BTD: jax.Array  # the final normed hidden states (heads read them)
    moe: dict  # router statistics stacked over MoE layers (llmjax.models.moe.loss); {} for a dense model
    cache: kvcache.Cache | paged.Cache | None  # the updated cache when one was given


KV = tuple[jax.Array, jax.Array]  # one layer's cached keys and values, each BSKH


class Context(NamedTuple):
    """What every layer of one forward pass shares, computed once outside the scan over layers."""

    positions_BT: jax.Array
    freq_h: jax.Array  # RoPE inverse frequencies
    rope_scale: float  # what RoPE multiplies cos and sin by (YaRN's attention factor)
    segment_BT: jax.Array  # what the attention mask is made of (llmjax.models.attention.visible)
    kv_segment_BS: jax.Array
    q_index_BT: jax.Array  # the queries' and keys' slots, which a sliding window compares
    kv_index_BS: jax.Array
    valid_BT: jax.Array  # real tokens, not padding: the only ones the MoE router's statistics count
    cache_index: jax.Array | paged.Pages | None  # the first cache slot the tokens fill (paged: the rows' pages)


def _group_size(cfg) -> int:
    return cfg.moe_every if cfg.moe_experts else 1


DENSE_MLP = ("w_gate", "w_up", "w_down", "w_fc", "w_proj", "b_fc", "b_proj")


def _groups(layers_p: Params, cfg) -> tuple[Params, Params, Params]:
    """The layer stacks regrouped for one scan step per moe_every layers: (attention and norms [G, n, ...],
    dense MLPs [G, n - 1, ...] ([G, 1, ...] when dense), MoE MLPs [G, ...])."""
    G = cfg.n_layers // _group_size(cfg)
    attn, dense, experts = {}, {}, {}
    for k, v in layers_p.items():
        part = experts if k.startswith(("moe_", "shared_")) else dense if k in DENSE_MLP else attn
        part[k] = v
    split = lambda tree: jax.tree.map(lambda a: a.reshape(G, -1, *a.shape[1:]), tree)  # noqa: E731
    return split(attn), split(dense), experts


def embed(p: Params, tokens_BT: jax.Array, positions_BT: jax.Array, cfg: ConfigDict,
          constrain: Constrain) -> jax.Array:
    """Token embeddings; GPT-2 adds learned position embeddings here, RoPE models rotate q and k instead."""
    x_BTD = p["embed"][tokens_BT]
    if cfg.pos == "learned":
        x_BTD = x_BTD + p["pos_embed"][positions_BT]
    return constrain(x_BTD, ("batch", "seq", "act_embed"))


def slots(segment_ids_BT: jax.Array, cache: kvcache.Cache | paged.Cache | None,
          constrain: Constrain = no_constrain) -> tuple[jax.Array, ...]:
    """(the keys' segment ids, the queries' slots, the keys' slots): what the attention mask is made of, in each
    layer, so that no T x S mask outlives its layer. Without a cache the tokens are their own keys, their slots in
    the order `ring.balance` puts them in; with one they fill the slots after the cache's `index` and also see the
    slots before them (llmjax.models.kvcache; paged: each row's own, llmjax.models.paged)."""
    if isinstance(cache, paged.Cache):
        return paged.slots(cache, segment_ids_BT)
    B, T = segment_ids_BT.shape
    q_index_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    if cache is None:
        q_index_BT = ring.balance(q_index_BT, constrain)
        return segment_ids_BT, q_index_BT, q_index_BT
    kv_segment_BS, kv_index_BS = kvcache.keys(cache, segment_ids_BT)
    return kv_segment_BS, q_index_BT + cache.index, kv_index_BS


def attention_block(x_BTD: jax.Array, w: Params, ctx: Context, cfg: ConfigDict, constrain: Constrain,
                    kv_BSKH: KV | None = None, window: jax.Array | None = None) -> tuple[jax.Array, KV | None]:
    """Pre-norm attention added to the residual stream. With a cache the new keys and values are written into
    it first, so the tokens attend to the earlier slots and to each other in one call. `window` > 0: this layer's
    queries see only that many most recent slots."""
    h_BTD = _norm(x_BTD, w["attn_norm"], cfg)
    q_BTNH, k_BTKH, v_BTKH = (layers.dense(h_BTD, w[k]) for k in ("wq", "wk", "wv"))
    if cfg.bias != "none":
        q_BTNH, k_BTKH, v_BTKH = q_BTNH + w["bq"], k_BTKH + w["bk"], v_BTKH + w["bv"]
    if cfg.qk_norm:
        q_BTNH = layers.rms_norm(q_BTNH, w["q_norm"]["scale"], cfg.norm_eps)
        k_BTKH = layers.rms_norm(k_BTKH, w["k_norm"]["scale"], cfg.norm_eps)
    if cfg.pos == "rope":
        q_BTNH, k_BTKH = (layers.rope(a, ctx.positions_BT, ctx.freq_h, ctx.rope_scale) for a in (q_BTNH, k_BTKH))
    window = 0 if window is None else window
    if kv_BSKH is None:
        o_BTNH = self_attention(q_BTNH, k_BTKH, v_BTKH, ctx, window, cfg, constrain)
    elif isinstance(ctx.cache_index, paged.Pages):  # the layer's pools (JZKH) in, its new keys and values out
        k_BSKH, v_BSKH = (paged.keys_values(pool_JZKH, new_BTKH, ctx.cache_index)
                          for pool_JZKH, new_BTKH in zip(kv_BSKH, (k_BTKH, v_BTKH), strict=True))
        o_BTNH = layers.attention(q_BTNH, k_BSKH, v_BSKH, mask(ctx, window))
        kv_BSKH = (k_BTKH, v_BTKH)
    else:
        kv_BSKH = tuple(constrain(kvcache.write(c_BSKH, new_BTKH, ctx.cache_index),
                                  ("batch", "seq", "kv_heads", "head_dim"))
                        for c_BSKH, new_BTKH in zip(kv_BSKH, (k_BTKH, v_BTKH), strict=True))
        o_BTNH = layers.attention(q_BTNH, *kv_BSKH, mask(ctx, window))
    o_BTD = layers.dense(o_BTNH, w["wo"], k=2)
    x_BTD = x_BTD + (o_BTD + w["bo"] if cfg.bias == "all" else o_BTD)
    return constrain(x_BTD, ("batch", "seq", "act_embed")), kv_BSKH


def mask(ctx: Context, window: jax.Array | int) -> jax.Array:
    return attention.visible(ctx.segment_BT, ctx.kv_segment_BS, ctx.q_index_BT, ctx.kv_index_BS, window)[:, None]


def self_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, ctx: Context, window: jax.Array | int,
                   cfg: ConfigDict, constrain: Constrain) -> jax.Array:
    """The tokens attending to each other by cfg.attention; split over the mesh axes of the sequence, if any, by
    cfg.context_parallel (the xla attention then runs materialised on each device's share; splash, whose static
    masks need the slots 0 .. T-1, is refused there by the registry)."""
    if cfg.attention == "blockwise" or ring.seq_axes(constrain):
        local = (partial(attention.blockwise, block_q=cfg.attn_block, block_k=cfg.attn_block)
                 if cfg.attention == "blockwise" else attention.reference)
        return ring.attention(q_BTNH, k_BTKH, v_BTKH, ctx.segment_BT, ctx.kv_segment_BS, ctx.q_index_BT,
                              ctx.kv_index_BS, window, constrain, local, cfg.context_parallel)
    if cfg.attention == "cudnn":
        return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask(ctx, window), implementation="cudnn")
    if cfg.attention == "splash":
        return splash.attention(q_BTNH, k_BTKH, v_BTKH, ctx.segment_BT, ctx.kv_segment_BS, window,
                                presets.windows(cfg), cfg.attn_block, constrain)
    return layers.attention(q_BTNH, k_BTKH, v_BTKH, mask(ctx, window), cfg.attn_causal_block)


def mlp_block(x_BTD: jax.Array, w: Params, ctx: Context, cfg: ConfigDict,
              constrain: Constrain) -> tuple[jax.Array, dict]:
    """Pre-norm MLP added to the residual stream: routed experts when the layer has a router (returning its
    statistics for the load-balancing loss), else the dense SwiGLU or GELU MLP (no statistics)."""
    h_BTD = _norm(x_BTD, w["mlp_norm"], cfg)
    stats = {}
    if "moe_router" in w:
        m_BTD, stats = moe.apply(h_BTD, w, ctx.valid_BT, cfg, constrain)
    elif cfg.mlp == "swiglu":
        m_BTD = layers.swiglu(h_BTD, w["w_gate"], w["w_up"], w["w_down"])
    else:
        zero = jnp.zeros((), x_BTD.dtype)  # GPT-2 style without biases
        m_BTD = layers.gelu_mlp(h_BTD, w["w_fc"], w.get("b_fc", zero), w["w_proj"], w.get("b_proj", zero))
    return constrain(x_BTD + m_BTD, ("batch", "seq", "act_embed")), stats


def block(x_BTD: jax.Array, w: Params, ctx: Context, cfg: ConfigDict, constrain: Constrain,
          kv_BSKH: KV | None = None, window: jax.Array | None = None) -> tuple[jax.Array, KV | None, dict]:
    """One layer: attention mixes information across positions, the MLP then works on each position alone."""
    x_BTD, kv_BSKH = attention_block(x_BTD, w, ctx, cfg, constrain, kv_BSKH, window)
    x_BTD, stats = mlp_block(x_BTD, w, ctx, cfg, constrain)
    return x_BTD, kv_BSKH, stats


def _group(x_BTD, weights, ctx: Context, cfg, constrain):
    """One scan step: moe_every layers (one for a dense model), the last with the experts when the model has
    them, so that every step of the scan is alike."""
    attn, dense, experts, kv_cache, window_n = weights
    n = _group_size(cfg)
    new_kv = []
    for i in range(n):
        at = lambda tree: jax.tree.map(lambda a: a[i], tree)  # noqa: B023, E731
        mlp = experts if cfg.moe_experts and i == n - 1 else at(dense)
        x_BTD, kv_BSKH, stats = block(x_BTD, {**at(attn), **mlp}, ctx, cfg, constrain, at(kv_cache), at(window_n))
        new_kv.append(kv_BSKH)
    new_kv = None if kv_cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new_kv)
    return x_BTD, (new_kv, stats)  # the last layer's stats: the group's only MoE layer, {} when dense


def scan_layers(x_BTD: jax.Array, layers_p: Params, ctx: Context, cfg: ConfigDict, constrain: Constrain,
                kv_LBSKH: KV | None = None) -> tuple[jax.Array, KV | None, dict]:
    """Every layer, as one jax.lax.scan over groups of layers so that compile time does not grow with depth;
    cfg.remat picks what each group's backward pass recomputes rather than stores. Layers' sliding windows go
    through the scan beside their weights (none when no layer has one)."""
    step = partial(_group, ctx=ctx, cfg=cfg, constrain=constrain)
    policy = REMAT[remat(cfg)]
    if policy is not None:
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    attn, dense, experts = _groups(layers_p, cfg)
    kv = None if kv_LBSKH is None else jax.tree.map(lambda a: a.reshape(-1, _group_size(cfg), *a.shape[1:]),
                                                    kv_LBSKH)
    windows = presets.windows(cfg)
    window_Gn = jnp.asarray(windows, jnp.int32).reshape(-1, _group_size(cfg)) if any(windows) else None
    x_BTD, (kv, stats) = jax.lax.scan(step, x_BTD, (attn, dense, experts, kv, window_Gn))
    kv_LBSKH = None if kv is None else jax.tree.map(lambda a: a.reshape(cfg.n_layers, *a.shape[2:]), kv)
    return x_BTD, kv_LBSKH, stats


def unembed(p: Params, h_BTD: jax.Array, cfg: ConfigDict, constrain: Constrain) -> jax.Array:
    """Logits in float32, which the softmax of the loss and of sampling need; tied models reuse the embedding."""
    unembed_DV = p["embed"].T if cfg.tie_embeddings else p["unembed"]
    logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, unembed_DV, preferred_element_type=jnp.float32)
    return constrain(logits_BTV, ("batch", "seq", "vocab"))


def forward(params: Params, tokens_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array,
            cfg: ConfigDict, constrain: Constrain = no_constrain,
            cache: kvcache.Cache | paged.Cache | None = None) -> Output:
    """Logits, hidden states and MoE statistics of the tokens; with a cache, the tokens fill the sequence's slots
    index .. index+T-1 and attend to everything cached before them (llmjax.models.kvcache); with a paged cache, each
    row's real tokens fill the slots after its own length (llmjax.models.paged).

    Tokens attend causally within their own segment, so documents packed in one row never see each other. With
    the sequence split over mesh axes (context parallelism), the tokens go through the layers in zigzag order
    (llmjax.models.ring.balance), so that causal attention gives every device the same work, and the final
    hidden states come back in order; rows of any width are padded to whole chunks for it and sliced back.
    """
    dtype = jnp.dtype(cfg.compute_dtype)
    p = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    is_paged = isinstance(cache, paged.Cache)
    balanced, T = cache is None and bool(ring.seq_axes(constrain)), tokens_BT.shape[1]
    if balanced:
        tokens_BT, positions_BT, segment_ids_BT = (ring.balance(ring.pad(a, constrain), constrain)
                                                   for a in (tokens_BT, positions_BT, segment_ids_BT))
    x_BTD = embed(p, tokens_BT, positions_BT, cfg, constrain)
    kv_segment_BS, q_index_BT, kv_index_BS = slots(segment_ids_BT, cache, constrain)
    r = presets.rope(cfg)
    kind, factor = r["rope_type"], r["rope_scaling"]
    freq_h = layers.rope_frequencies(
        cfg.head_dim, cfg.rope_theta, kind, factor, original_max_len=r["rope_original_max_len"],
        low_freq_factor=r["rope_low_freq_factor"], high_freq_factor=r["rope_high_freq_factor"],
        beta_fast=r["rope_beta_fast"], beta_slow=r["rope_beta_slow"],
        seq_len=jnp.max(positions_BT) + 1 if kind == "dynamic" else None)  # transformers' run-time length
    rope_scale = layers.rope_attention_factor(kind, factor, r["rope_attn_factor"])
    ctx = Context(positions_BT, freq_h, rope_scale, segment_ids_BT, kv_segment_BS, q_index_BT,
                  kv_index_BS, segment_ids_BT > 0,
                  None if cache is None else paged.Pages(cache.table_BI) if is_paged else cache.index)
    kv_LBSKH = (None if cache is None else (cache.k_LJZKH, cache.v_LJZKH) if is_paged
                else (cache.k_LBSKH, cache.v_LBSKH))
    x_BTD, kv_LBSKH, stats = scan_layers(x_BTD, p["layers"], ctx, cfg, constrain, kv_LBSKH)
    h_BTD = _norm(x_BTD, p["final_norm"], cfg)
    if balanced:
        h_BTD = constrain(ring.unbalance(h_BTD, constrain)[:, :T], ("batch", "seq", "act_embed"))
    logits_BTV = unembed(p, h_BTD, cfg, constrain)
    if is_paged:
        return Output(logits_BTV, h_BTD, stats, paged.advance(cache, *kv_LBSKH, segment_ids_BT))
    new_cache = None if cache is None else kvcache.Cache(*kv_LBSKH, kv_segment_BS, cache.index + tokens_BT.shape[1])
    return Output(logits_BTV, h_BTD, stats, new_cache)
