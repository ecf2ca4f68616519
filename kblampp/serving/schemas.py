"""Request bodies: pydantic models with strict types and unknown fields forbidden.

Limits that depend on server settings (question length, max_new_tokens cap, ...) are checked by
`check_*` helpers so the caps can change per server; facts are validated by `kblampp.schema.check_fact`
(the sanity checker's own checks), not by pydantic, so the API and the offline files agree exactly.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from kblampp.schema import Problem, check_fact, fact_key
from kblampp.serving.config import ServerSettings
from kblampp.question_time import TIME_KINDS
from kblampp.timewin import window_days


class ApiError(Exception):
    """An HTTP error with a JSON body `{"error": message, "problems": [...]}`."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.problems, self.headers = status, message, problems or [], headers

    def body(self) -> dict:
        return {"error": self.message, "problems": self.problems}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class QuestionTime(_Strict):
    """A typed time constraint (docs/DESIGN_QA.md); `kind` defaults to what the window implies."""

    start: str | None = None
    end: str | None = None
    kind: str | None = None
    anchor: str | None = None

    @model_validator(mode="after")
    def _valid_window(self) -> "QuestionTime":
        window_days(self.start, self.end)  # raises ValueError "start: ..." / "end: ..."
        if self.kind is not None and (self.kind == "none" or self.kind not in TIME_KINDS):
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(TIME_KINDS[1:])}")
        return self


class AnswerRequest(_Strict):
    question: str
    question_time: QuestionTime | None = None
    reference_date: str | None = None  # what "now" means for this question (default: the config's)

    @model_validator(mode="after")
    def _valid_reference_date(self) -> "AnswerRequest":
        if self.reference_date is not None:
            try:
                window_days(self.reference_date, self.reference_date)
            except ValueError as err:
                raise ValueError(f"reference_date: {str(err).partition(': ')[2]}") from None
        return self
    max_new_tokens: int | None = None
    top_k_evidence: int | None = None
    abstain: bool = True  # false: always answer (the model's abstention decision is not applied)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    name: str | None = None


class ChatRequest(BaseModel):
    """The OpenAI chat-completions fields a client may send; sampling knobs are accepted and ignored
    (decoding is greedy), anything else is an unknown field."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | int | None = None
    top_p: float | int | None = None
    n: int | None = None
    stream: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | int | None = None
    frequency_penalty: float | int | None = None
    abstain: bool = True  # KBLaM++ extension: false = always answer


def _positive_capped(value: int | None, default: int, cap: int, name: str) -> int:
    if value is None:
        return default
    if value < 1 or value > cap:
        raise ApiError(422, f"{name} must be between 1 and {cap}, got {value}", [f"body.{name}: out of range 1..{cap}"])
    return value


def check_question(question: str, settings: ServerSettings, field: str = "question") -> str:
    if not question.strip():
        raise ApiError(422, f"{field} is empty", [f"body.{field}: empty string"])
    if len(question) > settings.max_question_chars:
        raise ApiError(422, f"{field} is too long ({len(question)} > {settings.max_question_chars} characters)",
                       [f"body.{field}: longer than {settings.max_question_chars} characters"])
    return question


def check_answer_request(req: AnswerRequest, settings: ServerSettings) -> tuple[int, int]:
    """Check the settings-dependent limits; returns (max_new_tokens, top_k_evidence)."""
    check_question(req.question, settings)
    mnt = _positive_capped(req.max_new_tokens, settings.default_max_new_tokens, settings.max_new_tokens_cap,
                           "max_new_tokens")
    topk = _positive_capped(req.top_k_evidence, settings.default_top_k_evidence, settings.max_top_k_evidence,
                            "top_k_evidence")
    return mnt, topk


def chat_question(req: ChatRequest, settings: ServerSettings) -> tuple[str, int]:
    """The last user message's text and the new-token budget of a chat request."""
    if not req.messages:
        raise ApiError(422, "messages is empty", ["body.messages: at least one message is required"])
    if len(req.messages) > settings.max_messages:
        raise ApiError(422, f"too many messages ({len(req.messages)} > {settings.max_messages})",
                       [f"body.messages: more than {settings.max_messages} items"])
    if req.stream:
        raise ApiError(422, "stream=true is not supported", ["body.stream: only false is supported"])
    if req.n not in (None, 1):
        raise ApiError(422, "only n=1 is supported", ["body.n: only 1 is supported"])
    users = [i for i, m in enumerate(req.messages) if m.role == "user"]
    if not users:
        raise ApiError(422, "no user message", ["body.messages: needs a message with role 'user'"])
    where = users[-1]
    content = req.messages[where].content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        texts = []
        for j, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(422, "only text content parts are supported",
                               [f"body.messages.{where}.content.{j}: expected {{'type': 'text', 'text': str}}"])
            texts.append(part["text"])
        content = "\n".join(texts)
    if content is None:
        raise ApiError(422, "the last user message has no content", [f"body.messages.{where}.content: null"])
    check_question(content, settings, field=f"messages.{where}.content")
    budget = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    mnt = _positive_capped(budget, settings.default_max_new_tokens, settings.max_new_tokens_cap, "max_tokens")
    return content, mnt


def check_facts_body(body: Any, settings: ServerSettings) -> list[dict]:
    """A POST /v1/facts body (one fact object, a list of them, or {"facts": [...]}) -> fact dicts.

    Every problem of every item is reported as `body:ITEM: field: reason` (ITEM 0-based)."""
    if isinstance(body, dict) and set(body) == {"facts"}:
        body = body["facts"]
    items = body if isinstance(body, list) else [body]
    if not items:
        raise ApiError(422, "no facts given", ["body: empty list"])
    if len(items) > settings.max_facts_per_request:
        raise ApiError(422, f"too many facts in one request ({len(items)} > {settings.max_facts_per_request})",
                       [f"body: more than {settings.max_facts_per_request} items"])
    problems: list[Problem] = []
    first: dict[str, int] = {}
    for item, obj in enumerate(items):
        found = check_fact(obj, item)
        if not found:
            key = fact_key(obj)
            if key in first:
                found = [Problem(item, "<item>", f"duplicate of item {first[key]} in this request")]
            first.setdefault(key, item)
        problems.extend(found)
    if problems:
        raise ApiError(422, f"{len(problems)} problem(s) in the submitted fact(s)",
                       [p.format("body") for p in problems])
    return items


def check_one_fact(body: Any) -> dict:
    """A PUT /v1/facts/{index} body: exactly one fact object."""
    problems = check_fact(body, 0)
    if problems:
        raise ApiError(422, f"{len(problems)} problem(s) in the submitted fact",
                       [p.format("body") for p in problems])
    return body
