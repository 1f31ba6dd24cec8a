"""An OpenAI-compatible HTTP server on the generation engine:

  python -m llmjax.serve --workdir=runs/sft --port=8000
  python -m llmjax.serve --workdir=hf:/models/Qwen2.5-0.5B --slots=16

POST /v1/completions and /v1/chat/completions (streamed as server-sent events with "stream": true), GET /v1/models.
One thread owns the engine and steps it while any request is in flight; HTTP requests hand it their engine
requests through a queue and wait on their own queue of tokens, so concurrent requests share the continuous batch
and jax is only ever called from that thread. A request the engine or the API refuses gets a 400 with one line; a
client that goes away has its requests dropped from the engine, giving their slots back.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable

import uvicorn
from absl import flags
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from llmjax import generate, openai_api, runs
from llmjax.cli import run_main
from llmjax.data.tokenizer import Tokenizer, get_tokenizer
from llmjax.engine import Engine, Request
from llmjax.errors import LlmjaxError
from llmjax.sharding import make_mesh

logger = logging.getLogger(__name__)
Event = tuple[int, list[int], list[float], str | None]  # (choice, new tokens, their log-probs, finish reason)


def load(workdir: str, **sizing) -> tuple[Engine, Tokenizer]:
    """An engine on a run's latest checkpoint (a workdir or hf:DIR, as llmjax.generate reads them) and the run's
    tokenizer; `sizing` goes to Engine (slots, pages, page_size, max_len)."""
    cfg = generate.language_model(workdir)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    params = runs.load_params(workdir, make_mesh(dict(data=1, fsdp=-1, tensor=1)), reader="serve")
    return Engine(params, cfg.model, eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size, **sizing), tokenizer


def model_name(workdir: str) -> str:
    """What /v1/models lists and responses name: the run's folder name."""
    return os.path.basename(os.path.normpath(workdir.removeprefix("hf:")))


@dataclasses.dataclass
class Ticket:
    """One answer handed to the worker, and what cancels it."""
    send: Callable[[list[int], list[float], str | None], None]  # new tokens, their log-probs, the finish reason
    id: int | None = None  # the engine's, once the worker has added it
    sent: int = 0  # tokens sent so far


