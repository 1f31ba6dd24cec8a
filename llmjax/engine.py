"""A generation engine: continuous batching over a paged KV cache (llmjax.models.paged).

A fixed number of decode slots share one pool of pages. A request takes a free slot and the pages its prompt and
token budget need, is prefilled alone (one compilation per bucketed prompt length), then decodes with whatever
else holds a slot, one token a step for every slot at once (one compilation: idle slots pass padding, which the
cache neither writes nor counts), steps_per_call steps a call, so that the host's bookkeeping comes once a call
rather than once a token. A request that ends (its budget, counted on the device; a stop token, seen on the host,
which drops what followed it in that call) gives its slot and pages back, and the next waiting request is
prefilled into them while the others keep decoding, so the batch stays full and memory follows the requests in
flight rather than the longest answer.

A request may ask for several answers of one prompt (a GRPO group, best-of-N): those admitted together read one
copy of the prompt's full pages (llmjax.pages counts their readers), which is prefilled once; each answer gets its
own copy of the prompt's last, partly filled page, since rows write their next tokens after their own lengths and
no two may write one page.

What a request gets does not depend on what shares the batch: every row is computed alone in the same compiled
step, and the key of its i-th token is fold_in(key(seed), i); answer j of a group is sampled with seed + j, so it
is the lone request with that seed, token for token. Log-probs are the tempered model's, as in llmjax.sampling.
"""

import dataclasses
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import pages as page_pool
from llmjax import sampling
from llmjax.errors import LlmjaxError
from llmjax.models import paged, transformer


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: Sequence[int]
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # tokens less likely than min_p x the most likely one are never sampled; 0: off
    seed: int = 0
    stop: Sequence[int] = ()  # token ids that end the answer (kept as its last token), beside the engine's eos

    def __post_init__(self):
        if not (self.max_new_tokens >= 1 and self.temperature >= 0 and self.top_k >= 0 and 0 < self.top_p <= 1
                and 0 <= self.min_p < 1 and 0 <= self.seed < 2**32 and len(self.prompt)):
            raise LlmjaxError(f"sampling parameters {dataclasses.asdict(self) | {'prompt': len(self.prompt)}} out of "
                              "range: need a prompt of at least one token, max_new_tokens >= 1, temperature >= 0, "
                              "top_k >= 0, 0 < top_p <= 1, 0 <= min_p < 1 and 0 <= seed < 2**32")


SAMPLING = tuple(f.name for f in dataclasses.fields(Request) if f.name != "prompt")


def request(prompt: Sequence[int], **params) -> Request:
    """A request from keyword parameters, as a server receives them: unknown names are refused, not ignored."""
    unknown = sorted(set(params) - set(SAMPLING))
    if unknown:
        raise LlmjaxError(f"unknown sampling parameter(s) {', '.join(unknown)}; the engine takes {', '.join(SAMPLING)}")
    return Request(prompt, **params)


class Result(NamedTuple):
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop": the last token is a stop token | "length": max_new_tokens reached


@dataclasses.dataclass
class _Running:
    id: int
    request: Request
    pages: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)


