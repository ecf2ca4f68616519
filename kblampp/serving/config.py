"""Server settings (limits, auth, durability): separate from `KBConfig`, which describes the model."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

TOKEN_ENV = "KBLAMPP_SERVER_TOKEN"
MIN_TOKEN_CHARS = 16
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# words that make a token guessable however long it is (checked case-insensitively, digits stripped)
COMMON_WORDS = ("password", "passwd", "secret", "token", "admin", "changeme", "letmein", "qwerty", "welcome",
                "default", "kblampp", "server", "test", "example", "abc", "xyz")


def _drop_runs(text: str, shortest: int = 3) -> str:
    """`text` without runs like 'aaa', '123', 'cba' (each step -1, 0 or +1) of `shortest`+ characters."""
    out, start = [], 0
    while start < len(text):
        end = start + 1
        if end < len(text) and abs(step := ord(text[end]) - ord(text[start])) <= 1:
            while end + 1 < len(text) and ord(text[end + 1]) - ord(text[end]) == step:
                end += 1
            end += 1
        if end - start < shortest:
            end = start + 1
            out.append(text[start])
        start = end
    return "".join(out)


def token_problem(token: str) -> str | None:
    """Why `token` is too weak for guarding KB changes, or None.

    Rules: at least 16 characters, at least 8 distinct ones, and at least 10 characters left once
    common words ('password', 'secret', 'token', ...) and runs ('1234', 'aaaa', 'cba') are removed."""
    if len(token) < MIN_TOKEN_CHARS:
        return (f"the server token is too short ({len(token)} characters, need at least {MIN_TOKEN_CHARS}); "
                "generate one with: python -c \"import secrets; print(secrets.token_hex(16))\"")
    if len(set(token)) < 8:
        return f"the server token uses only {len(set(token))} distinct characters (need at least 8)"
    rest = _drop_runs(re.sub("|".join(COMMON_WORDS), "", token.lower()))
    if len(re.sub(r"[\W_]", "", rest)) < 10:
        return ("the server token is made of common words, repeats or runs (like 'password1234'); generate a "
                "random one: python -c \"import secrets; print(secrets.token_hex(16))\"")
    return None


def host_allowed(header: str | None, allowed: tuple[str, ...]) -> bool:
    """Is the Host header (name[:port], [v6]:port) one of `allowed` ('*' allows any)?"""
    if "*" in allowed:
        return True
    if not header:
        return False
    name = header.strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    return name.rstrip(".") in allowed


@dataclass
class ServerSettings:
    """Limits every request is checked against; defaults suit the embedded model on a CPU."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_question_chars: int = 2000
    max_new_tokens_cap: int = 64
    default_max_new_tokens: int = 16
    max_top_k_evidence: int = 32
    default_top_k_evidence: int = 5
    max_body_bytes: int = 1_000_000
    max_facts_per_request: int = 256
    max_messages: int = 64
    request_timeout_s: float = 60.0  # waiting for the engine lock (or for a batch to take a question)
    # concurrent questions run as one batched generate(): at most this many per batch, and the oldest
    # question waits at most this long for others to join (a lone request's extra delay)
    batch_max_size: int = 16
    batch_max_wait_ms: float = 10.0
    read_only: bool = False  # True: fact mutations are disabled (no token needed)
    token: str | None = None  # bearer token for fact mutations
    compact_every: int = 1000  # compact the WAL into the store after this many changes (0 = only at start)
    model_name: str = "kblampp"
    # compaction rebuilds the ANN index when edits searched exactly + dead entries pass this share of N
    rebuild_fraction: float = 0.1
    # Host header allow-list (DNS rebinding): loopback names by default, plus the bind address
    allowed_hosts: tuple[str, ...] = field(default_factory=lambda: LOCAL_HOSTS)
    max_json_depth: int = 32
    max_int_digits: int = 18

    def hosts(self) -> tuple[str, ...]:
        """The Host names accepted: the allow-list, plus the bind address unless it is a wildcard."""
        extra = () if self.host in ("0.0.0.0", "::", "") else (self.host.lower(),)
        return tuple(h.lower() for h in self.allowed_hosts) + extra

    def validate(self) -> None:
        """Refuse settings that would make an unsafe or useless server."""
        if not self.read_only and not self.token:
            raise ValueError(f"fact mutations are enabled but no token is set: export {TOKEN_ENV}=..., pass "
                             "--token_file FILE, or start with --read_only")
        if self.token is not None and (reason := token_problem(self.token)):
            raise ValueError(reason)
        for name in ("max_question_chars", "max_new_tokens_cap", "max_top_k_evidence", "max_body_bytes",
                     "max_facts_per_request", "max_messages", "max_json_depth", "max_int_digits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_cap:
            raise ValueError(f"default_max_new_tokens must be in 1..{self.max_new_tokens_cap}")
        if not 1 <= self.default_top_k_evidence <= self.max_top_k_evidence:
            raise ValueError(f"default_top_k_evidence must be in 1..{self.max_top_k_evidence}")
        if self.batch_max_size < 1:
            raise ValueError(f"batch_max_size must be >= 1, got {self.batch_max_size}")
        if not 0 <= self.batch_max_wait_ms <= 10_000:
            raise ValueError(f"batch_max_wait_ms must be in 0..10000, got {self.batch_max_wait_ms}")
        if self.rebuild_fraction <= 0:
            raise ValueError(f"rebuild_fraction must be > 0, got {self.rebuild_fraction}")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty: no request could reach the server (use '*' to allow any)")
