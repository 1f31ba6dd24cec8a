"""The generation engine: the static sampler's answers through continuous batching over a small page pool, answers
that do not depend on their batch, pages that all come back, groups of answers that share their prompt's pages, and
its refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from llmjax import engine, sampling
from llmjax.errors import LlmjaxError
from llmjax.models import transformer

PROMPTS = [[1, 50, 60, 70, 80, 90, 100], [1, 40], [1, 33, 44, 55, 66], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [3]]
NEW = [12, 5, 9, 3, 7]


def make(overrides=None, **sizing):
    cfg = tiny_config(**(overrides or {})).model
    params = transformer.init(cfg, jax.random.key(0))
    return cfg, params, engine.Engine(params, cfg, **{"slots": 2, "pages": 8, "page_size": 4, "max_len": 32,
                                                       "prefill_chunk": 8} | sizing)


@pytest.fixture(scope="module")
def tiny():
    """2 slots and a pool of 8 pages of 4 tokens: 32 tokens, where the 5 requests hold 62 in all; prompts go in
    chunks of 8 (the longest in two)."""
    return make()


def static_sampler(cfg, params):
    prompts, lengths = sampling.left_pad(PROMPTS)
    return sampling.sampler(cfg, max_new_tokens=max(NEW), eos_id=-1)(params, prompts, lengths, jax.random.key(0))


def assert_greedy_equals_static_sampler(cfg, params, eng):
    results = eng.generate([engine.Request(p, max_new_tokens=n) for p, n in zip(PROMPTS, NEW, strict=True)])
    ref = static_sampler(cfg, params)
    for result, n, tokens, logprobs in zip(results, NEW, ref["tokens"], ref["logprobs"], strict=True):
        assert result.tokens == tokens[:n].tolist() and result.finish_reason == "length"
        np.testing.assert_allclose(result.logprobs, logprobs[:n], rtol=1e-5, atol=1e-5)


def test_greedy_equals_the_static_sampler_through_continuous_batching(tiny):
    """5 requests through 2 slots: the decode step compiles once, and so does the prefill (every chunk of every
    prompt fits the smallest bucket, 8)."""
    assert_greedy_equals_static_sampler(*tiny)
    eng = tiny[2]
    assert eng._decode._cache_size() == eng._prefill._cache_size() == 1
    assert eng.stats["prefill_calls"] == 6 and eng.stats["decode_steps"] < sum(NEW)  # slots were shared


def test_greedy_equals_the_static_sampler_with_sliding_windows():
    """A window of 3 on every layer (the static sampler's ring of slots against the engine's pages)."""
    assert_greedy_equals_static_sampler(*make({"model.sliding_window": 3}))


def test_pages_come_back_and_a_small_pool_serves_many_times_its_size(tiny):
    cfg, params, eng = tiny
    results = eng.generate([engine.Request(p, max_new_tokens=n) for p, n in zip(PROMPTS * 2, NEW * 2, strict=True)])
    served = sum(len(p) + len(r.tokens) for p, r in zip(PROMPTS * 2, results, strict=True))
    assert eng.free_pages == eng.pages == 8 and eng.stats["peak_pages"] <= 8
    assert served >= 3 * eng.pages * eng.page_size  # 124 tokens through a pool of 32


def test_eos_and_stop_tokens_end_a_request_and_free_its_slot(tiny):
    cfg, params, eng = tiny
    greedy = static_sampler(cfg, params)["tokens"]
    stop = int(greedy[0, 3])
    results = eng.generate([engine.request(PROMPTS[0], max_new_tokens=12, stop=[stop]),
                            engine.request(PROMPTS[2], max_new_tokens=9)])
    first = greedy[0].tolist().index(stop) + 1
    assert results[0] == (greedy[0, :first].tolist(), results[0].logprobs, "stop")
    assert results[1].tokens == greedy[2, :9].tolist() and eng.free_pages == eng.pages


def test_an_answer_does_not_depend_on_its_batch(tiny):
    """Greedy and sampled (its own seed, temperature, top-k, top-p, min-p) requests answer alike alone and among
    others in other slots and pages; the sampled log-probs are the tempered model's, as teacher forcing gives them."""
    cfg, params, eng = tiny
    greedy = engine.Request(PROMPTS[0], max_new_tokens=10)
    sampled = engine.Request(PROMPTS[2], max_new_tokens=10, temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, seed=7)
    alone = [eng.generate([r])[0] for r in (greedy, sampled)]
    others = [engine.Request(p, max_new_tokens=n, temperature=1.0, seed=i) for i, (p, n) in
              enumerate(zip(PROMPTS, NEW, strict=True))]
    batched = eng.generate([others[1], others[3], sampled, others[4], greedy, others[0]])
    for one, many in zip(alone, (batched[4], batched[2]), strict=True):
        assert one.tokens == many.tokens
        np.testing.assert_allclose(one.logprobs, many.logprobs, rtol=1e-6, atol=1e-6)
    seq = jnp.array([PROMPTS[2] + alone[1].tokens])
    logits = transformer.forward(params, seq, jnp.arange(seq.shape[1])[None], jnp.ones_like(seq), cfg).logits_BTV
    want = jnp.take_along_axis(jax.nn.log_softmax(logits[0, len(PROMPTS[2]) - 1:-1] / 0.8), seq[0, len(PROMPTS[2]):,
                               None], axis=-1)[:, 0]
    np.testing.assert_allclose(alone[1].logprobs, want, rtol=1e-5, atol=1e-5)
    assert eng.generate([dataclasses.replace(sampled, seed=8)])[0].tokens != alone[1].tokens


