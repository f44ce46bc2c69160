"""An OpenAI-compatible HTTP server for a run: `/v1/completions` and `/v1/chat/completions`, streaming
included, so any OpenAI client, judge script or chat front end can talk to a gptlab model.

Chat messages are laid out with the run's prompt template (its `template`), the way the model was
finetuned; a plain pretrained run continues the conversation's text freely.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from gptlab.config import GenerationConfig
from gptlab.errors import GptlabError


class RequestError(GptlabError):
    """A request this server cannot answer, naming the field at fault (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool = True  # OpenAI pads its chunks against side channels; nothing to pad here


class _Sampling(BaseModel):
    # NaN or infinite sampling values break decoding; a field this server does not know is refused, as
    # OpenAI's API refuses it, rather than answered as if it had not been sent.
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, description="tokens to generate (default: the server's)")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = 1
    user: str | None = None  # OpenAI's end-user id: nothing to do with the answer
    service_tier: str | None = None  # OpenAI's billing tier: nothing to do with the answer
    # OpenAI's fields that would change the answer and that gptlab does not do: accepted only at the
    # values that ask for nothing (clients send their defaults), refused otherwise (`_unsupported`).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = ""  # text, texts, or token ids
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


class _ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[_ContentPart] | None = None  # none: an assistant turn of OpenAI's tool calls
    name: str | None = None

    def text(self) -> str:
        """The message's text; a list of content parts must all be text, joined."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        kinds = {part.type for part in self.content} - {"text"}
        if kinds:
            raise RequestError(f"only text message content is supported, got {', '.join(sorted(kinds))}", "messages")
        if any(part.text is None for part in self.content):
            raise RequestError("a text content part needs its text", "messages")
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens in chat
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    reasoning_effort: str | None = None


def _unsupported(request: _Sampling) -> None:
    """A request that asks for what gptlab does not do (log-probabilities, tools, penalties other than its
    repetition penalty, ...) is refused naming the field, never answered as if the field had not been sent."""
    fields = request.model_dump()
    asked = {
        "presence_penalty": fields["presence_penalty"] != 0,
        "frequency_penalty": fields["frequency_penalty"] != 0,
        "logit_bias": bool(fields["logit_bias"]),
        # Chat's false asks for nothing; completions' 0 asks for the sampled tokens' own (0 == False in Python).
        "logprobs": fields.get("logprobs") is not None and fields.get("logprobs") is not False,
        "reasoning_effort": fields.get("reasoning_effort") is not None,
        "top_logprobs": bool(fields.get("top_logprobs")),
        "suffix": bool(fields.get("suffix")),
        "best_of": (fields.get("best_of") or 1) > 1,
        "tools": bool(fields.get("tools")),
        "functions": bool(fields.get("functions")),
        "tool_choice": fields.get("tool_choice") not in (None, "none", "auto"),
        "function_call": fields.get("function_call") not in (None, "none", "auto"),
        "response_format": (fields.get("response_format") or {}).get("type", "text") != "text",
    }
    hints = {
        "presence_penalty": "; use repetition_penalty (1.0 is off)",
        "frequency_penalty": "; use repetition_penalty (1.0 is off)",
        "tools": ": the model has no tool calling",
        "functions": ": the model has no tool calling",
        "response_format": ": only text output",
        "reasoning_effort": ": the model does not reason before it answers",
    }
    for name, given in asked.items():
        if given:
            raise RequestError(f"{name} is not supported by this server{hints.get(name, '')}", name)
    if request.stream_options is not None and not request.stream:
        raise RequestError("stream_options is only allowed with stream: true", "stream_options")


# The most tokens one request may ask for, unless `gptlab serve --max-tokens-limit` says otherwise: a batch
# takes no request in once it has started, so one asking for 100,000 tokens would hold every later client
# for minutes.
MAX_TOKENS_LIMIT = 4096


def _generation_config(
    request: _Sampling, defaults: GenerationConfig, limit: int, extra_stop: tuple[str, ...] = ()
) -> GenerationConfig:
    """The server's defaults overridden by the request's sampling fields."""
    if request.n != 1:
        raise RequestError("only n=1 is supported; send several requests for several completions", "n")
    _unsupported(request)
    lengths = {
        "max_tokens": request.max_tokens,
        "max_completion_tokens": getattr(request, "max_completion_tokens", None),
    }
    for name, value in lengths.items():
        if value is not None and not 1 <= value <= limit:
            raise RequestError(f"{name} must be from 1 to this server's limit of {limit}, got {value}", name)
    # Chat's newer name wins over the older one when both are sent.
    max_tokens = (
        lengths["max_completion_tokens"] if lengths["max_completion_tokens"] is not None else request.max_tokens
    )
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    overrides: dict[str, Any] = {"stop": [*stop, *extra_stop]}
    if max_tokens is not None:
        overrides["max_new_tokens"] = max_tokens
    for field in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):  # the same names
        value = getattr(request, field)
        if value is not None:
            overrides[field] = value
    return dataclasses.replace(defaults, **overrides)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completion request: a text, a list of texts, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(token, int) for token in prompt):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _checked_ids(ids: list[int], vocab_size: int) -> list[int]:
    outside = [token for token in ids if not 0 <= token < vocab_size]
    if outside:
        raise RequestError(f"prompt token id {outside[0]} is outside the vocabulary (0 to {vocab_size - 1})", "prompt")
    return ids


def _error(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    """An error in OpenAI's shape; `param` names the request field at fault, when one is."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return JSONResponse(status_code=status, content={"error": error})


