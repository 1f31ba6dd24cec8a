"""OpenAI's completions API in llmjax's terms, without HTTP (llmjax.serve carries it): a request body becomes the
engine's requests, each answer's tokens become its text (cut at stop strings), and answers become OpenAI's
response and stream-chunk objects.

Requests are checked whole before anything runs: an unknown parameter is refused rather than ignored (a client
asking for a feature the engine lacks should hear so), and every refusal is one line.
"""

import dataclasses
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

from llmjax.data import chat
from llmjax.data.tokenizer import Tokenizer
from llmjax.engine import Engine, Request
from llmjax.errors import LlmjaxError

_INT, _NUMBER, _BOOL, _STR = (int,), (int, float), (bool,), (str,)
_SAMPLING = {"model": _STR, "max_tokens": _INT, "temperature": _NUMBER, "top_p": _NUMBER, "top_k": _INT,
             "min_p": _NUMBER, "seed": _INT, "stop": (str, list), "n": _INT, "stream": _BOOL, "user": _STR}
FIELDS = {
    "completions": _SAMPLING | {"prompt": (str, list), "logprobs": _INT},
    "chat": _SAMPLING | {"messages": (list,), "logprobs": _BOOL, "max_completion_tokens": _INT},
}
DEFAULT_MAX_TOKENS = 16  # OpenAI's for completions; a chat answer may run to the end of the context


@dataclasses.dataclass
class Job:
    """One HTTP request as the engine sees it: its prompts' token ids and one engine request per prompt, answered n
    times (prompt i's j-th answer is choice i * n + j, as OpenAI numbers them, sampled with seed + j from one copy
    of the prompt's pages)."""
    chat: bool
    prompts: list[list[int]]
    requests: list[Request]
    n: int
    stop: list[str]
    logprobs: bool
    stream: bool