@pytest.mark.parametrize("sizing, req, message", [
    ({}, dict(prompt=[1] * 30, max_new_tokens=3), "= 33 exceeds the engine's max_len=32"),
    ({"max_len": 0, "pages": 0}, dict(prompt=[1] * 250, max_new_tokens=7), "= 257 exceeds the model's max_seq_len=256"),
    ({"pages": 2}, dict(prompt=[1] * 5, max_new_tokens=4), "needs 3 pages of 4 tokens; the pool holds 2: pass pages "
                                                           ">= 3"),
    ({}, dict(prompt=[1], beam_width=2, stop=[0]), "unknown sampling parameter\\(s\\) beam_width; the engine takes"),
    ({}, dict(prompt=[1], top_p=0.0), "out of range: need"),
    ({}, dict(prompt=[], max_new_tokens=3), "need a prompt of at least one token"),
    ({}, dict(prompt=[1, 320], max_new_tokens=3), "outside the model's vocabulary"),
])
def test_refusals_come_before_anything_compiles(sizing, req, message):
    eng = make(**sizing)[2]
    with pytest.raises(LlmjaxError, match=message):
        eng.generate([req])
    assert eng._prefill._cache_size() == eng._decode._cache_size() == 0 and not eng.busy


def test_generate_refuses_an_engine_that_add_filled():
    eng = make()[2]
    eng.add({"prompt": [1, 2], "max_new_tokens": 2})
    with pytest.raises(LlmjaxError, match="generate runs an idle engine"):
        eng.generate([engine.Request([3], max_new_tokens=2)])


def test_progress_reports_running_requests_and_cancel_frees_their_slots(tiny):
    """What a server streams and drops: after a step, each running request's tokens so far (a prefix of its
    answer); a cancelled request, running or waiting, never reports a result and gives its pages back."""
    cfg, params, eng = tiny
    greedy = static_sampler(cfg, params)["tokens"]
    assert eng.check({"prompt": PROMPTS[0], "max_new_tokens": 12}) == engine.Request(PROMPTS[0], 12) and not eng.busy
    ids = [eng.add(engine.Request(p, max_new_tokens=n))[0] for p, n in zip(PROMPTS[:3], NEW[:3], strict=True)]
    assert eng.step() == {}
    progress = {i: list(tokens) for i, (tokens, _) in eng.progress().items()}
    steps = eng.steps_per_call
    assert progress == {ids[0]: greedy[0, :steps].tolist(), ids[1]: greedy[1, :steps].tolist()}  # 2 slots
    eng.cancel(ids[0])  # running
    eng.cancel(ids[2])  # waiting for a slot
    done = {}
    while eng.busy:
        done |= eng.step()
    assert set(done) == {ids[1]} and done[ids[1]].tokens == greedy[1, :NEW[1]].tolist()
    assert eng.free_pages == eng.pages and eng.progress() == {}


@pytest.fixture(scope="module")
def four():
    """4 slots and 16 pages of 4 tokens: room for a group of 4 answers at once."""
    return make(slots=4, pages=16)


