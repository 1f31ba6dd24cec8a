"""Losses as pure functions of arrays: each returns (scalar loss, aux dict of scalars)."""

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, z_loss: float = 0.0,
                  normalizer: jax.Array | float | None = None) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy over the tokens where mask_BT is 1, plus PaLM's z-loss
    (z_loss * log(Z)^2, which keeps the softmax normaliser near 1 for stability).

    Divides by `normalizer` (default: the number of masked-in tokens); passing the whole batch's token
    count makes microbatch losses sum exactly to the full-batch loss under gradient accumulation.
    """
    logits = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    mask = mask_BT.astype(jnp.float32)
    n = jnp.sum(mask) if normalizer is None else normalizer
    n = jnp.maximum(n, 1.0)
    ce = jnp.sum((log_z_BT - target_logit_BT) * mask) / n
    zl = z_loss * jnp.sum(jnp.square(log_z_BT) * mask) / n
    return ce + zl, {"ce": ce, "z_loss": zl}
