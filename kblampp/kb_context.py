"""Per-request state for the injected layers, and the evidence records they write.

Hugging Face forward signatures stay untouched: all wrappers share one `ContextHolder`, and
`KBLaMPP.kb_request(ctx)` puts a `KBContext` in it for the duration of a forward or `generate()`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from kblampp.retrieval import KBSource


@dataclass
class LayerRecord:
    """One forward call at one inject layer (during generate: prefill first, then T=1 steps)."""

    alpha: torch.Tensor  # (B, T, K) selector weights
    cand_ids: torch.Tensor  # (B, T, K) fact indices (-1 = no candidate)
    beta: torch.Tensor  # (B, T) fusion gate
    hidden: torch.Tensor  # (B, T, d_model) normalised state the branch read
    parts: torch.Tensor | None = None  # (B, T, K, 3) sem, phi, g_time of each candidate
    windows: torch.Tensor | None = None  # (B, T, K, 2) candidate windows (tau_min, tau_max) in days


@dataclass
class KBContext:
    """What one request tells the injected layers.

    e_q: (B, d_ctx) question sentence embeddings; tau: (B, 2) question windows in days, NaN rows (or
    None) = no time; time_kind: (B,) long index into `kblampp.question_time.TIME_KINDS` (None = read
    from the window: open start "before", open end "after", else "at"); forced_ids: (B, F) facts that
    must be among the candidates (-1 = padding), or with `forced_only` be the only ones; excluded_ids:
    (B, E) facts that must not be candidates (a relative question's anchor group). `off_layers` / `zero_beta_layers` are the multi-hop
    ablations (docs/DESIGN_QA.md, hops).
    Rows may be repeated by generate() (beams, num_return_sequences): B_hidden = r * B is accepted.
    """

    source: KBSource | None = None
    e_q: torch.Tensor | None = None
    tau: torch.Tensor | None = None
    time_kind: torch.Tensor | None = None
    forced_ids: torch.Tensor | None = None
    forced_only: bool = False  # rows with forced ids get exactly those as candidates (a succession hop)
    excluded_ids: torch.Tensor | None = None  # (B, E) facts never returned as candidates, -1 = padding
    gate_closed: bool = False
    off_layers: frozenset[int] = frozenset()  # inject layers skipped entirely (the one-layer ablation)
    zero_beta_layers: frozenset[int] = frozenset()  # layers that retrieve and record but add nothing (beta = 0)
    record: bool = False
    capture_query: bool = False
    records: dict[int, list[LayerRecord]] = field(default_factory=dict)
    queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)

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
