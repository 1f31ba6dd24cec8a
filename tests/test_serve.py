"""The OpenAI-compatible server, started in this process on localhost and asked by the real openai client (and by
raw HTTP for what a client library would not send): completions that equal llmjax.generate's, chat, streaming that
adds up to the whole answer, best-of-n with seeds, stop strings, one-line refusals, and a client that hangs up
mid-stream."""

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import openai
import pytest
import uvicorn
from helpers import tiny_config

from llmjax import generate, openai_api, runs, serve
from llmjax.data.tokenizer import ByteTokenizer, get_tokenizer
from llmjax.models import transformer

PROMPT = "sort 321 = "


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny run's server on a free port: (openai client, port, engine, workdir); shut down at the end."""
    workdir = str(tmp_path_factory.mktemp("runs") / "tiny")
    cfg = tiny_config()
    params = jax.tree.map(lambda x: 3 * x, transformer.init(cfg.model, jax.random.key(0)))  # sharper than init
    runs.write_run(workdir, cfg, {"lm": ()}, "import", lambda: params)  # parameters alone: quicker than a train state
    engine, tokenizer = serve.load(workdir, slots=4, page_size=8, max_len=96)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http_server = uvicorn.Server(uvicorn.Config(serve.app(engine, tokenizer, serve.model_name(workdir)),
                                                host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http_server.run, daemon=True)
    thread.start()
    while not http_server.started:
        time.sleep(0.01)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0), port, engine, workdir
    http_server.should_exit = True
    thread.join()


def post(port, path, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def test_greedy_completion_equals_llmjax_generate(server):
    client, _, _, workdir = server
    out = client.completions.create(model="x", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    want = generate.complete(workdir, [PROMPT], fmt="text", max_new_tokens=12)[0]
    assert out.choices[0].text == want and want
    assert out.object == "text_completion" and out.model == serve.model_name(workdir)
    usage, logprobs = out.usage, out.choices[0].logprobs
    assert usage.prompt_tokens == len(get_tokenizer("synthetic").encode(PROMPT, bos=True))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens <= 12
    ended = out.choices[0].finish_reason == "stop"  # at eos, which has no text and no log-prob here
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == usage.completion_tokens - ended
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert [m.id for m in client.models.list().data] == [serve.model_name(workdir)]


def test_chat_completion_and_stream(server):
    client, *_ = server
    out = client.chat.completions.create(model="x", messages=[{"role": "user", "content": PROMPT}], max_tokens=10,
                                         temperature=0)
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="x", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_streamed_completion_adds_up_to_the_whole_answer(server):
    client, *_ = server
    whole = client.completions.create(model="x", prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="x", prompt=PROMPT, max_tokens=30, temperature=0, stream=True))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_concurrent_requests_share_the_batch_and_answer_as_alone(server):
    client, *_ = server
    prompts = [PROMPT, "sort 97 = ", "reverse abc = "]
    alone = [client.completions.create(model="x", prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: client.completions.create(model="x", prompt=p, max_tokens=12,
                                                                     temperature=0).choices[0].text, prompts))
    assert together == alone


def test_n_answers_with_seeds(server):
    """Choice j is sampled with seed + j from one prefill of the prompt: the same request answers alike, and a
    single answer with seed + 1 is the second choice."""
    client, _, engine, _ = server
    params = dict(model="x", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.95, extra_body={"top_k": 50})
    prefills = engine.stats["prefill_calls"]
    first = client.completions.create(n=2, seed=5, **params)
    assert engine.stats["prefill_calls"] == prefills + 1
    again = client.completions.create(n=2, seed=5, **params)
    alone = client.completions.create(n=1, seed=6, **params)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and texts[0] != texts[1] and texts[1] == alone.choices[0].text
    assert [c.index for c in first.choices] == [0, 1]


def test_stop_strings_cut_the_answer(server):
    client, *_ = server
    whole = client.completions.create(model="x", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    for stream in (False, True):
        out = client.completions.create(model="x", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "\x00"],
                                        stream=stream)
        choices = [c.choices[0] for c in out] if stream else out.choices
        assert "".join(c.text for c in choices) == whole[:whole.index(stop)]
        assert choices[-1].finish_reason == "stop"


def test_answer_holds_back_what_a_stop_string_may_still_claim():
    answer = openai_api.Answer(ByteTokenizer(), ["cd"])
    tokens = ByteTokenizer().encode("abcde")
    assert [answer.add([t], [0.0], None) for t in tokens] == ["a", "b", "", "", ""]  # "c" may start "cd"
    assert (answer.text, answer.finish, len(answer.tokens), answer.generated) == ("ab", "stop", 4, 4)


@pytest.mark.parametrize("body, message", [
    (b"{not json", "the body is not JSON"),
    (b"[1, 2]", "the body must be a JSON object, not list"),
    (b'{"model": "x"}', "missing field 'prompt'"),
    (b'{"prompt": "a", "beam_width": 2}', "unknown parameter(s) beam_width; this server takes model, "),
    (b'{"prompt": "a", "temperature": "hot"}', "temperature='hot': expected int or float"),
    (b'{"prompt": "a", "top_p": 0}', "out of range"),
    (json.dumps({"prompt": [1] * 95}).encode(), "a prompt of 95 tokens + max_new_tokens=16 = 111 exceeds the "
                                               "engine's max_len=96"),
    (b'{"messages": [{"role": "system", "content": "a"}]}', "the run's chat template takes exactly one message"),
])
def test_bad_requests_get_a_400_with_one_line(server, body, message):
    _, port, *_ = server
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    status, out = post(port, path, body)
    assert status == 400 and b"\n" not in out
    assert message in json.loads(out)["error"]["message"]


def test_the_openai_client_hears_an_unknown_parameter(server):
    client, *_ = server
    with pytest.raises(openai.BadRequestError, match="unknown parameter\\(s\\) best_of"):
        client.completions.create(model="x", prompt=PROMPT, max_tokens=4, best_of=2)


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(server, monkeypatch):
    """The engine is slowed, so that the server hears the hang-up long before the answer's 80 tokens: the request is
    dropped (every page back in the pool), and the next request is answered."""
    client, port, engine, _ = server
    cancelled, step, cancel = [], engine.step, engine.cancel
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])
    monkeypatch.setattr(engine, "cancel", lambda id_: (cancelled.append(id_), cancel(id_)))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": PROMPT, "max_tokens": 80, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: {")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 10
    while (engine.busy or not cancelled) and time.time() < deadline:
        time.sleep(0.02)
    assert cancelled and not engine.busy and engine.free_pages == engine.pages
    assert client.completions.create(model="x", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