def held_and_results(eng, requests, n=1):
    """The pages in use once `requests` (n answers each) are admitted, and their results; every page comes back."""
    ids = [i for r in requests for i in eng.add(r, n)]
    done = eng.step()
    held = eng.pages - eng.free_pages
    while eng.busy:
        done |= eng.step()
    assert eng.free_pages == eng.pages
    return held, [done[i] for i in ids]


@pytest.mark.parametrize("req", [
    engine.Request(PROMPTS[3], max_new_tokens=5),  # 11 tokens: 2 full pages, 3 tokens in a partly filled one
    engine.Request(PROMPTS[3][:8], max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7),  # 2 full pages
], ids=["greedy", "sampled"])
def test_a_group_reads_one_copy_of_its_prompt_and_answers_as_lone_requests(four, req):
    """4 answers of one prompt (4 pages a sequence): the prompt's 2 full pages once and 2 pages an answer (a copy of
    the prompt's partial page, then its answer's), 10 pages where 4 lone requests hold 16, and one prefill where
    they need 4; answer j is the lone request with seed + j, token for token and log-prob for log-prob."""
    cfg, params, eng = four
    prefills = eng.stats["prefill_calls"]
    held, group = held_and_results(eng, [req], n=4)
    chunks = eng.stats["prefill_calls"] - prefills
    held_alone, alone = held_and_results(eng, [dataclasses.replace(req, seed=req.seed + j) for j in range(4)])
    assert (held, held_alone) == (10, 16) and eng.stats["prefill_calls"] - prefills == 5 * chunks
    assert group == alone and eng._fork._cache_size() == 1
    assert len({tuple(r.tokens) for r in group}) == (4 if req.temperature else 1)


def test_cancelled_answers_give_back_their_own_pages_and_the_last_one_the_prompts(four):
    """6 answers of an 11-token prompt with 9 new tokens (5 pages a sequence) on 4 slots: 4 start, holding
    2 + 4 x 3 pages; cancelling 3 of them leaves the prompt's 2 pages to the fourth, and a waiting one is dropped;
    the sixth starts with its own prompt copy, and the two left answer as a lone request does."""
    cfg, params, eng = four
    alone = eng.generate([engine.Request(PROMPTS[3], max_new_tokens=9)])[0]
    ids = eng.add(engine.Request(PROMPTS[3], max_new_tokens=9), n=6)
    eng.step()
    assert eng.pages - eng.free_pages == 14 and set(eng.progress()) == set(ids[:4])
    for id_ in ids[:3] + ids[5:]:
        eng.cancel(id_)
    assert eng.pages - eng.free_pages == 5
    done = eng.step()
    assert eng.pages - eng.free_pages == 10 and set(eng.progress()) == {ids[3], ids[4]}
    while eng.busy:
        done |= eng.step()
    assert done == {ids[3]: alone, ids[4]: alone} and eng.free_pages == eng.pages


def test_a_group_the_pool_cannot_hold_at_once_runs_a_few_answers_at_a_time(tiny):
    """8 pages, 6 a sequence of an 11-token prompt and 13 new tokens, 2 of them the prompt's full pages: 2 answers
    at once would need 10, so 3 answers run one at a time, each the lone request with its seed."""
    cfg, params, eng = tiny
    req = engine.Request(PROMPTS[3], max_new_tokens=13, temperature=1.0, seed=3)
    ids = eng.add(req, n=3)
    done = eng.step()
    assert list(eng.progress()) == ids[:1] and eng.pages - eng.free_pages == 6
    while eng.busy:
        done |= eng.step()
    assert [done[i] for i in ids] == eng.generate([dataclasses.replace(req, seed=3 + j) for j in range(3)])


@pytest.mark.parametrize("n, message", [
    (4, "needs 3 pages of 4 tokens; the pool holds 2: pass pages >= 3 \\(9 to run its 4 answers at once\\)$"),
    (0, "n=0 answers: need at least 1"),
])
def test_group_refusals(n, message):
    """The pool must hold one answer (a group's others can wait); the refusal also says what runs them all at once:
    the prompt's 1 full page and 2 pages an answer."""
    eng = make(pages=2)[2]
    with pytest.raises(LlmjaxError, match=message):
        eng.generate([dict(prompt=[1] * 5, max_new_tokens=4)], n=n)
    assert not eng.busy
