"""Generation for a batch of prompts: a prefill over the left-padded prompts (in chunks of `prefill_chunk` tokens
when they are longer), then a jitted decode loop (`jax.lax.while_loop`) over a preallocated KV cache, greedy or
temperature / top-k / top-p sampling, each row stopping at its own EOS. A model whose every layer has a sliding
window W prefills at most W tokens at a time into a ring of 2W - 1 slots, so its cache does not grow with the
prompt and the answer.

Returned log-probs are those of the tempered model, log-softmax(logits / temperature) before top-k / top-p
filtering (greedy: of the raw logits): the numbers a teacher-forced forward pass gives for the same tokens with its
logits divided by the temperature, the policy that PPO samples from and optimises.
"""

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.models import kvcache, presets, transformer
from llmjax.sharding import Constrain, no_constrain


def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Logits of the sampling distribution: tempered, then all but the top k, and all beyond the smallest
    set whose probability reaches top_p, set to -inf (the most likely token always stays)."""
    if not top_k and top_p >= 1.0:  # nothing to filter: no sort
        return logits_BV / temperature
    full_B = lambda value: jnp.full(logits_BV.shape[0], value)  # noqa: E731
    return filter_rows(logits_BV, full_B(temperature), full_B(top_k), full_B(top_p), full_B(0.0))


def filter_rows(logits_BV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array,
                min_p_B: jax.Array) -> jax.Array:
    """filter_logits with each row's own settings as arrays (top_k 0, top_p 1, min_p 0: off), so that one compiled
    step serves requests that differ; then min-p: tokens less likely than min_p x the most likely one go too. A row
    at temperature 0 is divided by 1 (its caller takes the argmax)."""
    logits = logits_BV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    sorted_BV = jnp.sort(logits, axis=-1)[:, ::-1]
    kth_B1 = jnp.take_along_axis(sorted_BV, jnp.maximum(top_k_B - 1, 0)[:, None], axis=-1)
    kth_B1 = jnp.where(top_k_B[:, None] > 0, kth_B1, -jnp.inf)
    sorted_BV = jnp.where(sorted_BV < kth_B1, -jnp.inf, sorted_BV)
    before = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1) - jax.nn.softmax(sorted_BV, axis=-1)
    cutoff_B1 = jnp.min(jnp.where(before < top_p_B[:, None], sorted_BV, jnp.inf), axis=-1, keepdims=True)
    cutoff_B1 = jnp.where(top_p_B[:, None] < 1.0, cutoff_B1, -jnp.inf)
    floor_B1 = sorted_BV[:, :1] + jnp.log(min_p_B)[:, None]  # log 0 = -inf: no floor
    return jnp.where(logits < jnp.maximum(jnp.maximum(kth_B1, cutoff_B1), floor_B1), -jnp.inf, logits)


def choose_rows(logits_BV: jax.Array, key_B: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
                top_p_B: jax.Array, min_p_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(token_B, logp_B): each row sampled with its own key and settings, greedy where its temperature is 0, and
    the token's log-prob under that row's tempered model, as `generate` reports it. An all-greedy batch skips the
    filters' sorting."""
    sampled_B = jax.lax.cond(
        jnp.any(temperature_B > 0),
        lambda: jax.vmap(jax.random.categorical)(key_B, filter_rows(logits_BV, temperature_B, top_k_B, top_p_B,
                                                                    min_p_B)).astype(jnp.int32),
        lambda: jnp.zeros(logits_BV.shape[0], jnp.int32))
    token_B = jnp.where(temperature_B > 0, sampled_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)
    tempered_BV = logits_BV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    return token_B, jnp.take_along_axis(jax.nn.log_softmax(tempered_BV), token_B[:, None], axis=-1)[:, 0]


def _choose(logits_BV, key, temperature, top_k, top_p):
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BV, temperature, top_k, top_p)).astype(jnp.int32)


def limit_vocab(logits_BTV: jax.Array, vocab_size: int) -> jax.Array:
    """Logits of ids the tokenizer has (an embedding may be padded past it), the rest pushed to -1e9: never
    sampled, and no -inf to turn 0 * log 0 into NaN."""
    if not vocab_size or vocab_size >= logits_BTV.shape[-1]:
        return logits_BTV
    return jnp.where(jnp.arange(logits_BTV.shape[-1]) < vocab_size, logits_BTV, -1e9)