def parse(body: Any, kind: str, tokenizer: Tokenizer, engine: Engine) -> Job:
    """A request body (decoded JSON) of `kind` ("completions" or "chat") as engine requests, each checked by the
    engine; any mistake is a one-line LlmjaxError."""
    fields = FIELDS[kind]
    if not isinstance(body, dict):
        raise LlmjaxError(f"the body must be a JSON object, not {type(body).__name__}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise LlmjaxError(f"unknown parameter(s) {', '.join(unknown)}; this server takes {', '.join(fields)}")
    for name, value in body.items():
        if value is not None and (not isinstance(value, fields[name]) or
                                  isinstance(value, bool) and bool not in fields[name]):  # json's true is no int
            raise LlmjaxError(f"{name}={_short(value)}: expected {' or '.join(t.__name__ for t in fields[name])}")
    body = {k: v for k, v in body.items() if v is not None}
    main = "messages" if kind == "chat" else "prompt"
    if main not in body:
        raise LlmjaxError(f"missing field {main!r}")
    prompts = [_chat_prompt(tokenizer, body["messages"])] if kind == "chat" else _prompts(tokenizer, body["prompt"])
    n, stop = body.get("n", 1), body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if n < 1 or not all(isinstance(s, str) for s in stop):
        raise LlmjaxError(f"n={n}, stop={_short(stop)}: need n >= 1 and stop a string or a list of strings")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and max_tokens < 1:
        raise LlmjaxError(f"max_tokens={max_tokens}: need at least 1")
    seed = body.get("seed", random.randrange(2**32))  # no seed: a fresh answer each time, as OpenAI's
    params = {"temperature": 1.0} | {k: body[k] for k in ("temperature", "top_p", "top_k", "min_p") if k in body}
    requests = []
    for ids in prompts:
        budget = max_tokens or (max(1, engine.max_len - len(ids)) if kind == "chat" else DEFAULT_MAX_TOKENS)
        requests.append(engine.check(dict(prompt=ids, max_new_tokens=budget, seed=seed % 2**32, **params), n))
    return Job(kind == "chat", prompts, requests, n, [s for s in stop if s], body.get("logprobs", False) is not False,
               body.get("stream", False))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _prompts(tokenizer: Tokenizer, prompt: Any) -> list[list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of lists of them. Text
    starts with bos, as llmjax.generate feeds a text-format run; token ids go in as they are."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompt = [prompt]
    if not prompt:
        raise LlmjaxError("prompt is empty; pass a string, a list of strings or a list of token ids")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(tokenizer.encode(p, bos=True))
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(p)
        else:
            raise LlmjaxError(f"prompt holds {_short(p)}; pass strings or lists of token ids")
    return out


def _chat_prompt(tokenizer: Tokenizer, messages: list) -> list[int]:
    """One user message through the run's chat template (the one SFT trained on and generation uses), which has
    no system turn nor earlier turns to render."""
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user" or not \
            isinstance(messages[0].get("content"), str) or set(messages[0]) - {"role", "content", "name"}:
        raise LlmjaxError(f"messages={_short(messages)}: the run's chat template takes exactly one message, "
                          "{\"role\": \"user\", \"content\": TEXT}")
    return chat.prompt_ids(tokenizer, messages[0]["content"])


class Answer:
    """One choice's text as its tokens arrive: decoded whole each time, cut at the first stop string, and released
    only up to what later tokens cannot change (a partial UTF-8 character, the start of a stop string), so that
    streamed pieces add up to the text a non-streamed request gets."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.text, self.finish, self.generated, self.sent, self.logged = "", None, 0, 0, 0

    def add(self, tokens: list[int], logprobs: list[float], finish: str | None) -> str:
        """Takes the engine's next tokens (with its finish reason once it ends) and returns the text now safe to
        send; after a stop string, `finish` is "stop" and the engine's request can be dropped."""
        if self.finish:
            return ""
        self.generated += len(tokens)
        if finish == "stop":  # the engine ends at eos, which is no text
            tokens, logprobs = tokens[:-1], logprobs[:-1]
        start = len(self.tokens)
        self.tokens += tokens
        self.logprobs += logprobs
        text = self.tokenizer.decode(self.tokens)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:  # keep the tokens up to the one that completed the stop string
            text, finish = text[:min(cuts)], "stop"
            keep = next((k for k in range(start + 1, len(self.tokens) + 1)
                         if any(s in self.tokenizer.decode(self.tokens[:k]) for s in self.stop)), len(self.tokens))
            del self.tokens[keep:], self.logprobs[keep:]
        self.text, self.finish = text, finish
        end = len(text) if finish else len(text) - _held(text, self.stop)
        new, self.sent = text[self.sent:end], max(self.sent, end)
        return new

    def new_logprobs(self) -> list[tuple[str, float]]:
        """(token text, log-prob) of each kept token not reported yet; a token's text is what it adds to the
        decoded text (a token decoded alone may lose its leading space)."""
        out = []
        for i in range(self.logged, len(self.tokens)):
            before = len(self.tokenizer.decode(self.tokens[:i]))
            out.append((self.tokenizer.decode(self.tokens[:i + 1])[before:], self.logprobs[i]))
        self.logged = len(self.tokens)
        return out


def _held(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters may still change: an undecodable partial character and a stop string's
    beginning."""
    body = text.rstrip("\ufffd")
    return len(text) - len(body) + max((k for s in stop for k in range(1, len(s)) if body.endswith(s[:k])), default=0)


def _logprobs(chat_: bool, items: list[tuple[str, float]]) -> dict:
    if chat_:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, lp in items]}
    return {"tokens": [t for t, _ in items], "token_logprobs": [lp for _, lp in items],
            "top_logprobs": [{t: lp} for t, lp in items]}


def _envelope(job: Job, model: str, id_: str, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if job.chat else "text_completion"
    return {"id": id_, "object": kind, "created": int(time.time()), "model": model}


def new_id(job: Job) -> str:
    return f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"


def response(job: Job, answers: Sequence[Answer], model: str) -> dict:
    """The whole answer, as OpenAI's (chat) completion object."""
    choices = []
    for i, answer in enumerate(answers):
        text = {"message": {"role": "assistant", "content": answer.text}} if job.chat else {"text": answer.text}
        choices.append({"index": i, **text, "finish_reason": answer.finish,
                        "logprobs": _logprobs(job.chat, answer.new_logprobs()) if job.logprobs else None})
    prompt_tokens, completion_tokens = sum(map(len, job.prompts)), sum(a.generated for a in answers)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return _envelope(job, model, new_id(job), chunk=False) | {"choices": choices, "usage": usage}


def chunk(job: Job, id_: str, model: str, index: int, answer: Answer, text: str) -> dict:
    """One stream event: the text `answer` (choice `index`) released since the last one, and its finish reason
    once it has one."""
    piece = {"delta": {"role": "assistant", "content": text}} if job.chat else {"text": text}
    choice = {"index": index, **piece, "finish_reason": answer.finish,
              "logprobs": _logprobs(job.chat, answer.new_logprobs()) if job.logprobs else None}
    return _envelope(job, model, id_, chunk=True) | {"choices": [choice]}
