"""Generation: the KV cache changes nothing but speed, log-probs are the model's, filters hold, EOS stops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from llmjax import optim, sampling, sharding
from llmjax.models import transformer
from llmjax.train import state

PROMPTS = [[1, 50, 60, 70, 80, 90, 100], [1, 40], [1, 33, 44, 55, 66]]
N_NEW = 12


def setup(mesh_cfg, devices):
    cfg = tiny_config()
    cfg.mesh = mesh_cfg
    mesh = sharding.make_mesh(cfg.mesh, devices)
    specs = transformer.specs(cfg.model)
    params = state.create(specs, cfg, mesh, optim.make(cfg, specs)).params
    return cfg, params, sharding.make_constrain(mesh, cfg.rules)


@pytest.fixture(scope="module")
def single():
    return setup(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def teacher_forced(cfg, params, prompts, answers_BR, temperature=1.0) -> np.ndarray:
    """Without a cache: the tempered log-probs of every row's answer after its prompt, all rows right-padded into
    one forward (a causal model's earlier positions never see the padding)."""
    width = max(map(len, prompts)) + answers_BR.shape[1]
    seq_BT = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        seq_BT[row, :len(prompt) + answers_BR.shape[1]] = [*prompt, *answers_BR[row]]
    logits_BTV = transformer.forward(params, jnp.asarray(seq_BT), jnp.broadcast_to(jnp.arange(width), seq_BT.shape),
                                     jnp.ones_like(seq_BT), cfg.model)[0]
    logp_BTV = np.asarray(jax.nn.log_softmax(logits_BTV / temperature))
    return np.stack([logp_BTV[row, np.arange(len(prompt) - 1, len(prompt) - 1 + answers_BR.shape[1]),
                              answers_BR[row]] for row, prompt in enumerate(prompts)])


def recompute_greedy(cfg, params, prompts, n) -> list[list[int]]:
    """No cache: every row's whole sequence through the model for each new token, all rows right-padded to one
    length, so it compiles once."""
    fwd = jax.jit(lambda p, t: transformer.forward(p, t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape),
                                                   jnp.ones_like(t), cfg.model)[0])
    rows = [list(prompt) for prompt in prompts]
    for _ in range(n):
        padded = np.zeros((len(rows), max(map(len, prompts)) + n), np.int32)
        for row, tokens in enumerate(rows):
            padded[row, :len(tokens)] = tokens
        logits_BTV = fwd(params, jnp.asarray(padded))
        for row, tokens in enumerate(rows):
            tokens.append(int(jnp.argmax(logits_BTV[row, len(tokens) - 1])))
    return [tokens[len(prompt):] for tokens, prompt in zip(rows, prompts, strict=True)]


def test_greedy_cache_equals_recompute(single):
    cfg, params, _ = single
    prompts, lengths = sampling.left_pad(PROMPTS)
    out = sampling.sampler(cfg.model, max_new_tokens=N_NEW, eos_id=-1)(params, prompts, lengths, jax.random.key(0))
    assert out["tokens"].tolist() == recompute_greedy(cfg, params, PROMPTS, N_NEW)
    np.testing.assert_array_equal(out["lengths"], N_NEW)


def test_greedy_cache_equals_recompute_with_sliding_windows():
    """The cache's slots are compared as the forward pass's positions are: a window shorter than the prompts and
    answers, on one layer of two, gives the same tokens either way."""
    cfg = tiny_config(**{"model.sliding_window": 3, "model.layer_types": "sliding,full"})
    params = transformer.init(cfg.model, jax.random.key(0))
    prompts, lengths = sampling.left_pad(PROMPTS)
    out = sampling.sampler(cfg.model, max_new_tokens=N_NEW, eos_id=-1)(params, prompts, lengths, jax.random.key(0))
    assert out["tokens"].tolist() == recompute_greedy(cfg, params, PROMPTS, N_NEW)


def test_a_prompt_prefilled_in_chunks_equals_one_call(single):
    """Chunks of 3 (prompts padded from 8 to 9 slots on the left) give the one-call prefill's tokens and log-probs."""
    cfg, params, _ = single
    prompts, lengths = sampling.left_pad(PROMPTS)
    assert sampling.prefill_plan(cfg.model, prompts.shape[1], N_NEW, chunk=3) == (3, 9 + N_NEW)
    ref, out = (sampling.sampler(cfg.model, max_new_tokens=N_NEW, eos_id=-1, temperature=1.0, prefill_chunk=chunk)(
        params, prompts, lengths, jax.random.key(0)) for chunk in (512, 3))
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], rtol=1e-5, atol=1e-5)


def test_every_layer_windowed_generates_through_a_ring_of_two_windows():
    """A window of 3 on every layer: the prompts prefill 3 tokens a call into a ring of 5 slots, which wraps
    several times over 9 + 12 tokens, and the tokens and log-probs are those of the whole sequence without a
    cache."""
    cfg = tiny_config(**{"model.sliding_window": 3})
    prompts, lengths = sampling.left_pad(PROMPTS)
    assert sampling.prefill_plan(cfg.model, prompts.shape[1], N_NEW) == (3, 5)
    assert sampling.prefill_plan(cfg.model, 2, 1) == (2, 3)  # a ring would not be smaller
    params = transformer.init(cfg.model, jax.random.key(0))
    out = sampling.sampler(cfg.model, max_new_tokens=N_NEW, eos_id=-1)(params, prompts, lengths, jax.random.key(0))
    assert out["tokens"].tolist() == recompute_greedy(cfg, params, PROMPTS, N_NEW)
    want = teacher_forced(cfg, params, PROMPTS, np.asarray(out["tokens"]))
    np.testing.assert_allclose(out["logprobs"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=4, tensor=2),
                                  dict(data=1, fsdp=2, context=2, tensor=2)])  # the cache's slots split in two
