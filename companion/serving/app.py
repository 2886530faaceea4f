"""The OpenAI-compatible HTTP API over an :class:`~companion.serving.engine.Engine` (FastAPI).

Endpoints as in the OpenAI API reference: ``POST /v1/completions``, ``POST /v1/chat/completions`` (with
``stream=true`` as server-sent events, ``data: {chunk}`` lines ending with ``data: [DONE]``), ``GET /v1/models``,
and ``GET /health`` (503 while the model loads, 200 when it is ready). Every error is the OpenAI error object
``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON, wrong types, out-of-range values and
prompts over the context (``context_length_exceeded``), 404 for an unknown model or path, 429 when the queue is
full, 503 while loading. A client that goes away cancels its request (the engine stops at the next token).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from companion.serving.engine import Engine, Job
from companion.serving.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_max_tokens,
    error_body,
)


def _validation_error(exc: RequestValidationError) -> dict[str, Any]:
    """The error object of the first validation error; malformed JSON gets its own (code null, as OpenAI's)."""
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return error_body(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None  # the request field; the message has the full path (union branch included)
    where = ".".join(loc)
    return error_body(f"{where}: {first['msg']}" if where else first["msg"], param=param, code="invalid_value")


def create_app(engine: Engine) -> FastAPI:
    """A FastAPI app serving ``engine``; its lifespan starts the engine (loading in the background) and stops it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="companion OpenAI-compatible server", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.ready:
            return JSONResponse({"status": "ok", "model": engine.model_id})
        status = "error" if engine.load_error else "loading"
        return JSONResponse({"status": status, "error": engine.load_error}, status_code=503)

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "companion"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(model_id)
        return model_card()

    def _check_model(model_id: str) -> None:
        if model_id != engine.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {engine.model_id!r}",
                           param="model", code="model_not_found")

    def _job(req: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], max_tokens: int | None,
             param: str) -> tuple[Job, asyncio.Queue]:
        check_max_tokens(max_tokens, engine.config.max_tokens)
        budget = engine.budget(prompt_ids, max_tokens, param)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(*event: Any) -> None:  # called from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (server stopping): nobody is listening
                pass

        job = Job(prompt_ids, budget, emit, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                  stop=req.stop_strings)
        engine.submit(job)
        return job, events

    def _prepare(req: CompletionRequest | ChatCompletionRequest) -> None:
        if not engine.ready:
            raise APIError(503, "the model is not ready: " + (engine.load_error or "still loading"),
                           type="server_error", code="model_not_ready")
        _check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options",
                           code="invalid_value")

    async def _collect(job: Job, events: asyncio.Queue) -> tuple[str, str, dict[str, int]]:
        parts: list[str] = []
        try:
            while True:
                kind, *rest = await events.get()
                if kind == "text":
                    parts.append(rest[0])
                elif kind == "done":
                    return "".join(parts), rest[0], rest[1]
                else:
                    raise APIError(500, f"generation failed: {rest[0]}", type="server_error")
        finally:
            job.cancelled.set()  # no-op when done; frees the worker when the client went away

    async def _sse(job: Job, events: asyncio.Queue, chunk: Any, include_usage: bool) -> AsyncIterator[str]:
        """``chunk(text | None, finish_reason | None) -> dict`` builds one chunk; ``None`` text: the opening one."""
        try:
            yield f"data: {json.dumps(chunk(None, None), ensure_ascii=False)}\n\n"
            while True:
                kind, *rest = await events.get()
                if kind == "text":
                    yield f"data: {json.dumps(chunk(rest[0], None), ensure_ascii=False)}\n\n"
                elif kind == "done":
                    yield f"data: {json.dumps(chunk('', rest[0]), ensure_ascii=False)}\n\n"
                    if include_usage:
                        last = {**chunk('', None), "choices": [], "usage": rest[1]}
                        yield f"data: {json.dumps(last, ensure_ascii=False)}\n\n"
                    break
                else:
                    body = error_body(f"generation failed: {rest[0]}", type="server_error")
                    yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client disconnected (generator closed) or the stream ended

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        _prepare(req)
        assert engine.codec is not None
        job, events = _job(req, engine.codec.encode(req.prompt_text), req.max_tokens, "prompt")
        base = {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": engine.model_id}
        if req.stream:
            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                             "finish_reason": finish}]}
            return StreamingResponse(_sse(job, events, chunk, req.include_usage), media_type="text/event-stream")
        text, finish, usage = await _collect(job, events)
        return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        _prepare(req)
        assert engine.codec is not None
        prompt_ids = engine.codec.chat([m.model_dump() for m in req.messages])
        job, events = _job(req, prompt_ids, req.token_limit, "messages")
        base = {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk", "created": job.created,
                "model": engine.model_id}
        if req.stream:
            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return StreamingResponse(_sse(job, events, chunk, req.include_usage), media_type="text/event-stream")
        text, finish, usage = await _collect(job, events)
        message = {"role": "assistant", "content": text}
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage}

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error"),
                            status_code=500)

    app.state.engine = engine
    app.state.started = time.time()
    return app
