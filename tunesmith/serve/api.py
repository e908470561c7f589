"""OpenAI-compatible HTTP API over an `Engine`: `/v1/chat/completions` (streamed as server-sent events or
not), `/v1/models`, `/health`.

Errors look like OpenAI's: `{"error": {"message", "type", "param", "code"}}` with 400 for a malformed request
(FastAPI's 422 is replaced), 401 for a missing or wrong bearer key, 404 / 405 for unknown routes.
A streamed request whose client disconnects is cancelled (its row leaves the batch at the next token); a
non-streamed one is cancelled when the server notices the disconnect (checked every 0.25 s).

    app = create_app(Engine.load("builtin:smollm2-135m-instruct"), model_name="smollm2", api_key="sk-local")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import TunesmithError
from tunesmith.infer.engine import Engine
from tunesmith.infer.sampling import SamplingConfig

DEFAULT_MAX_TOKENS = 512


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are accepted and ignored
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, logprobs=false, ...) are ignored
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)

    @field_validator("n")
    @classmethod
    def _only_one(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app. `api_key`: when set, every /v1 route needs `Authorization: Bearer <api_key>`."""
    app = FastAPI(title="tunesmith", description=f"OpenAI-compatible API serving {model_name}", version="1")
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = _param_of(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                            status_code=exc.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
                message = ("You didn't provide an API key: send it as 'Authorization: Bearer <key>'" if not header
                           else "Incorrect API key provided")
                return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        s = engine.stats
        return {"status": "ok", "model": model_name, "requests": s.requests, "batches": s.batches,
                "largest_batch": s.largest_batch}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "tunesmith"}]}

    @app.get("/v1/models/{model_id}")
    async def model_info(model_id: str) -> dict:
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist (this server serves '{model_name}')",
                           param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tunesmith"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"The model '{body.model}' does not exist (this server serves '{model_name}')",
                           param="model", code="model_not_found")
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt_ids = engine.prompt_ids(messages)
            engine.check_fits(prompt_ids)
        except (ValueError, TunesmithError) as exc:
            raise APIError(400, str(exc), param="messages") from None
        sampling = SamplingConfig(
            max_new_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=0,
            top_p=1.0 if body.top_p is None else body.top_p,
            repetition_penalty=1.0,
            seed=body.seed,
        )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        cid = f"chatcmpl-{secrets.token_hex(12)}"
        now = int(time.time())
        name = body.model or model_name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(engine, prompt_ids, sampling, stop, cid, now, name, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        cancel = threading.Event()
        events = engine.astream(prompt_ids, sampling, stop=stop, cancel=cancel)
        task = asyncio.ensure_future(_collect(events))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    cancel.set()
                    task.cancel()
                    return JSONResponse(error_body("client disconnected", code="cancelled"), status_code=499)
        finally:
            if not task.done():
                cancel.set()
        try:
            result = task.result()
        except Exception as exc:  # noqa: BLE001 - whatever broke, the client gets a 500 in the API's shape
            raise APIError(500, f"generation failed: {exc}", type="server_error") from None
        return {
            "id": cid, "object": "chat.completion", "created": now, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": _finish(result.finish_reason)}],
            "usage": _usage(result),
        }

    return app


async def _collect(events):
    result = None
    async for kind, value in events:
        if kind == "done":
            result = value
    return result


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.new_tokens,
            "total_tokens": result.prompt_tokens + result.new_tokens}


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None) -> str:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(engine: Engine, prompt_ids, sampling, stop, cid, created, model, include_usage):
    """Server-sent events; starlette cancels this generator when the client goes away, which cancels the row."""
    cancel = threading.Event()
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, None)
        result = None
        async for kind, value in engine.astream(prompt_ids, sampling, stop=stop, cancel=cancel):
            if kind == "text":
                yield _chunk(cid, created, model, {"content": value}, None)
            else:
                result = value
        yield _chunk(cid, created, model, {}, _finish(result.finish_reason))
        if include_usage:
            usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": _usage(result)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as exc:  # noqa: BLE001 - the stream has started: report the failure in-band, as OpenAI does
        yield f"data: {json.dumps(error_body(f'generation failed: {exc}', 'server_error'))}\n\n"
    finally:
        cancel.set()


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