def generate(params: transformer.Params, prompts_BP: jax.Array, lengths_B: jax.Array, key: jax.Array, cfg, *,
             max_new_tokens: int, eos_id: int, pad_id: int = 0, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, vocab_size: int = 0, prefill_chunk: int = 512,
             constrain: Constrain = no_constrain) -> dict[str, jax.Array]:
    """Continues left-padded prompts (row b's prompt fills its last lengths_B[b] slots), sampling only ids below
    vocab_size (the tokenizer's; 0: all of the model's).

    Returns tokens_BR (pad after EOS), logprobs_BR (0 after EOS) and lengths_B (tokens up to and including
    EOS). Jit it with the sampling settings static, e.g. through `sampler`.
    """
    chunk, slots = prefill_plan(cfg, prompts_BP.shape[1], max_new_tokens, prefill_chunk)
    prompts_BP = jnp.pad(prompts_BP, ((0, 0), (-prompts_BP.shape[1] % chunk, 0)), constant_values=pad_id)
    B, P = prompts_BP.shape
    slot_BP = jnp.arange(P)[None] - (P - lengths_B[:, None])  # negative on padding
    segment_BP = (slot_BP >= 0).astype(jnp.int32)

    def prefill(cache, chunk_BC):
        tokens_BC, slot_BC, segment_BC = chunk_BC
        out = transformer.forward(params, tokens_BC, jnp.maximum(slot_BC, 0), segment_BC, cfg, constrain, cache)
        return out.cache, out.logits_BTV[:, -1]

    chunks = tuple(a.reshape(B, P // chunk, chunk).swapaxes(0, 1) for a in (prompts_BP, slot_BP, segment_BP))
    cache, last_nBV = jax.lax.scan(prefill, kvcache.init(cfg, B, slots), chunks)
    out_BR = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    logits_BV = limit_vocab(last_nBV[-1], vocab_size)
    init = (0, logits_BV, cache, jnp.zeros(B, bool), out_BR, jnp.zeros((B, max_new_tokens)), key)

    def cond(carry):
        i, _, _, done_B, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, logits_BV, cache, done_B, out_BR, logp_BR, key = carry
        key, sub = jax.random.split(key)
        token_B = jnp.where(done_B, pad_id, _choose(logits_BV, sub, temperature, top_k, top_p))
        tempered_BV = logits_BV / temperature if temperature else logits_BV
        logp_B = jnp.take_along_axis(jax.nn.log_softmax(tempered_BV), token_B[:, None], axis=-1)[:, 0]
        out_BR = out_BR.at[:, i].set(token_B)
        logp_BR = logp_BR.at[:, i].set(jnp.where(done_B, 0.0, logp_B))
        done_B = done_B | (token_B == eos_id)
        out = transformer.forward(params, token_B[:, None], (lengths_B + i)[:, None],
                                  (~done_B).astype(jnp.int32)[:, None], cfg, constrain, cache)
        logits_B1V, cache = out.logits_BTV, out.cache
        return i + 1, limit_vocab(logits_B1V[:, 0], vocab_size), cache, done_B, out_BR, logp_BR, key

    _, _, _, _, out_BR, logp_BR, _ = jax.lax.while_loop(cond, body, init)
    ended = out_BR == eos_id
    lengths = jnp.where(ended.any(axis=1), jnp.argmax(ended, axis=1) + 1, max_new_tokens)
    return {"tokens": out_BR, "logprobs": logp_BR, "lengths": lengths.astype(jnp.int32)}


def prefill_plan(cfg, prompt_len: int, max_new_tokens: int, chunk: int = 512) -> tuple[int, int]:
    """(tokens a prefill call, cache slots). A long prompt goes in calls of `chunk` tokens, whose scores are
    chunk x slots rather than prompt x slots; a model whose every layer has a sliding window W, in calls of at most
    W into a ring of W + chunk - 1 slots (llmjax.models.kvcache) when that is fewer than prompt + answer."""
    windows = presets.windows(cfg)
    chunk = min(chunk, prompt_len, max(windows) if min(windows) > 0 else chunk)
    padded = -(-prompt_len // chunk) * chunk
    return chunk, kvcache.ring_slots(cfg, padded + max_new_tokens, chunk)


def sampler(cfg, *, max_new_tokens: int, eos_id: int, pad_id: int = 0, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, vocab_size: int = 0, prefill_chunk: int = 512,
            constrain: Constrain = no_constrain) -> Callable:
    """generate, jitted once for these settings: fn(params, prompts_BP, lengths_B, key) -> dict."""
    return jax.jit(partial(generate, cfg=cfg, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                           temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size,
                           prefill_chunk=prefill_chunk, constrain=constrain))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (prompts_BP, lengths_B), padded on the left to a multiple of `multiple` (fewer shapes,
    fewer compilations)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = -(-max(lengths) // multiple) * multiple
    out = np.full((len(prompts), width), pad_id, np.int32)
    for row, p in zip(out, prompts, strict=True):
        row[width - len(p):] = p
    return out, lengths