def _server_error(exc: Exception) -> dict[str, Any]:
    """A failure of the decoding itself (not of the request), in OpenAI's shape: the body of a 500, or the
    last event of a stream that has already started."""
    return {"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None, "code": None}}


def _refused(exc: GptlabError) -> JSONResponse:
    return _error(str(exc), getattr(exc, "param", None))


def _invalid_request(_request, exc: RequestValidationError) -> JSONResponse:
    """A request body of the wrong shape, as OpenAI's API answers it: a 400 naming the first bad field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        return _error(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})")
    if tuple(first["loc"]) == ("body",):  # not an object: a list, or a body not sent as JSON
        return _error("the request body must be a JSON object, sent with content-type: application/json")
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    param = str(first["loc"][1]) if len(first["loc"]) > 1 else None
    if first.get("type") == "extra_forbidden":
        return _error(
            f"unknown field {where!r}: this server takes OpenAI's fields for this endpoint (docs/generation.md)", param
        )
    if param == "prompt":  # pydantic names each shape it tried; one sentence says them all
        return _error("prompt must be a text, a list of texts, or token ids (whole numbers, or lists of them)", param)
    return _error(f"{where}: {first['msg']}" if where else first["msg"], param)


@dataclass
class _Outcome:
    """How one prompt's generation went, known once its pieces are all read."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}  # fmt: skip


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (0: any free port); a bad port, an unknown host or an address
    in use is a one-line error, before a model is loaded."""
    if not 0 <= port <= 65535:
        raise GptlabError(f"the port must be from 0 to 65535, got {port}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise GptlabError(f"cannot listen on host {host!r} ({exc.strerror})") from None
    try:
        return socket.create_server(address, family=family)
    except OSError as exc:  # its message repeats the address; the errno's text alone reads better
        raise GptlabError(f"cannot listen on {host}:{port} ({os.strerror(exc.errno) if exc.errno else exc})") from None


def _without_leading_space(pieces: Iterator[str]) -> Iterator[str]:
    """A streamed reply's pieces without its leading white space, which the whole reply drops too."""
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece


def _streamed(chunks: Iterator[dict[str, Any]], request: _Sampling, head: dict, job: _Job) -> StreamingResponse:
    """The chunks as server-sent events. With `stream_options.include_usage`, as OpenAI streams: every chunk
    carries `"usage": null`, and a last one without choices the usage, known once the others are sent."""
    from starlette.concurrency import iterate_in_threadpool

    with_usage = bool(request.stream_options and request.stream_options.include_usage)

    def events() -> Iterator[dict[str, Any]]:
        for chunk in chunks:
            yield {**chunk, "usage": None} if with_usage else chunk
        if with_usage:
            yield {**head, "choices": [], "usage": job.outcome.usage()}

    async def body():
        # Starlette cancels the body when the client leaves but never closes a plain iterator, so the
        # decoder would go on decoding the row, every other client waiting behind it, until garbage
        # collection closed the generators: the row is marked abandoned here, however the body ends.
        try:
            async for text in iterate_in_threadpool(_sse(events())):
                yield text
        finally:
            job.abandoned = True

    return StreamingResponse(body(), media_type="text/event-stream")


def _sse(payloads: Iterator[dict[str, Any]]) -> Iterator[str]:
    """Server-sent events; a failure after the stream has started ends it with an error event, no [DONE]."""
    try:
        for payload in payloads:
            yield f"data: {json.dumps(payload)}\n\n"
    except Exception as exc:  # noqa: BLE001 - the status line is sent: the client learns of it in the stream
        yield f"data: {json.dumps(_server_error(exc))}\n\n"
        return
    yield "data: [DONE]\n\n"


_END = object()  # a job's last item: its row has ended


@dataclass(eq=False)  # compared and hashed by identity: a job is its own key in a batch
class _Job:
    """One prompt's generation: its prepared ids and settings, and the queue its pieces arrive on."""

    ids: list[int]
    config: GenerationConfig
    outcome: _Outcome
    pieces: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue)
    abandoned: bool = False  # its reader is gone (the reply is complete, or the client left)

    def read(self) -> Iterator[str]:
        """The pieces as the decoder sends them; an error of the decoding is raised here."""
        try:
            while (item := self.pieces.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.abandoned = True


def batch_settings(config: GenerationConfig) -> GenerationConfig:
    """What requests decoded in one batch must share: everything but each row's own sampling settings
    (`generate.SAMPLING_FIELDS`), length and stop strings."""
    from gptlab.generate import SAMPLING_FIELDS

    default = GenerationConfig()
    own = (*SAMPLING_FIELDS, "max_new_tokens", "stop")
    return dataclasses.replace(config, **{name: getattr(default, name) for name in own})


class Batcher:
    """The one thread that decodes. Requests wait in order; it starts the first with every waiting request
    that may share its batch (`batch_settings`: each keeps its own sampling settings, max_tokens and
    stop strings; up to their `batch_size`), sending each its pieces as they come. While they decode,
    each row that ends makes room for the next waiting request with those settings (continuous
    batching), until one with other settings is first in line: then the batch runs out and that
    request starts the next. A batch of 8 decodes several times the tokens per second of one row
    (docs/generation.md), so concurrent clients wait less. A seeded request runs alone: its samples
    must not depend on what it was batched with. A request whose prefill fails as it joins fails
    alone; a failure of a step fails the batch."""

    # How long the first request of a batch waits for others: clients that send at the same moment arrive
    # a few milliseconds apart.
    GATHER_SECONDS = 0.02
    HISTORY = 4096

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.waiting: collections.deque[_Job] = collections.deque()
        self.ready = threading.Condition()
        # For tests and benchmarks, the latest few thousand only (a long-lived server would grow them):
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=self.HISTORY)  # each batch's first rows
        self.joined: collections.deque[int] = collections.deque(maxlen=self.HISTORY)  # rows joining running batches
        self.joining = True  # False: a batch keeps to the requests it started with (static batching, to compare)
        threading.Thread(target=self._work, name="gptlab-decoder", daemon=True).start()

    def submit(self, jobs: list[_Job]) -> None:
        with self.ready:
            self.waiting.extend(jobs)
            self.ready.notify()

    def _next_batch(self) -> list[_Job]:
        with self.ready:
            while not self.waiting or self.waiting[0].abandoned:  # a client that left while it waited
                if self.waiting:
                    self.waiting.popleft().pieces.put(_END)
                else:
                    self.ready.wait()
            first = self.waiting.popleft()
            batch, deadline = [first], time.monotonic() + self.GATHER_SECONDS
            while first.config.seed is None and len(batch) < first.config.batch_size:
                batch += self._take_waiting(first.config, first.config.batch_size - len(batch), anywhere=True)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.ready.wait(left)
            return batch

    def _take_waiting(self, config: GenerationConfig, room: int, anywhere: bool = False) -> list[_Job]:
        """Up to `room` waiting requests with these settings: from anywhere in line for a new batch, from the
        front of the line for a running one (so that a request with other settings is not passed over
        for ever). Requests whose client left are answered and dropped. Called holding `self.ready`."""
        taken, kept, shared = [], collections.deque(), batch_settings(config)
        while self.waiting and len(taken) < room:
            job = self.waiting.popleft()
            if job.abandoned:
                job.pieces.put(_END)
            elif job.config.seed is None and batch_settings(job.config) == shared:
                taken.append(job)
            else:
                kept.append(job)
                if not anywhere:
                    break
        self.waiting.extendleft(reversed(kept))
        return taken

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            self.batch_sizes.append(len(batch))
            self._decode(batch)

    def _decode(self, batch: list[_Job]) -> None:
        from gptlab.generate import stream_texts

        jobs = set(batch)  # the requests still decoding
        config, starting = batch[0].config, list(batch)

        def take(room: int) -> list[tuple[_Job, list[int], GenerationConfig]]:
            nonlocal starting
            if starting:
                chosen, starting = starting[:room], starting[room:]
            elif config.seed is not None or not self.joining:
                chosen = []
            else:
                with self.ready:
                    chosen = self._take_waiting(config, room)
                if chosen:
                    self.joined.append(len(chosen))
            jobs.update(chosen)
            return [(job, job.ids, job.config) for job in chosen]

        def ended(job: _Job, tokens: int, reason: str) -> None:
            jobs.discard(job)
            job.outcome.completion_tokens, job.outcome.finish_reason = tokens, reason
            job.pieces.put(_END)

        def abandoned(job: _Job) -> bool:  # a client that left: its row stops, and its reader is woken
            if job.abandoned:
                jobs.discard(job)
                job.pieces.put(_END)
            return job.abandoned

        def join_failed(failed: list[_Job], error: Exception) -> None:  # only they fail, the batch goes on
            for job in failed:
                jobs.discard(job)
                job.pieces.put(error)

        try:
            rows = stream_texts(self.model, self.tokenizer, config, take, ended, None, abandoned, join_failed)
            for job, piece in rows:
                job.pieces.put(piece)
        except Exception as exc:  # noqa: BLE001 - the batch's requests fail with it; the server goes on
            for job in jobs:
                job.pieces.put(exc)