class Engine:
    """Requests in (`add`), results out (`step`, or `generate` for a list), over one model's parameters.

    Sizing: `slots` sequences decode at once; `pages` pages of `page_size` tokens hold all their keys and values
    (default: room for every slot at max_len); a sequence (prompt + answer) is at most `max_len` tokens (default the
    model's max_seq_len), which sets the width of a page table and so the keys each decode step attends over.
    """

    def __init__(self, params: transformer.Params, cfg, *, slots: int = 8, pages: int = 0, page_size: int = 16,
                 max_len: int = 0, eos_id: int | None = None, vocab_size: int = 0, prefill_chunk: int = 512,
                 steps_per_call: int = 4):
        self.cfg, self.params, self.eos_id = cfg, params, eos_id  # cfg = cfg.model
        self.max_len = max_len or cfg.max_seq_len
        self.page_size, self.prefill_chunk, self.steps_per_call = page_size, prefill_chunk, steps_per_call
        max_pages = paged.pages_for(self.max_len, page_size)
        pages = pages or slots * max_pages
        if min(slots, pages, page_size, prefill_chunk, steps_per_call) < 1 or self.max_len > cfg.max_seq_len:
            raise LlmjaxError(f"slots={slots}, pages={pages}, page_size={page_size}, prefill_chunk={prefill_chunk}, "
                              f"steps_per_call={steps_per_call}, max_len={self.max_len}: need all but max_len >= 1 "
                              f"and max_len <= the model's max_seq_len={cfg.max_seq_len}")
        self._pools = paged.init(cfg, pages, page_size, slots, max_pages)[:3]  # k, v, segment ids: on the device
        self._logits_BV = jnp.zeros((slots, cfg.vocab_size), jnp.float32)
        self._table_BI = np.zeros((slots, max_pages), np.int32)
        self._lengths_B = np.zeros(slots, np.int32)
        self._rows = {name: np.full(slots, getattr(Request((0,)), name), dtype) for name, dtype in (
            ("max_new_tokens", np.int32), ("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32),
            ("min_p", np.float32), ("seed", np.uint32))}  # each slot's request, as the device reads it
        self._rows["max_new_tokens"][:] = 0  # an idle slot: nothing to decode
        self._slots: list[_Running | None] = [None] * slots
        self._pool = page_pool.Pool(pages)
        self._waiting: deque[list[tuple[int, Request]]] = deque()  # groups of answers, each with its id and seed
        self._next_id = 0
        # decode steps; over them, the sums of pages held and of tokens cached (at each call's start); prefill calls
        self.stats = {"decode_steps": 0, "page_steps": 0, "token_steps": 0, "peak_pages": 0, "prefill_calls": 0}
        limit = partial(sampling.limit_vocab, vocab_size=vocab_size)
        self._prefill = jax.jit(partial(_prefill, cfg=cfg, limit=limit), donate_argnums=(1, 2))
        self._decode = jax.jit(partial(_decode, cfg=cfg, limit=limit, steps=steps_per_call), donate_argnums=(1, 2))
        self._fork = jax.jit(_fork, donate_argnums=(0, 1))

    @property
    def pages(self) -> int:
        return self._pool.size

    @property
    def free_pages(self) -> int:
        return self._pool.free

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(self._slots)

    def add(self, req: Request | dict, n: int = 1) -> list[int]:
        """Queues n answers of a request (a dict: `request`'s keyword parameters and its prompt), checked before
        anything runs; answer j is sampled with seed + j. Returns their ids, which `step` reports results under."""
        return self._queue(self.check(req, n), n)

    def _queue(self, req: Request, n: int) -> list[int]:
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        self._waiting.append([(id_, dataclasses.replace(req, seed=(req.seed + j) % 2**32))
                              for j, id_ in enumerate(ids)])
        return ids

    def check(self, req: Request | dict, n: int = 1) -> Request:
        """The request `add` would queue n answers of, or its one-line refusal; it reads only the engine's sizes, so
        a server's other threads may check what they hand to the thread that steps the engine."""
        req = req if isinstance(req, Request) else request(**req)
        if n < 1:
            raise LlmjaxError(f"n={n} answers: need at least 1")
        total = len(req.prompt) + req.max_new_tokens
        if total > self.max_len:
            limit = ("the model's max_seq_len" if self.max_len == self.cfg.max_seq_len else "the engine's max_len")
            raise LlmjaxError(f"a prompt of {len(req.prompt)} tokens + max_new_tokens={req.max_new_tokens} = {total} "
                              f"exceeds {limit}={self.max_len}; shorten the prompt or lower max_new_tokens")
        need = self._pages_for(req)
        if need > self.pages:  # a group's answers that do not fit at once run a few at a time, one at least
            full = len(req.prompt) // self.page_size
            group = f" ({full + n * (need - full)} to run its {n} answers at once)" if n > 1 else ""
            raise LlmjaxError(f"a prompt of {len(req.prompt)} tokens + max_new_tokens={req.max_new_tokens} needs "
                              f"{need} pages of {self.page_size} tokens; the pool holds {self.pages}: pass pages >= "
                              f"{need}{group}")
        if not all(0 <= t < self.cfg.vocab_size for t in req.prompt):
            raise LlmjaxError(f"the prompt holds token ids outside the model's vocabulary [0, {self.cfg.vocab_size})")
        return req

    def progress(self) -> dict[int, tuple[list[int], list[float]]]:
        """The tokens and log-probs each running request has so far, by id (the engine's own lists, which later
        steps extend): what a server streams between the step that admits a request and the one that ends it."""
        return {run.id: (run.tokens, run.logprobs) for run in self._slots if run}

    def cancel(self, id_: int) -> None:
        """Drops a waiting or running request (a server's client went away, or its answer hit a stop string),
        giving its slot and pages back; an id that has ended already is ignored."""
        groups = ([(i, req) for i, req in group if i != id_] for group in self._waiting)
        self._waiting = deque(group for group in groups if group)
        for slot, run in enumerate(self._slots):
            if run and run.id == id_:
                self._release(slot)

    def step(self) -> dict[int, Result]:
        """Prefills waiting requests into free slots (first come, first served, while the pool has their pages; as
        many of a group's answers at once as fit), then decodes steps_per_call tokens for every busy slot; returns
        the requests that ended, by id. A slot stops at its budget on the device, and at a stop token here,
        dropping what it wrote after it."""
        while self._waiting and (count := self._admissible(self._waiting[0])) > 0:
            group = self._waiting[0]
            self._admit(group[:count])
            del group[:count]
            if not group:
                self._waiting.popleft()
        busy = [slot for slot, run in enumerate(self._slots) if run]
        if not busy:
            return {}
        held, steps = self.pages - self.free_pages, self.steps_per_call
        self.stats["decode_steps"] += steps
        self.stats["page_steps"] += held * steps
        self.stats["token_steps"] += int(self._lengths_B.sum()) * steps
        self.stats["peak_pages"] = max(self.stats["peak_pages"], held)
        counts_B = np.array([len(run.tokens) if run else 0 for run in self._slots], np.int32)
        self._pools, self._logits_BV, *out = self._decode(
            self.params, self._pools, self._logits_BV, self._table_BI.copy(), self._lengths_B.copy(), counts_B,
            {k: v.copy() for k, v in self._rows.items()})
        token_RB, logp_RB, active_RB = jax.device_get(out)
        done = {}
        for slot in busy:
            run = self._slots[slot]
            new = active_RB[:, slot]
            for token, logp in zip(token_RB[new, slot].tolist(), logp_RB[new, slot].tolist(), strict=True):
                run.tokens.append(token)
                run.logprobs.append(logp)
                self._lengths_B[slot] += 1
                stopped = token == self.eos_id or token in run.request.stop
                if stopped or len(run.tokens) == run.request.max_new_tokens:
                    done[run.id] = Result(run.tokens, run.logprobs, "stop" if stopped else "length")
                    self._release(slot)
                    break
        return done

    def generate(self, requests: Sequence[Request | dict], n: int = 1) -> list[Result]:
        """Every request's n answers (request i's answer j at i * n + j, sampled with seed + j), on an idle engine
        (one driven by add and step would lose the results of its own requests here); all are checked before any is
        queued."""
        if self.busy:
            raise LlmjaxError("generate runs an idle engine, and this one holds requests from add(); collect their "
                              "results with step() first")
        ids = [id_ for req in [self.check(r, n) for r in requests] for id_ in self._queue(req, n)]
        done = {}
        while self.busy:
            done |= self.step()
        return [done[i] for i in ids]

    def _pages_for(self, req: Request) -> int:
        return paged.pages_for(len(req.prompt) + req.max_new_tokens, self.page_size)

    def _admissible(self, group: list[tuple[int, Request]]) -> int:
        """How many of a waiting group's answers the free slots and pages take now: the first needs every page its
        sequence can fill, each other one all but the prompt's full pages, which they share."""
        req = group[0][1]
        full = len(req.prompt) // self.page_size
        return min(len(group), self._slots.count(None), (self.free_pages - full) // (self._pages_for(req) - full))

    def _admit(self, group: list[tuple[int, Request]]) -> None:
        """Takes a slot per answer and every page it can fill (so a started request always finishes): the prompt's
        full pages once, read by all, and its own for the rest. The prompt is prefilled into the first answer's
        pages, in chunks of at most prefill_chunk tokens, each padded to a power of two (8 at least); each other
        answer gets copies of the prompt's last, partly filled page and of the next token's distribution."""
        req = group[0][1]
        full = len(req.prompt) // self.page_size
        shared = self._pool.take(full, readers=len(group))
        slots = []
        for id_, member in group:
            slots.append(self._slots.index(None))
            pages = shared + self._pool.take(self._pages_for(req) - full)
            self._slots[slots[-1]] = _Running(id_, member, pages)
            self._table_BI[slots[-1], :len(pages)] = pages
            for name, array in self._rows.items():
                array[slots[-1]] = getattr(member, name)
        slot = slots[0]
        for start in range(0, len(req.prompt), self.prefill_chunk):
            chunk = req.prompt[start:start + self.prefill_chunk]
            width = min(max(8, 1 << (len(chunk) - 1).bit_length()), self.prefill_chunk)
            tokens_1C = np.zeros((1, width), np.int32)
            tokens_1C[0, :len(chunk)] = chunk
            self._pools, self._logits_BV = self._prefill(
                self.params, self._pools, self._logits_BV, tokens_1C, np.int32(len(chunk)), np.int32(slot),
                self._table_BI[slot:slot + 1].copy(), self._lengths_B[slot:slot + 1].copy())
            self._lengths_B[slot] += len(chunk)
            self.stats["prefill_calls"] += 1
        for other in slots[1:]:
            copy = self._table_BI[other, full] if len(req.prompt) % self.page_size else self.pages  # pool's end: none
            self._pools, self._logits_BV = self._fork(self._pools, self._logits_BV, self._table_BI[slot, full],
                                                      np.int32(copy), np.int32(slot), np.int32(other))
            self._lengths_B[other] = len(req.prompt)

    def _release(self, slot: int) -> None:
        self._pool.give_back(self._slots[slot].pages)
        self._slots[slot] = None
        self._table_BI[slot] = 0
        self._lengths_B[slot] = 0
        self._rows["max_new_tokens"][slot] = 0


def _prefill(params, pools, logits_BV, tokens_1C, n, slot, table_1I, lengths_1, *, cfg, limit):
    """n real tokens of one slot's prompt (padded to C) after its `lengths_1` cached ones; the last real token's
    logits become the slot's next sampling distribution."""
    C = tokens_1C.shape[1]
    segment_1C = (jnp.arange(C) < n)[None].astype(jnp.int32)
    cache = paged.Cache(*pools, table_1I, lengths_1)
    out = transformer.forward(params, tokens_1C, lengths_1[:, None] + jnp.arange(C), segment_1C, cfg, cache=cache)
    return out.cache[:3], logits_BV.at[slot].set(limit(out.logits_BTV[0, n - 1]))


def _fork(pools, logits_BV, page, copy, slot, other):
    """Page `page` copied into page `copy` (past the pool: dropped) in every pool, and slot's next-token
    distribution into slot `other`'s."""
    def duplicate(pool_JZ):
        return pool_JZ.at[copy].set(pool_JZ[page], mode="drop")

    k_LJZKH, v_LJZKH, segment_JZ = pools
    pools = jax.vmap(duplicate)(k_LJZKH), jax.vmap(duplicate)(v_LJZKH), duplicate(segment_JZ)
    return pools, logits_BV.at[other].set(logits_BV[slot])


def _decode(params, pools, logits_BV, table_BI, lengths_B, counts_B, rows, *, cfg, limit, steps):
    """`steps` tokens for every slot below its budget (rows["max_new_tokens"]), each sampled from its slot's
    distribution and then run through the model: (pools, the next distributions, token_RB, logp_RB, active_RB)."""

    def step(carry, _):
        pools, logits_BV, lengths_B, counts_B = carry
        active_B = counts_B < rows["max_new_tokens"]
        key_B = jax.vmap(lambda seed, i: jax.random.fold_in(jax.random.key(seed), i))(rows["seed"], counts_B)
        token_B, logp_B = sampling.choose_rows(logits_BV, key_B, rows["temperature"], rows["top_k"], rows["top_p"],
                                               rows["min_p"])
        out = transformer.forward(params, token_B[:, None], lengths_B[:, None], active_B[:, None].astype(jnp.int32),
                                  cfg, cache=paged.Cache(*pools, table_BI, lengths_B))
        carry = out.cache[:3], limit(out.logits_BTV[:, 0]), out.cache.lengths_B, counts_B + active_B
        return carry, (token_B, logp_B, active_B)

    (pools, logits_BV, _, _), out = jax.lax.scan(step, (pools, logits_BV, lengths_B, counts_B), length=steps)
    return pools, logits_BV, *out
