"""Mixture-of-experts MLP (Switch, Mixtral, Qwen-MoE): a float32 router sends each token to moe_top_k of
moe_experts SwiGLU experts and sums their outputs weighted by its gates.

Dispatch is dropless by default: the token copies are sorted by expert and each expert multiplies its contiguous
group with `jax.lax.ragged_dot`. The capacity path (GShard, Switch) gives each expert a fixed number of slots per
sequence, fills them first choices first, drops the overflow and moves tokens with dense one-hot einsums. On a
mesh, dropless dispatch runs in a shard_map: each device gathers the tokens of its expert group (all-gather), runs
only the experts it holds, and a reduce-scatter hands every token its sum. All-gather, psum and psum-scatter run on
XLA:CPU (ragged_all_to_all does not).

The router's statistics per MoE layer give the auxiliary losses every objective adds (`loss`): the load-balancing
loss E sum_e f_e P_e (f_e the fraction of routed copies sent to expert e, P_e its mean router probability; 1 when
balanced, so it equals Mixtral's value divided by top_k) and the ST-MoE router z-loss mean(logsumexp(logits)^2).
"""

import math

import jax
import jax.numpy as jnp

from llmjax.models import layers
from llmjax.sharding import Constrain, spec

EXPERT_AXES = {"moe_gate": ("experts", "embed", "mlp"), "moe_up": ("experts", "embed", "mlp"),
               "moe_down": ("experts", "mlp", "embed")}


def route(x_BTD: jax.Array, router_DE: jax.Array, valid_BT: jax.Array, cfg) -> tuple[jax.Array, jax.Array, dict]:
    """(experts_BTX chosen per token, gates_BTX float32, statistics over the valid tokens)."""
    logits_BTE = jnp.einsum("btd,de->bte", x_BTD, router_DE, preferred_element_type=jnp.float32)
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    gates_BTX, experts_BTX = jax.lax.top_k(probs_BTE, cfg.moe_top_k)
    if cfg.moe_renormalize:
        gates_BTX = gates_BTX / jnp.sum(gates_BTX, axis=-1, keepdims=True)
    weight_BT = valid_BT.astype(jnp.float32) / jnp.maximum(jnp.sum(valid_BT), 1)
    load_E = jnp.einsum("btxe,bt->e", jax.nn.one_hot(experts_BTX, cfg.moe_experts), weight_BT) / cfg.moe_top_k
    prob_E = jnp.einsum("bte,bt->e", probs_BTE, weight_BT)
    stats = {"balance": cfg.moe_experts * jnp.sum(load_E * prob_E),
             "z": jnp.sum(weight_BT * jnp.square(jax.nn.logsumexp(logits_BTE, axis=-1))),
             "load": load_E}
    return experts_BTX, gates_BTX, stats


def apply(x_BTD: jax.Array, w: dict, valid_BT: jax.Array, cfg, constrain: Constrain) -> tuple[jax.Array, dict]:
    """The MoE MLP of one layer on normed hidden states: (y_BTD, router statistics incl. the dropped fraction)."""
    experts_BTX, gates_BTX, stats = route(x_BTD, w["moe_router"], valid_BT, cfg)
    gates_BTX = gates_BTX.astype(x_BTD.dtype)
    experts = {k: w[k] for k in EXPERT_AXES}
    if cfg.moe_dispatch == "capacity":
        y_BTD, stats["dropped"] = capacity(x_BTD, experts_BTX, gates_BTX, valid_BT, experts, cfg)
    elif constrain.mesh is None:
        y_BTD, stats["dropped"] = dropless(x_BTD, experts_BTX, gates_BTX, experts, cfg.moe_experts), jnp.zeros(())
    else:
        y_BTD, stats["dropped"] = _sharded(x_BTD, experts_BTX, gates_BTX, experts, cfg, constrain), jnp.zeros(())
    if cfg.moe_shared_d_ff:
        shared_BTD = layers.swiglu(x_BTD, w["shared_gate"], w["shared_up"], w["shared_down"])
        if cfg.moe_shared_gate:
            shared_BTD = shared_BTD * jax.nn.sigmoid(jnp.einsum("btd,d->bt", x_BTD, w["shared_router"]))[..., None]
        y_BTD = y_BTD + shared_BTD
    return y_BTD, stats


