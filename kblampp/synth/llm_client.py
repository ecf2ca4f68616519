"""A small client for any OpenAI-compatible chat API, with bounded retries and JSON-array replies.

The API key comes from an environment variable (never from a file or the command line). Transport
errors, unparsable replies and replies with no valid item are retried up to `max_retries` times;
items that fail validation are reported and dropped, never repaired into something silently wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

Validator = Callable[[list[Any]], tuple[list[dict], list[str]]]


class LLMError(RuntimeError):
    """The API could not give a usable reply within the retry budget (or is misconfigured)."""


def extract_json_array(text: str) -> list[Any]:
    """The JSON array in a reply, tolerating ```json fences and chatter around it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty reply")
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    body = fenced.group(1) if fenced else text
    start, end = body.find("["), body.rfind("]")
    if start < 0 or end < start:
        raise ValueError("no JSON array in the reply")
    try:
        value = json.loads(body[start:end + 1])
    except json.JSONDecodeError as err:
        raise ValueError(f"reply is not valid JSON ({err.msg} at char {err.pos})") from None
    if not isinstance(value, list):
        raise ValueError("reply is not a JSON array")
    return value


@dataclass
class LLMClient:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.7
    timeout: float = 120.0
    max_retries: int = 3
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))

    def __post_init__(self) -> None:
        import openai

        key = os.environ.get(self.api_key_env)
        if not key:
            raise LLMError(f"environment variable {self.api_key_env} is not set (it holds the API key)")
        if self.max_retries < 0:
            raise LLMError(f"max_retries must be >= 0, got {self.max_retries}")
        self._openai = openai
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=self.timeout)

    def complete(self, prompt: str) -> str:
        """One chat completion with the prompt as the user message; returns the reply text."""
        reply = self._client.chat.completions.create(
            model=self.model, temperature=self.temperature, messages=[{"role": "user", "content": prompt}])
        if not reply.choices or not reply.choices[0].message.content:
            raise ValueError("reply has no message content")
        return reply.choices[0].message.content

    def generate(self, prompt: str, validate: Validator, label: str) -> tuple[list[dict], list[str]]:
        """Valid items of the first usable reply and the rejection messages of its invalid items.

        A reply is usable when it parses as a JSON array with at least one valid item."""
        rejected: list[str] = []
        for attempt in range(1, self.max_retries + 2):
            try:
                items = extract_json_array(self.complete(prompt))
            except (ValueError, self._openai.OpenAIError) as err:
                self.log(f"{label}: attempt {attempt}: unusable reply: {err}")
                continue
            valid, rejected = validate(items)
            for msg in rejected:
                self.log(f"{label}: rejected {msg}")
            if valid:
                return valid, rejected
            self.log(f"{label}: attempt {attempt}: no valid item in {len(items)}")
        raise LLMError(f"{label}: no usable reply after {self.max_retries + 1} attempts")


def add_llm_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LLM generator (--generator llm)")
    g.add_argument("--base_url", default=None, help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--model", default=None, help="model name the API serves")
    g.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--max_retries", type=int, default=3, help="retries per request (bounded)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")


def client_from_args(args: argparse.Namespace) -> LLMClient:
    if not args.base_url or not args.model:
        raise SystemExit("--generator llm needs --base_url and --model")
    return LLMClient(args.base_url, args.model, args.api_key_env, args.temperature, args.timeout, args.max_retries)
