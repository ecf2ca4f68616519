"""FastAPI app factory: routes, auth, body-size cap and uniform JSON errors over an `Engine`.

Every error body is `{"error": message, "problems": [...]}`: 400 malformed JSON (including nesting
deeper than `max_json_depth`, integers longer than `max_int_digits`, NaN/Infinity, unpaired
surrogates in any string) or a Host header not on the allow-list, 401 auth, 403 read-only, 404
unknown fact, 409 duplicate fact, 413 body too large, 415 not JSON, 422 wrong types / unknown
fields / limits / bad facts, 503 busy (lock wait over the request timeout), and 500 (one log line,
no traceback) for anything unforeseen. Handlers are plain `def`s or hand work to the thread pool:
the engine gathers concurrent questions (`/v1/answer` and `/v1/chat/completions` alike) into batches
and its lock orders batches and KB edits.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
import uuid
from typing import Any, AsyncIterator

import numpy as np

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kblampp.serving.auth import check_bearer
from kblampp.serving.config import ServerSettings, host_allowed
from kblampp.serving.engine import Engine
from kblampp.serving.schemas import (AnswerRequest, ApiError, ChatRequest, chat_question, check_answer_request,
                                     check_facts_body, check_one_fact)

MUTATING = {"POST /v1/facts", "PUT /v1/facts", "DELETE /v1/facts"}
log = logging.getLogger("kblampp.serving")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


class ErrorGuard:
    """Outermost ASGI middleware: an unforeseen exception becomes a 500 JSON body and ONE log line
    (no traceback spam from request bodies anyone can send)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:  # noqa: BLE001 - the last line of defence, logged below
            log.error("internal error on %s %s: %s: %s", scope.get("method"), scope.get("path"),
                      type(err).__name__, str(err)[:200])
            if not started:
                await JSONResponse({"error": "internal server error", "problems": []}, status_code=500)(
                    scope, receive, send)


class HostCheck:
    """ASGI middleware: 400 unless the Host header is on the allow-list (DNS-rebinding defence)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.allowed):
                body = {"error": f"Host header {host[:100]!r} is not allowed (allowed: {', '.join(self.allowed)}; "
                                 "start the server with --allowed_hosts to add names)", "problems": []}
                await JSONResponse(body, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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


def json_depth(text: str) -> int:
    """Deepest nesting of [ and { outside string literals (a scan, no recursion)."""
    codes = np.frombuffer(_JSON_STRING.sub('""', text).encode("utf-8"), np.uint8)
    step = np.isin(codes, (91, 123)).astype(np.int64) - np.isin(codes, (93, 125))
    return int(np.cumsum(step).max(initial=0))


def _bad_strings(obj: Any, where: str) -> str | None:
    """Where the first string (value or key) holding an unpaired surrogate is, or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"{where}: unpaired surrogate U+{ord(obj[err.start]):04X} at position {err.start}"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        found = _bad_strings(key, where) or _bad_strings(value, f"{where}.{key}")
        if found:
            return found
    return None


def parse_json(raw: bytes, max_depth: int = 32, max_int_digits: int = 18) -> Any:
    """Decode a request body, or raise ApiError(400) saying exactly what is malformed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"body is not valid UTF-8 (byte {err.start})") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise ApiError(400, f"malformed JSON: nested {depth} deep (limit {max_depth})")

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > max_int_digits:
            raise ApiError(400, f"malformed JSON: integer with {len(digits.lstrip('-'))} digits "
                                f"(limit {max_int_digits})")
        return int(digits)

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ApiError(400, f"malformed JSON: number {text[:40]} is out of range")
        return value

    def constant(name: str) -> None:
        raise ApiError(400, f"malformed JSON: {name} is not a JSON number")

    try:
        obj = json.loads(text, parse_int=integer, parse_float=number, parse_constant=constant)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:  # belt and braces: the depth scan should have caught it
        raise ApiError(400, f"malformed JSON: nested too deep (limit {max_depth})") from None
    where = _bad_strings(obj, "body")
    if where:
        raise ApiError(400, f"invalid Unicode in {where} (not valid UTF-16 text)", [where])
    return obj


def _client(request: Request) -> str | None:
    return f"{request.client.host}:{request.client.port}" if request.client else None


def _parse(model: type, body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        problems = _validation_problems(err.errors(include_url=False), "body")
        raise ApiError(422, f"invalid request: {problems[0] if problems else 'bad body'}", problems) from None


def chat_text(out: dict) -> str:
    """The chat reply: the answer, or in words that the knowledge base has none (and the nearest fact)."""
    if not out.get("abstained"):
        return out["answer"]
    from kblampp.abstention import REASONS

    text = f"The knowledge base has no answer to this question ({REASONS[out['abstain_reason']]})."
    misses = out.get("near_misses") or []
    if misses:
        m = misses[0]
        text += f" Nearest fact: {m['head']} - {m['relation']} - {m['tail']} ({m['why']})."
    return text


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The HTTP API over `engine`; `settings` carries the token and every limit."""
    settings.validate()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.close)  # clean shutdown: fold the WAL into the store

    app = FastAPI(title="KBLaM++ server", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)

    async def _json_body(request: Request) -> Any:
        """The parsed JSON body; 415 for another content type, 400 for malformed JSON."""
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, f"expected Content-Type application/json, got {ctype or 'none'!r}")
        return parse_json(await request.body(), settings.max_json_depth, settings.max_int_digits)

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
        return await run_in_threadpool(engine.answer, req.question, qt, mnt, topk, "answer", req.abstain,
                                       req.reference_date)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        req = _parse(ChatRequest, await _json_body(request))
        question, mnt = chat_question(req, settings)
        out = await run_in_threadpool(engine.answer, question, None, mnt, settings.default_top_k_evidence, "chat",
                                      req.abstain)
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model or settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": chat_text(out)},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                "kblampp": {"evidence": out["evidence"], "question_time": out["question_time"],
                            "timings": out["timings"], "abstained": out["abstained"],
                            "near_misses": out.get("near_misses", [])}}

    @app.post("/v1/facts")
    async def add_facts(request: Request) -> JSONResponse:
        require_token(request)
        facts = check_facts_body(await _json_body(request), settings)
        return JSONResponse(await run_in_threadpool(engine.add_facts, facts, _client(request)), status_code=201)

    @app.get("/v1/facts/{index}")
    def get_fact(index: int) -> dict:
        return engine.get_fact(index)

    @app.put("/v1/facts/{index}")
    async def replace_fact(index: int, request: Request) -> dict:
        require_token(request)
        fact = check_one_fact(await _json_body(request))
        return await run_in_threadpool(engine.replace_fact, index, fact, _client(request))

    @app.delete("/v1/facts/{index}")
    def delete_fact(index: int, request: Request) -> dict:
        require_token(request)
        return engine.delete_fact(index, _client(request))

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(HostCheck, allowed=settings.hosts())
    app.add_middleware(ErrorGuard)  # added last = outermost
    app.state.engine, app.state.settings = engine, settings
    return app