def test_greedy_sharded_equals_single(single, mesh):
    cfg, params, _ = single
    # 4 rows: divisible by fsdp=4; 8 + 12 slots: divisible by context=2
    prompts, lengths = sampling.left_pad(PROMPTS + [[1, 7, 8, 9, 10, 11, 12, 13]])
    ref = sampling.sampler(cfg.model, max_new_tokens=N_NEW, eos_id=-1)(params, prompts, lengths, jax.random.key(0))
    cfg_s, params_s, constrain = setup(mesh, jax.devices())
    out = sampling.sampler(cfg_s.model, max_new_tokens=N_NEW, eos_id=-1, constrain=constrain)(
        params_s, prompts, lengths, jax.random.key(0))
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forcing_at_the_temperature(single, temperature):
    cfg, params, _ = single
    prompts, lengths = sampling.left_pad(PROMPTS)
    out = sampling.sampler(cfg.model, max_new_tokens=N_NEW, eos_id=-1, temperature=temperature)(
        params, prompts, lengths, jax.random.key(1))
    want = teacher_forced(cfg, params, PROMPTS, np.asarray(out["tokens"]), temperature)
    np.testing.assert_allclose(out["logprobs"], want, rtol=1e-4, atol=1e-5)


def test_eos_stops_each_row(single):
    cfg, params, _ = single
    prompts, lengths = sampling.left_pad(PROMPTS)
    greedy = sampling.sampler(cfg.model, max_new_tokens=N_NEW, eos_id=-1)(params, prompts, lengths, jax.random.key(0))
    eos = int(greedy["tokens"][0, 3])
    first = [int(np.argmax(r == eos)) + 1 if (r == eos).any() else N_NEW for r in greedy["tokens"]]
    out = sampling.sampler(cfg.model, max_new_tokens=N_NEW, eos_id=eos, pad_id=0)(params, prompts, lengths,
                                                                                 jax.random.key(0))
    np.testing.assert_array_equal(out["lengths"], first)
    for row, n in enumerate(first):
        assert out["tokens"][row, :n].tolist() == greedy["tokens"][row, :n].tolist()
        assert (out["tokens"][row, n:] == 0).all() and (out["logprobs"][row, n:] == 0).all()


def test_top_k_one_is_greedy(single):
    cfg, params, _ = single
    prompts, lengths = sampling.left_pad(PROMPTS)
    greedy = sampling.sampler(cfg.model, max_new_tokens=N_NEW, eos_id=-1)(params, prompts, lengths, jax.random.key(0))
    top1 = sampling.sampler(cfg.model, max_new_tokens=N_NEW, eos_id=-1, temperature=1.5, top_k=1)(
        params, prompts, lengths, jax.random.key(5))
    np.testing.assert_array_equal(top1["tokens"], greedy["tokens"])


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (8, 0.3)])
def test_filters_keep_only_allowed_tokens(top_k, top_p):
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    probs = np.asarray(jax.nn.softmax(logits / 0.7))
    allowed = np.ones_like(probs, bool)
    for b in range(4):
        order = np.argsort(-probs[b])
        if top_k:
            allowed[b, order[top_k:]] = False
        if top_p < 1:
            p = probs[b] * allowed[b]
            p = p / p.sum()
            cum_before = np.cumsum(p[order]) - p[order]
            allowed[b, order[cum_before >= top_p]] = False
    keys = jax.random.split(jax.random.key(1), 2000)
    filtered = sampling.filter_logits(logits, 0.7, top_k, top_p)
    draws = np.asarray(jax.vmap(lambda k: jax.random.categorical(k, filtered))(keys))  # [2000, 4]
    for b in range(4):
        assert set(draws[:, b]) <= set(np.flatnonzero(allowed[b]))
        assert np.argmax(probs[b]) in set(draws[:, b])


def test_filter_rows_is_filter_logits_row_by_row_and_min_p_keeps_the_likely():
    """Settings as arrays, one row each, give filter_logits' logits at each row's settings; min-p then drops the
    tokens less likely than min_p x the most likely one."""
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    settings = [(0.7, 5, 1.0), (1.0, 0, 0.6), (1.3, 8, 0.3), (0.5, 0, 1.0)]
    temperature, top_k, top_p = (jnp.array(column) for column in zip(*settings, strict=True))
    rows = sampling.filter_rows(logits, temperature, top_k, top_p, jnp.zeros(4))
    for b, (t, k, p) in enumerate(settings):
        np.testing.assert_array_equal(rows[b], sampling.filter_logits(logits[b:b + 1], t, k, p)[0])
    kept = sampling.filter_rows(logits, jnp.ones(4), jnp.zeros(4, jnp.int32), jnp.ones(4), jnp.full(4, 0.1))
    probs = jax.nn.softmax(logits)
    np.testing.assert_array_equal(jnp.isfinite(kept), probs >= 0.1 * probs.max(axis=-1, keepdims=True))
