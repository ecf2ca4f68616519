"""Server settings (limits, auth, durability): separate from `KBConfig`, which describes the model."""
from __future__ import annotations

from dataclasses import dataclass

TOKEN_ENV = "KBLAMPP_SERVER_TOKEN"


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
    request_timeout_s: float = 60.0  # waiting for the engine lock plus generation time
    read_only: bool = False  # True: fact mutations are disabled (no token needed)
    token: str | None = None  # bearer token for fact mutations
    compact_every: int = 1000  # compact the WAL into the store after this many changes (0 = only at start)
    model_name: str = "kblampp"

    def validate(self) -> None:
        """Refuse settings that would make an unsafe or useless server."""
        if not self.read_only and not self.token:
            raise ValueError(f"fact mutations are enabled but no token is set: export {TOKEN_ENV}=..., pass "
                             "--token_file FILE, or start with --read_only")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("the server token must be at least 8 characters long")
        for name in ("max_question_chars", "max_new_tokens_cap", "max_top_k_evidence", "max_body_bytes",
                     "max_facts_per_request", "max_messages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_cap:
            raise ValueError(f"default_max_new_tokens must be in 1..{self.max_new_tokens_cap}")
        if not 1 <= self.default_top_k_evidence <= self.max_top_k_evidence:
            raise ValueError(f"default_top_k_evidence must be in 1..{self.max_top_k_evidence}")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
