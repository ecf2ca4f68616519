"""Per-request state for the injected layers, and the evidence records they write.

Hugging Face forward signatures stay untouched: all wrappers share one `ContextHolder`, and
`KBLaMPP.kb_request(ctx)` puts a `KBContext` in it for the duration of a forward or `generate()`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from kblampp.config import check_retrieval_positions
from kblampp.retrieval import KBSource


@dataclass
class LayerRecord:
    """One forward call at one inject layer (during generate: prefill first, then T=1 steps).

    Positions that did not retrieve (retrieval_positions "last_prompt": all but the last prompt token,
    and every decode step) hold no candidates: cand_ids -1, alpha, beta and parts 0, windows NaN;
    `hidden` is recorded at every position (the copy gate reads it at each answer step)."""

    alpha: torch.Tensor  # (B, T, K) selector weights
    cand_ids: torch.Tensor  # (B, T, K) fact indices (-1 = no candidate)
    beta: torch.Tensor  # (B, T) fusion gate
    hidden: torch.Tensor  # (B, T, d_model) normalised state the branch read
    parts: torch.Tensor | None = None  # (B, T, K, 3) sem, phi, g_time of each candidate
    windows: torch.Tensor | None = None  # (B, T, K, 2) candidate windows (tau_min, tau_max) in days

    @classmethod
    def without_candidates(cls, hidden: torch.Tensor, k: int, dtype: torch.dtype) -> "LayerRecord":
        """A record of hidden (B, T, d_model) where no position retrieved (K = k empty slots)."""
        B, T = hidden.shape[:2]
        zeros = hidden.new_zeros((B, T, k), dtype=dtype)
        return cls(alpha=zeros, cand_ids=torch.full((B, T, k), -1, dtype=torch.long, device=hidden.device),
                   beta=hidden.new_zeros((B, T), dtype=dtype), hidden=hidden.detach(),
                   parts=hidden.new_zeros((B, T, k, 3), dtype=dtype),
                   windows=torch.full((B, T, k, 2), float("nan"), device=hidden.device))


@dataclass
class KBContext:
    """What one request tells the injected layers.

    e_q: (B, d_ctx) question sentence embeddings; tau: (B, 2) question windows in days, NaN rows (or
    None) = no time; time_kind: (B,) long index into `kblampp.question_time.TIME_KINDS` (None = read
    from the window: open start "before", open end "after", else "at"); forced_ids: (B, F) facts that
    must be among the candidates (-1 = padding), or with `forced_only` be the only ones; excluded_ids:
    (B, E) facts that must not be candidates (a relative question's anchor group); linked_ids: (B, L)
    the facts whose head the question names (`kblampp.name_link`), kept ahead of the searched ones at
    the first inject layer (config `name_link`). `off_layers` /
    `zero_beta_layers` are the multi-hop ablations (docs/DESIGN_QA.md, hops).
    Rows may be repeated by generate() (beams, num_return_sequences): B_hidden = r * B is accepted.

    `retrieval_positions` (config key of the same name): "all" retrieves and fuses at every position of
    every forward call; "last_prompt" only at the last position of the request's first forward call
    (generate()'s prefill, whose left-padded rows all end with their last prompt token), found again
    by its index in the sequence when a later call recomputes it (no KV cache). Elsewhere the layer
    is the base attention, bit for bit. One request = one generate() (or one forward).
    """

    source: KBSource | None = None
    e_q: torch.Tensor | None = None
    tau: torch.Tensor | None = None
    time_kind: torch.Tensor | None = None
    forced_ids: torch.Tensor | None = None
    forced_only: bool = False  # rows with forced ids get exactly those as candidates (a succession hop)
    excluded_ids: torch.Tensor | None = None  # (B, E) facts never returned as candidates, -1 = padding
    linked_ids: torch.Tensor | None = None  # (B, L) facts whose head the question names, -1 = padding
    gate_closed: bool = False
    off_layers: frozenset[int] = frozenset()  # inject layers skipped entirely (the one-layer ablation)
    zero_beta_layers: frozenset[int] = frozenset()  # layers that retrieve and record but add nothing (beta = 0)
    record: bool = False
    capture_query: bool = False
    retrieval_positions: str = "all"
    records: dict[int, list[LayerRecord]] = field(default_factory=dict)
    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    prompt_end: int | None = None  # "last_prompt": sequence index of the last prompt token (first call)

    def __post_init__(self) -> None:
        check_retrieval_positions(self.retrieval_positions, "KBContext.retrieval_positions")

    def retrieval_span(self, cached: int, length: int) -> slice:
        """The positions of a forward call that retrieve, as a slice of its `length` positions; `cached`
        = positions already in the KV cache before it. "all": every one; "last_prompt": the last prompt
        token where this call holds it, else none (an empty slice)."""
        if self.retrieval_positions == "all":
            return slice(0, length)
        if self.prompt_end is None:  # the first call is the prompt (or its last token, after a cut cache)
            self.prompt_end = cached + length - 1
        at = self.prompt_end - cached
        return slice(at, at + 1) if 0 <= at < length else slice(0, 0)

    def rows(self, value: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Per-row tensor matched to the hidden batch size (repeat_interleave for expanded batches)."""
        if value is None or value.shape[0] == batch:
            return value
        if batch % value.shape[0]:
            raise ValueError(f"KBContext has {value.shape[0]} rows but the model batch has {batch}")
        return value.repeat_interleave(batch // value.shape[0], dim=0)

    def clear_records(self) -> None:
        self.records.clear()
        self.queries.clear()


def prefix_shareable(retrieval_positions: str) -> bool:
    """Whether a request's states at every prompt position but the last are the plain model's, so a
    batch may start from the prompts' common prefix computed once without a request."""
    return retrieval_positions == "last_prompt"


class ContextHolder:
    """Shared mutable slot referenced by every wrapper of one model."""

    def __init__(self) -> None:
        self.ctx: KBContext | None = None

    @contextlib.contextmanager
    def activate(self, ctx: KBContext) -> Iterator[KBContext]:
        """Set `ctx` for the block; restore the previous one on exit, even on error."""
        if not isinstance(ctx, KBContext):
            raise TypeError(f"expected a KBContext, got {type(ctx).__name__}")
        previous, self.ctx = self.ctx, ctx
        try:
            yield ctx
        finally:
            self.ctx = previous