def create_app(
    run, name: str, defaults: GenerationConfig | None = None, max_tokens_limit: int = MAX_TOKENS_LIMIT
) -> FastAPI:
    """The FastAPI app serving `run` (a LoadedRun) under the model name `name`; a request may ask for at
    most `max_tokens_limit` tokens. Concurrent requests are decoded together (`Batcher`, on
    `app.state.batcher`), up to the defaults' `batch_size`."""
    from gptlab.generate import prepare_prompt
    from gptlab.templates import ROLES, format_messages, get_template

    defaults = defaults or GenerationConfig(max_new_tokens=128, temperature=0.7)
    template = get_template(run.config["template"]) if run.config.get("template") else None
    tokenizer, model = run.tokenizer, run.model
    batcher = Batcher(model, tokenizer)
    app = FastAPI(title="gptlab", description=f"OpenAI-compatible API for the gptlab run {run.run_dir}")
    app.state.batcher = batcher
    app.add_exception_handler(RequestValidationError, _invalid_request)

    def job(prompt: str | list[int], config: GenerationConfig) -> _Job:
        """A prompt's generation (a text or token ids), not yet submitted. A prompt generation refuses (too
        long, say) raises GptlabError here, before any response has started: a streamed reply could no
        longer turn into a 400."""
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else _checked_ids(prompt, tokenizer.vocab_size)
        # The tokens the model reads: the context's worth of a longer prompt, end-of-text for an empty one.
        ids = prepare_prompt(ids, model.config.context_length, config, tokenizer.eot_id)
        return _Job(ids, config, _Outcome(len(ids)))

    def start(jobs: list[_Job]) -> list[_Job]:
        """Submit a request's jobs together, once they all passed their checks."""
        batcher.submit(jobs)
        return jobs

    def chat_prompt(messages: list[ChatMessage]) -> str:
        """The prompt of a conversation: in the run's template, or for a run without one its messages'
        texts, a line each (the model continues the last)."""
        # OpenAI's "developer" role is what its newer models call the system message.
        plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        if template is not None:
            prompt = format_messages(template, plain)
        else:
            for message in plain:
                if message["role"] not in ROLES:
                    raise GptlabError(f"unknown message role {message['role']!r}; use {', '.join(ROLES)}")
            prompt = "\n".join(m["content"] for m in plain)
        if not any(m["role"] == "user" for m in plain):  # checked after any bad role is named
            raise GptlabError("the messages hold no user message to reply to")
        return prompt

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "gptlab"}]}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        try:
            config = _generation_config(request, defaults, max_tokens_limit)
            prompts = _prompts(request.prompt)
            if not prompts:
                raise RequestError("the prompt list is empty; send at least one prompt", "prompt")
            if request.stream and len(prompts) != 1:
                raise RequestError("streaming takes one prompt per request", "prompt")
            generations = start([job(prompt, config) for prompt in prompts])
        except GptlabError as exc:
            return _refused(exc)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": name}
        echoed = [(prompt if isinstance(prompt, str) else tokenizer.decode(prompt)) if request.echo else ""
                  for prompt in prompts]  # fmt: skip
        if request.stream:
            (streamed,) = generations

            def chunks() -> Iterator[dict[str, Any]]:
                for piece in itertools.chain([echoed[0]] if echoed[0] else [], streamed.read()):
                    yield {**head, "choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                finish = streamed.outcome.finish_reason
                yield {**head, "choices": [{"index": 0, "text": "", "finish_reason": finish}]}

            return _streamed(chunks(), request, head, streamed)
        choices, total = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        try:
            texts = ["".join(generation.read()) for generation in generations]
        except Exception as exc:  # noqa: BLE001 - the decoding failed, not the request
            return JSONResponse(status_code=500, content=_server_error(exc))
        for index, generation in enumerate(generations):
            text, outcome = echoed[index] + texts[index], generation.outcome
            choices.append({"index": index, "text": text, "finish_reason": outcome.finish_reason})
            for key, value in outcome.usage().items():
                total[key] += value
        return {**head, "choices": choices, "usage": total}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        try:
            config = _generation_config(request, defaults, max_tokens_limit, template.stop if template else ())
            (generation,) = start([job(chat_prompt(request.messages), config)])
        except GptlabError as exc:
            return _refused(exc)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name}

            def chunks() -> Iterator[dict[str, Any]]:
                yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
                for piece in _without_leading_space(generation.read()):
                    yield {**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                finish = generation.outcome.finish_reason
                yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}

            return _streamed(chunks(), request, head, generation)
        try:
            text, outcome = "".join(generation.read()).strip(), generation.outcome
        except Exception as exc:  # noqa: BLE001 - the decoding failed, not the request
            return JSONResponse(status_code=500, content=_server_error(exc))
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": outcome.finish_reason}],
            "usage": outcome.usage(),
        }  # fmt: skip

    return app