def _grouped_swiglu(x_AD: jax.Array, sizes_E: jax.Array, w: dict, first: jax.Array | int) -> jax.Array:
    """SwiGLU of copies sorted by expert (sizes_E of each) through the experts w holds, experts first ..
    first + E_local; the other experts' rows come out zero (ragged_dot leaves rows past its groups at zero)."""
    E_local, E = w["moe_gate"].shape[0], sizes_E.shape[0]
    if E_local == E:
        local_E, start = sizes_E, 0
    else:
        local_E = jax.lax.dynamic_slice(sizes_E, (first,), (E_local,))
        start = jnp.sum(jnp.where(jnp.arange(E) < first, sizes_E, 0))
        x_AD = jnp.roll(x_AD, -start, axis=0)
    h_AF = (jax.nn.silu(jax.lax.ragged_dot(x_AD, w["moe_gate"], local_E))
            * jax.lax.ragged_dot(x_AD, w["moe_up"], local_E))
    y_AD = jax.lax.ragged_dot(h_AF, w["moe_down"], local_E)
    return y_AD if E_local == E else jnp.roll(y_AD, start, axis=0)


def dropless(x_BTD: jax.Array, experts_BTX: jax.Array, gates_BTX: jax.Array, w: dict, n_experts: int,
             first: jax.Array | int = 0) -> jax.Array:
    """Every copy computed: the B*T*X copies sorted by expert, one ragged_dot per projection, then unsorted and
    summed with the gates. With w holding a slice of the experts (from `first`), the sum over those only."""
    B, T, X = experts_BTX.shape
    expert_A = experts_BTX.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    sizes_E = jnp.bincount(expert_A, length=n_experts).astype(jnp.int32)
    y_AD = _grouped_swiglu(x_BTD.reshape(B * T, -1)[order_A // X], sizes_E, w, first)
    y_TXD = y_AD[jnp.argsort(order_A)].reshape(B * T, X, -1)
    return jnp.einsum("txd,tx->td", y_TXD, gates_BTX.reshape(B * T, X)).reshape(B, T, -1)


def capacity(x_BTD: jax.Array, experts_BTX: jax.Array, gates_BTX: jax.Array, valid_BT: jax.Array, w: dict,
             cfg) -> tuple[jax.Array, jax.Array]:
    """Dense dispatch into U = capacity_factor * T * X / E slots per expert and sequence, all tokens' first
    choices before any second choice (GShard); copies past an expert's slots are dropped. Returns (y_BTD, the
    fraction of valid copies dropped)."""
    B, T, X = experts_BTX.shape
    E = cfg.moe_experts
    U = max(1, min(T, math.ceil(cfg.moe_capacity_factor * T * X / E)))
    chosen_BTXE = jax.nn.one_hot(experts_BTX, E, dtype=jnp.int32) * valid_BT[:, :, None, None].astype(jnp.int32)
    queue_BXTE = jnp.cumsum(chosen_BTXE.transpose(0, 2, 1, 3).reshape(B, X * T, E), axis=1).reshape(B, X, T, E)
    slot_BTE = jnp.sum((queue_BXTE.transpose(0, 2, 1, 3) - 1) * chosen_BTXE, axis=2)
    chosen_BTE = jnp.sum(chosen_BTXE, axis=2)
    kept_BTE = chosen_BTE * (slot_BTE < U)
    dispatch_BTEU = jax.nn.one_hot(slot_BTE, U, dtype=x_BTD.dtype) * kept_BTE[..., None].astype(x_BTD.dtype)
    gate_BTE = jnp.einsum("btxe,btx->bte", chosen_BTXE.astype(gates_BTX.dtype), gates_BTX)
    x_BEUD = jnp.einsum("bteu,btd->beud", dispatch_BTEU, x_BTD)
    h_BEUF = (jax.nn.silu(jnp.einsum("beud,edf->beuf", x_BEUD, w["moe_gate"]))
              * jnp.einsum("beud,edf->beuf", x_BEUD, w["moe_up"]))
    y_BEUD = jnp.einsum("beuf,efd->beud", h_BEUF, w["moe_down"])
    y_BTD = jnp.einsum("bteu,bte,beud->btd", dispatch_BTEU, gate_BTE, y_BEUD)
    dropped = 1 - jnp.sum(kept_BTE) / jnp.maximum(jnp.sum(chosen_BTE), 1)
    return y_BTD, dropped.astype(jnp.float32)


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sharded(x_BTD: jax.Array, experts_BTX: jax.Array, gates_BTX: jax.Array, w: dict, cfg,
             constrain: Constrain) -> jax.Array:
    """Dropless dispatch as a shard_map over the mesh: tokens gathered over the mesh axes that shard both them and
    the experts, weights gathered over the axes that shard their model width (FSDP), each device's experts run on
    every gathered token routed to them, and the partial sums reduced over the expert-width axes (tensor) and
    scattered back over the token axes."""
    mesh, rules = constrain.mesh, constrain.rules
    w_specs = {k: spec(axes, rules, mesh, w[k].shape) for k, axes in EXPERT_AXES.items()}
    token_spec = spec(("batch", None, None), rules, mesh, x_BTD.shape)
    token_axes, expert_axes = _names(token_spec[0]), _names(w_specs["moe_gate"][0])
    embed_axes, width_axes = _names(w_specs["moe_gate"][1]), _names(w_specs["moe_gate"][2])
    gathered = tuple(a for a in expert_axes if a in token_axes)
    elsewhere = tuple(a for a in expert_axes if a not in token_axes)

    def local(x_BTD, experts_BTX, gates_BTX, w):
        if gathered:
            x_BTD, experts_BTX, gates_BTX = (jax.lax.all_gather(a, gathered, axis=0, tiled=True)
                                             for a in (x_BTD, experts_BTX, gates_BTX))
        if embed_axes:
            w = {k: jax.lax.all_gather(v, embed_axes, axis=EXPERT_AXES[k].index("embed"), tiled=True)
                 for k, v in w.items()}
        first = jax.lax.axis_index(expert_axes) * w["moe_gate"].shape[0] if expert_axes else 0
        y_BTD = dropless(x_BTD, experts_BTX, gates_BTX, w, cfg.moe_experts, first)
        if width_axes or elsewhere:
            y_BTD = jax.lax.psum(y_BTD, (*width_axes, *elsewhere))
        if gathered:
            y_BTD = jax.lax.psum_scatter(y_BTD, gathered, scatter_dimension=0, tiled=True)
        return y_BTD

    return jax.shard_map(local, mesh=mesh, in_specs=(token_spec, token_spec, token_spec, w_specs),
                         out_specs=token_spec)(x_BTD, experts_BTX, gates_BTX, w)


def loss(stats: dict, cfg) -> tuple[jax.Array, dict]:
    """(the auxiliary loss summed over MoE layers, metrics) from a forward's statistics (stacked per MoE layer);
    (0, {}) for a dense model. Metrics are per-layer means; load_min and load_max are E times the least and most
    loaded expert's share (1 = balanced)."""
    if not stats:
        return jnp.zeros(()), {}
    aux = cfg.moe_balance_coef * jnp.sum(stats["balance"]) + cfg.moe_z_coef * jnp.sum(stats["z"])
    load = stats["load"] * cfg.moe_experts
    return aux, {"moe_balance": jnp.mean(stats["balance"]), "moe_z": jnp.mean(stats["z"]),
                 "moe_dropped": jnp.mean(stats["dropped"]), "moe_load_min": jnp.min(load),
                 "moe_load_max": jnp.max(load)}


def dense_twin(cfg) -> dict:
    """The model keys that make cfg's MoE model dense with equal active parameters: one MLP as wide as the experts a
    token uses (top_k x moe_d_ff, plus the shared expert's width)."""
    return dict(moe_experts=0, d_ff=cfg.moe_top_k * (cfg.moe_d_ff or cfg.d_ff) + cfg.moe_shared_d_ff)


def merge(*stats: dict) -> dict:
    """The mean of several forwards' statistics (DPO's chosen and rejected rows)."""
    return jax.tree.map(lambda *a: sum(a) / len(a), *stats) if stats[0] else {}
