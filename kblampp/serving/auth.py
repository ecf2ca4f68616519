"""Bearer-token auth for KB mutations: token from an environment variable or a file."""
from __future__ import annotations

import hmac
import os
from pathlib import Path

from kblampp.serving.config import TOKEN_ENV


def load_token(token_file: str | None = None, env: str = TOKEN_ENV) -> str | None:
    """The token from `token_file` (first line, stripped) if given, else from `$env`; None if neither."""
    if token_file:
        path = Path(token_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"{path}: cannot read the token file ({err.strerror})") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise ValueError(f"{path}: the token file is empty")
        return token
    value = os.environ.get(env, "").strip()
    return value or None


def check_bearer(header: str | None, token: str | None) -> str | None:
    """None when `header` carries the right bearer token, else the reason it does not."""
    if token is None:
        return "fact mutations are disabled on this server (read-only)"
    if not header:
        return "missing Authorization header (expected 'Bearer <token>')"
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "malformed Authorization header (expected 'Bearer <token>')"
    if not hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8")):
        return "invalid token"
    return None
