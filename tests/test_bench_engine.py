"""python -m llmjax.bench engine in miniature: both sides give the same tokens, the engine compiles its decode step
once, and on skewed answer lengths it takes fewer steps and holds fewer KV bytes than the static sampler."""

from helpers import tiny_config

from llmjax import bench_engine


def test_the_engine_matches_the_static_sampler_and_saves_steps_and_memory_on_skewed_answers():
    out = bench_engine.bench_engine(tiny_config(), requests=8, slots=4, short=(2, 6), long=16, page_size=4)
    for case in ("equal", "skewed"):
        assert out[case]["same_tokens"] and out[case]["engine_compiles"]["decode"] == 1, out[case]
    skewed = out["skewed"]
    assert skewed["engine_decode_steps"] < skewed["static_decode_steps"]
    assert skewed["engine_kv_bytes_in_flight_peak"] < skewed["static_kv_bytes_in_flight"]
    assert skewed["engine_kv_bytes_filled_mean"] <= skewed["engine_kv_bytes_in_flight_mean"]
