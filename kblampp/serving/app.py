"""FastAPI app factory: routes, auth, body-size cap and uniform JSON errors over an `Engine`.

Every error body is `{"error": message, "problems": [...]}`: 400 malformed JSON, 401 auth, 404 unknown
fact, 413 body too large, 415 not JSON, 422 wrong types / unknown fields / limits / bad facts,
503 busy (lock wait over the request timeout). Handlers are plain `def`s, so FastAPI runs them in
its thread pool and the engine's lock does the serialising.
"""
from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kblampp.serving.auth import check_bearer
from kblampp.serving.config import ServerSettings
from kblampp.serving.engine import Engine
from kblampp.serving.schemas import (AnswerRequest, ApiError, ChatRequest, chat_question, check_answer_request,
                                     check_facts_body, check_one_fact)

MUTATING = {"POST /v1/facts", "PUT /v1/facts", "DELETE /v1/facts"}


class BodyLimit:
    """ASGI middleware: 413 as soon as a body exceeds `limit` bytes (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await _too_large(self.limit)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"request body too large (limit {limit} bytes)", "problems": []}, status_code=413)


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_problems(errors: list[dict], prefix: str = "") -> list[str]:
    """pydantic errors as `body.field.sub: message` (path parameters as `path.name: message`)."""
    out = []
    for e in errors:
        loc = ".".join(str(p) for p in (prefix, *e.get("loc", ())) if p != "")
        out.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return out


async def _json_body(request: Request) -> Any:
    """The parsed JSON body; 415 for another content type, 400 for malformed JSON."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"expected Content-Type application/json, got {ctype or 'none'!r}")
    raw = await request.body()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ApiError(400, f"body is not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None


def _parse(model: type, body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        problems = _validation_problems(err.errors(include_url=False), "body")
        raise ApiError(422, f"invalid request: {problems[0] if problems else 'bad body'}", problems) from None


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The HTTP API over `engine`; `settings` carries the token and every limit."""
    settings.validate()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.close)  # clean shutdown: fold the WAL into the store

    app = FastAPI(title="KBLaM++ server", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = _validation_problems(list(err.errors()))
        return _error(ApiError(422, f"invalid request: {problems[0] if problems else 'bad input'}", problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(ApiError(err.status_code, str(err.detail)))

    def require_token(request: Request) -> None:
        reason = check_bearer(request.headers.get("authorization"), None if settings.read_only else settings.token)
        if reason is not None:
            status = 403 if settings.read_only else 401
            raise ApiError(status, reason, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": engine.info.get("model"), "N": engine.kb.num_live()}

    @app.get("/v1/stats")
    def stats() -> dict:
        return engine.stats()

    @app.post("/v1/answer")
    async def answer(request: Request) -> dict:
        req = _parse(AnswerRequest, await _json_body(request))
        mnt, topk = check_answer_request(req, settings)
        qt = req.question_time.model_dump() if req.question_time is not None else None
        return await run_in_threadpool(engine.answer, req.question, qt, mnt, topk, "answer", req.reference_date)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        req = _parse(ChatRequest, await _json_body(request))
        question, mnt = chat_question(req, settings)
        out = await run_in_threadpool(engine.answer, question, None, mnt, settings.default_top_k_evidence, "chat")
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model or settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["answer"]},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                "kblampp": {"evidence": out["evidence"], "question_time": out["question_time"],
                            "timings": out["timings"]}}

    @app.post("/v1/facts")
    async def add_facts(request: Request) -> JSONResponse:
        require_token(request)
        facts = check_facts_body(await _json_body(request), settings)
        return JSONResponse(await run_in_threadpool(engine.add_facts, facts), status_code=201)

    @app.get("/v1/facts/{index}")
    def get_fact(index: int) -> dict:
        return engine.get_fact(index)

    @app.put("/v1/facts/{index}")
    async def replace_fact(index: int, request: Request) -> dict:
        require_token(request)
        fact = check_one_fact(await _json_body(request))
        return await run_in_threadpool(engine.replace_fact, index, fact)

    @app.delete("/v1/facts/{index}")
    def delete_fact(index: int, request: Request) -> dict:
        require_token(request)
        return engine.delete_fact(index)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.state.engine, app.state.settings = engine, settings
    return app