class Worker:
    """The thread that owns the engine: it takes requests and cancellations from a queue between steps, steps
    while anything is in flight (sleeping on the queue otherwise), and after each step sends every request its
    new tokens."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[int, Ticket] = {}
        self._thread = threading.Thread(target=self._run, name="llmjax-engine", daemon=True)
        self._thread.start()

    def submit(self, requests: list[Request], n: int = 1) -> tuple[list[Ticket], "asyncio.Queue[Event]"]:
        """Hands `requests` (checked by the engine) to the thread, n answers each, which share their prompt's pages;
        returns their tickets (request i's answer j at i * n + j) and the queue of their Events, fed on the calling
        event loop."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sender(index: int):
            def send(tokens: list[int], logprobs: list[float], finish: str | None) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: the server is shutting down
                    loop.call_soon_threadsafe(events.put_nowait, (index, tokens, logprobs, finish))
            return send

        tickets = [Ticket(sender(i)) for i in range(len(requests) * n)]
        for i, req in enumerate(requests):
            self._inbox.put(("add", tickets[i * n:(i + 1) * n], req))
        return tickets, events

    def cancel(self, tickets: list[Ticket]) -> None:
        """Drops requests from the engine (those that ended already are left alone)."""
        if tickets:
            self._inbox.put(("cancel", tickets))

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                while message := self._inbox.get(block=not self.engine.busy):  # None: close
                    self._handle(*message)
                return
            except queue.Empty:
                pass
            try:
                done = self.engine.step()
            except Exception as e:  # a failed step ends the requests in flight, not the server
                logger.exception("engine step failed")
                done = {id_: ([], [], f"error: {type(e).__name__}") for id_ in self._live}
                for id_ in done:
                    self.engine.cancel(id_)
            progress = self.engine.progress()
            for id_, ticket in list(self._live.items()):
                tokens, logprobs, finish = done[id_] if id_ in done else (*progress.get(id_, ([], [])), None)
                if finish or len(tokens) > ticket.sent:
                    ticket.send(tokens[ticket.sent:], logprobs[ticket.sent:], finish)
                    ticket.sent = len(tokens)
                if finish:
                    del self._live[id_]

    def _handle(self, kind: str, tickets: list[Ticket], request: Request | None = None) -> None:
        if kind == "add":  # the tickets are `request`'s answers
            for ticket, id_ in zip(tickets, self.engine.add(request, len(tickets)), strict=True):
                ticket.id = id_
                self._live[id_] = ticket
            return
        for ticket in tickets:
            if self._live.pop(ticket.id, None):
                self.engine.cancel(ticket.id)


def app(engine: Engine, tokenizer: Tokenizer, model: str) -> FastAPI:
    """The HTTP server's application, with its own engine thread for as long as it runs."""

    @contextlib.asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        api.state.worker = Worker(engine)
        yield
        api.state.worker.close()

    api = FastAPI(title="llmjax", lifespan=lifespan)

    @api.exception_handler(LlmjaxError)
    async def refused(_: HttpRequest, e: LlmjaxError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=400)

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "llmjax"}]}

    async def answer(request: HttpRequest, kind: str) -> dict | StreamingResponse:
        try:
            body = await request.json()
        except ValueError as e:
            raise LlmjaxError(f"the body is not JSON ({e})") from None
        job = openai_api.parse(body, kind, tokenizer, engine)
        worker: Worker = api.state.worker
        tickets, events = worker.submit(job.requests, job.n)
        answers = [openai_api.Answer(tokenizer, job.stop) for _ in tickets]

        async def next_text() -> tuple[int, str, bool]:
            """The next event's choice, the text it released and whether it ended the answer (tokens that follow a
            stop string change nothing; the stop string drops the answer's request from the engine)."""
            index, tokens, logprobs, finish = await events.get()
            if answers[index].finish:
                return index, "", False
            text = answers[index].add(tokens, logprobs, finish)
            if answers[index].finish and not finish:
                worker.cancel([tickets[index]])
            return index, text, bool(answers[index].finish)

        def unfinished() -> list[Ticket]:
            return [t for t, a in zip(tickets, answers, strict=True) if not a.finish]

        if not job.stream:
            try:
                while unfinished():
                    await next_text()
            finally:  # nothing left unless the handler was cancelled
                worker.cancel(unfinished())
            return openai_api.response(job, answers, model)

        async def stream() -> AsyncIterator[str]:
            id_ = openai_api.new_id(job)
            try:
                while unfinished():
                    index, text, ended = await next_text()
                    if text or ended:
                        chunk = openai_api.chunk(job, id_, model, index, answers[index], text)
                        yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away mid-stream: its answers are dropped, their slots freed
                worker.cancel(unfinished())

        return StreamingResponse(stream(), media_type="text/event-stream")

    @api.post("/v1/completions", response_model=None)
    async def completions(request: HttpRequest) -> dict | StreamingResponse:
        return await answer(request, "completions")

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: HttpRequest) -> dict | StreamingResponse:
        return await answer(request, "chat")

    return api


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    engine, tokenizer = load(f.workdir, slots=f.slots, pages=f.pages, page_size=f.page_size)
    name = model_name(f.workdir)
    print(f"serving {name!r} at http://{f.host}:{f.port}/v1 ({f.slots} slots, {engine.pages} pages of {f.page_size} "
          "tokens)", flush=True)
    uvicorn.run(app(engine, tokenizer, name), host=f.host, port=f.port, log_level="warning")


if __name__ == "__main__":  # flags only for the command line: tests import app()
    flags.DEFINE_string("workdir", None, "A run's workdir, or hf:DIR.", required=True)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_integer("slots", 8, "Sequences decoded at once.")
    flags.DEFINE_integer("pages", 0, "KV-cache pages in the pool (0: room for every slot at the model's context).")
    flags.DEFINE_integer("page_size", 16, "Tokens a page.")
    run_main(main)
