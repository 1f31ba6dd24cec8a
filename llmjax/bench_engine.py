"""python -m llmjax.bench engine: the generation engine (continuous batching over a paged KV cache) against the
static sampler, at the same number of rows decoding at once, on answers of equal lengths and on skewed ones (7 in 8
short, the rest long, as RL answers are). Answers end at their own budget (no EOS), greedily, so both produce the
same tokens, which is checked; tokens/s counts the answers' tokens over the median seconds of 3 compiled runs.

KV bytes in flight: the static sampler holds rows x (padded prompt + longest answer) slots for a whole batch; the
engine holds the pages of the requests in its slots (all that prompt + budget will fill, from the start), reported
as the mean over decode steps and the peak, beside the mean bytes those pages hold so far.
"""

import statistics
import time

import jax
import numpy as np

from llmjax import engine, sampling
from llmjax.models import paged, transformer


def _static(generate, params, prompts: list[list[int]], budgets: list[int], slots: int) -> tuple[list, dict]:
    """The static sampler over consecutive batches of `slots` requests, each decoding the longest budget of all (one
    compilation; a shorter answer is cut on the host)."""
    answers, slot_steps, start = [], 0, time.perf_counter()
    for i in range(0, len(prompts), slots):
        tokens_BP, lengths_B = sampling.left_pad(prompts[i:i + slots] + [[1]] * (i + slots - len(prompts)))
        out = jax.device_get(generate(params, tokens_BP, lengths_B, jax.random.key(0)))
        answers += [row[:n].tolist() for row, n in zip(out["tokens"], budgets[i:i + slots], strict=False)]
        slot_steps += slots * (tokens_BP.shape[1] + max(budgets)) * max(budgets)  # its cache's slots, every step
    return answers, {"seconds": time.perf_counter() - start, "slot_steps": slot_steps}


def _compare(cfg, params, prompts: list[list[int]], budgets: list[int], slots: int, page_size: int,
             rounds: int = 3) -> dict:
    token_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * np.dtype(cfg.compute_dtype).itemsize
    generate = sampling.sampler(cfg, max_new_tokens=max(budgets), eos_id=-1)
    max_len = paged.pages_for(max(len(p) + b for p, b in zip(prompts, budgets, strict=True)), page_size) * page_size
    eng = engine.Engine(params, cfg, slots=slots, page_size=page_size, max_len=max_len)
    requests = [engine.Request(p, max_new_tokens=b) for p, b in zip(prompts, budgets, strict=True)]
    static_s, engine_s = [], []
    for _ in range(1 + rounds):  # alternating, so a drift in the machine's speed moves both; the first compiles
        static, s = _static(generate, params, prompts, budgets, slots)
        eng.stats = dict.fromkeys(eng.stats, 0)
        start = time.perf_counter()
        answers = [r.tokens for r in eng.generate(requests)]
        engine_s.append(time.perf_counter() - start)
        static_s.append(s["seconds"])
    static_s, engine_s = statistics.median(static_s[1:]), statistics.median(engine_s[1:])
    tokens, steps = sum(budgets), eng.stats["decode_steps"]
    static_steps = -(-len(prompts) // slots) * max(budgets)
    return {
        "requests": len(prompts), "answer_tokens": tokens, "budgets_min_max": [min(budgets), max(budgets)],
        "same_tokens": static == answers,
        "static_tokens_per_s": tokens / static_s, "engine_tokens_per_s": tokens / engine_s,
        "engine_speedup": static_s / engine_s,
        "static_decode_steps": static_steps, "engine_decode_steps": steps,
        "static_kv_bytes_in_flight": s["slot_steps"] / static_steps * token_bytes,
        "engine_kv_bytes_in_flight_mean": eng.stats["page_steps"] / steps * page_size * token_bytes,
        "engine_kv_bytes_in_flight_peak": eng.stats["peak_pages"] * page_size * token_bytes,
        "engine_kv_bytes_filled_mean": eng.stats["token_steps"] / steps * token_bytes,
        "engine_pool_bytes": eng.pages * page_size * token_bytes,
        "engine_compiles": {"decode": eng._decode._cache_size(), "prefill": eng._prefill._cache_size()},
    }


def bench_engine(cfg, requests: int = 32, slots: int = 8, short: tuple[int, int] = (8, 32), long: int = 128,
                 page_size: int = 16) -> dict:
    """(a) every answer `long` tokens; (b) budgets drawn from `short`, but one request in 8 (at random places) gets
    `long`. Prompts of 8 to 24 random tokens."""
    m = cfg.model
    params = jax.jit(lambda key: transformer.init(m, key))(jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(6, m.vocab_size, rng.integers(8, 25)).tolist() for _ in range(requests)]
    skewed = np.where(rng.permutation(requests) < requests // 8, long, rng.integers(short[0], short[1] + 1, requests))
    out = {"model": m.name, "slots": slots, "page_size": page_size}
    for name, budgets in (("equal", [long] * requests), ("skewed", skewed.tolist())):
        out[name] = _compare(m, params, prompts, budgets, slots, page_size)
    return out
