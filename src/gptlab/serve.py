"""An OpenAI-compatible HTTP server for a run: `/v1/completions` and `/v1/chat/completions`, streaming
included, so any OpenAI client, judge script or chat front end can talk to a gptlab model.

Chat messages are laid out with the run's prompt template (its `template`), the way the model was
finetuned; a plain pretrained run continues the conversation's text freely.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from gptlab.config import GenerationConfig
from gptlab.errors import GptlabError


class _Sampling(BaseModel):
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
    n: int = 1


class CompletionRequest(_Sampling):
    prompt: str | list[str] = ""


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage]


def _generation_config(request: _Sampling, defaults: GenerationConfig, extra_stop: tuple[str, ...] = ()):
    """The server's defaults overridden by the request's sampling fields."""
    if request.n != 1:
        raise GptlabError("only n=1 is supported; send several requests for several completions")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    overrides: dict[str, Any] = {"stop": [*stop, *extra_stop]}
    names = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
             "min_p": "min_p", "repetition_penalty": "repetition_penalty", "seed": "seed"}  # fmt: skip
    for field, target in names.items():
        value = getattr(request, field)
        if value is not None:
            overrides[target] = value
    return dataclasses.replace(defaults, **overrides)


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error"}})


def _sse(payloads: Iterator[dict[str, Any]]) -> Iterator[str]:
    for payload in payloads:
        yield f"data: {json.dumps(payload)}\n\n"
    yield "data: [DONE]\n\n"


def create_app(run, name: str, defaults: GenerationConfig | None = None) -> FastAPI:
    """The FastAPI app serving `run` (a LoadedRun) under the model name `name`."""
    from gptlab.generate import stream_rows
    from gptlab.templates import format_messages, get_template

    defaults = defaults or GenerationConfig(max_new_tokens=128, temperature=0.7)
    template = get_template(run.config["template"]) if run.config.get("template") else None
    tokenizer, model = run.tokenizer, run.model
    # One generation at a time: the model's kernels already use every core (or the GPU).
    lock = threading.Lock()
    app = FastAPI(title="gptlab", description=f"OpenAI-compatible API for the gptlab run {run.run_dir}")

    def pieces(prompt: str, config: GenerationConfig) -> Iterator[str]:
        with lock:
            for _, piece in stream_rows(model, tokenizer, [tokenizer.encode(prompt)], config):
                yield piece

    def usage(prompt: str, text: str) -> dict[str, int]:
        prompt_tokens, completion_tokens = len(tokenizer.encode(prompt)), len(tokenizer.encode(text))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

    def finish_reason(text: str, config: GenerationConfig) -> str:
        return "length" if len(tokenizer.encode(text)) >= config.max_new_tokens else "stop"

    def chat_prompt(messages: list[ChatMessage]) -> str:
        plain = [m.model_dump() for m in messages]
        if template is not None:
            return format_messages(template, plain)
        return "".join(m["content"] for m in plain)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "gptlab"}]}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        try:
            config = _generation_config(request, defaults)
            prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
            if request.stream and len(prompts) != 1:
                raise GptlabError("streaming takes one prompt per request")
        except GptlabError as exc:
            return _error(str(exc))
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            chunks = (
                {"id": ident, "object": "text_completion", "created": created, "model": name,
                 "choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                for piece in pieces(prompts[0], config)
            )  # fmt: skip
            return StreamingResponse(_sse(chunks), media_type="text/event-stream")
        choices, total = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for index, prompt in enumerate(prompts):
            text = "".join(pieces(prompt, config))
            choices.append({"index": index, "text": text, "finish_reason": finish_reason(text, config)})
            for key, value in usage(prompt, text).items():
                total[key] += value
        return {"id": ident, "object": "text_completion", "created": created, "model": name,
                "choices": choices, "usage": total}  # fmt: skip

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        try:
            config = _generation_config(request, defaults, template.stop if template else ())
            prompt = chat_prompt(request.messages)
        except GptlabError as exc:
            return _error(str(exc))
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:

            def chunks() -> Iterator[dict[str, Any]]:
                head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name}
                yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
                for piece in pieces(prompt, config):
                    yield {**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

            return StreamingResponse(_sse(chunks()), media_type="text/event-stream")
        text = "".join(pieces(prompt, config)).strip()
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(text, config)}],
            "usage": usage(prompt, text),
        }  # fmt: skip

    return app
