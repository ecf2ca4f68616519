"""A question's typed time constraint as the model reads it: `tau` (lo, hi) days and a `time_kind` id.

One place for training, evaluation and the server: parse the text (`kblampp.question_time`), resolve
anchored constraints through a first retrieval, and turn the result into KBContext tensors.

Succession and relative questions need two facts: "who succeeded X as CEO of Y" is a `right_after`
constraint whose date is the end of X's tenure, which only the KB knows. They are answered in two
retrievals: (1) the first inject layer's own query (Q = kb_query_ctx(e) + kb_linear_q(0), e the
embedding of the question for succession, of the anchor clause for relative questions) searches 16
candidates, and the one whose evidence sentence best matches the anchor clause is the anchor fact
(`first_hop`, `hop_texts`); (2) its window becomes the constraint's dates and the question is
answered as a dated one (for succession the anchor's siblings that the first hop found are forced
into the second retrieval's candidates: the answer is one of them):
  just_before (predecessor): (None, anchor start - 1 day)  -> the latest sibling started by then
  right_after (successor):   (anchor end + 1 day, None)    -> the earliest-ending sibling still valid
  relative:                  (anchor start, anchor end), or (start, start) for facts that mark a
                             beginning (place of birth, spouse, founded by) -> the sibling overlapping it
No backbone forward is needed for step (1): the query's question-state part is left at its bias.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch.nn import functional as F

from kblampp.question_time import TIME_KINDS, TimeConstraint, parse_time_constraint
from kblampp.timewin import days_to_iso, window_days

START_ONLY_RELATIONS = ("place of birth", "spouse", "founded by")  # an anchor that marks a beginning
SUCCESSION_KINDS = ("just_before", "right_after")  # with an anchor: predecessor / successor
DAY = 1.0


def needs_anchor(c: TimeConstraint | None) -> bool:
    """True for a constraint whose dates come from an anchor fact (succession, relative)."""
    return c is not None and c.anchor is not None and c.start is None and c.end is None


def constraint_days(c: TimeConstraint | None) -> tuple[float, float]:
    """(lo, hi) days of the constraint's dates; (NaN, NaN) when it carries none."""
    if c is None or (c.start is None and c.end is None):
        return math.nan, math.nan
    return window_days(c.start, c.end)


def constraint_kind(c: TimeConstraint | None) -> int:
    return 0 if c is None else TIME_KINDS.index(c.kind)


def anchored(c: TimeConstraint, lo: float, hi: float, start_only: bool) -> TimeConstraint:
    """The constraint with dates from the anchor fact's window [lo, hi] (days; hi may be +inf)."""
    if c.kind == "just_before":
        return replace(c, start=None, end=days_to_iso(lo - DAY) if math.isfinite(lo) else None)
    if c.kind == "right_after":
        return replace(c, start=days_to_iso(hi + DAY) if math.isfinite(hi) else None, end=None)
    end = lo if start_only else hi
    return replace(c, start=days_to_iso(lo), end=days_to_iso(end))


@dataclass
class QuestionTimes:
    """Per question: the parsed constraint, the anchor fact (or None) and the constraint as used."""

    parsed: list[TimeConstraint | None]
    anchor_facts: list[int | None]
    used: list[TimeConstraint | None]
    hop_group: list[list[int]] | None = None  # succession: the anchor's siblings the first hop found

    def forced(self) -> torch.Tensor | None:
        """(n, F) candidates the second retrieval must hold (the successor / predecessor is among the
        anchor's siblings), -1 padded; None when no question has any."""
        groups = self.hop_group or [[] for _ in self.used]
        width = max([len(g) for g in groups] + [0])
        if width == 0:
            return None
        out = torch.full((len(groups), width), -1, dtype=torch.long)
        for i, g in enumerate(groups):
            out[i, :len(g)] = torch.tensor(g, dtype=torch.long)
        return out

    def row(self, i: int) -> dict:
        """Question i's constraint for the evidence: as parsed, the anchor fact, and as used."""
        show = (lambda c: None if c is None else c.to_dict())
        return {"parsed": show(self.parsed[i]), "anchor_fact": self.anchor_facts[i], "used": show(self.used[i])}

    def select(self, rows: Sequence[int]) -> "QuestionTimes":
        """The same per-question lists for `rows` only, in that order."""
        groups = None if self.hop_group is None else [self.hop_group[i] for i in rows]
        return QuestionTimes([self.parsed[i] for i in rows], [self.anchor_facts[i] for i in rows],
                             [self.used[i] for i in rows], groups)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tau (n, 2) float32 days, NaN = no dates; time_kind (n,) long)."""
        tau = torch.tensor([constraint_days(c) for c in self.used], dtype=torch.float32).reshape(len(self.used), 2)
        kind = torch.tensor([constraint_kind(c) for c in self.used], dtype=torch.long)
        return tau, kind


FIRST_HOP_K = 16  # candidates the first hop's search returns
FIRST_HOP_SEM = 0.05  # weight of sem beside the evidence match when picking the anchor among them


def names_something(text: str) -> bool:
    """An anchor clause with a capitalised word names an entity; "the event" / "it was held" do not."""
    return re.search(r"\b[A-Z]", text) is not None


@torch.no_grad()
def first_hop(kb_layer: Any, source: Any, e_select: torch.Tensor, e_search: torch.Tensor | None = None,
              k: int = FIRST_HOP_K, sem_weight: float = FIRST_HOP_SEM, with_group: bool = False) -> Any:
    """(n,) anchor fact ids. The layer's own query made from `e_search` (Q = kb_query_ctx(e) +
    kb_linear_q(0)) searches k candidates; the anchor is the one whose evidence sentence best matches
    `e_select` (plain cosine, phi's prior: an anchor clause describes a whole fact, tail included, which
    the keys do not hold), sem_weight * sem breaking near-ties toward the searched (head, relation).
    `with_group`: also (n, k) the searched candidates sharing the anchor's (head, relation), -1 elsewhere."""
    device = kb_layer.kb_linear_q.weight.device
    e = e_select.to(device=device, dtype=kb_layer.dtype)
    e_s = e if e_search is None else e_search.to(device=device, dtype=kb_layer.dtype)
    h = torch.zeros(e.shape[0], 1, kb_layer.kb_linear_q.in_features, device=device, dtype=kb_layer.dtype)
    q = kb_layer.query(h, e_s)  # (n, 1, d_k)
    ids = source.search(q.reshape(e.shape[0], -1), min(k, source.num_facts)).to(device)  # (n, k)
    rows = source.fetch(ids.clamp_min(0))
    keys = rows["K"].to(device=device, dtype=kb_layer.dtype)
    sem = torch.einsum("nd,nkd->nk", q[:, 0], keys) / math.sqrt(kb_layer.d_k)  # (n, k)
    ctx = F.normalize(rows["ctx_vec"].to(device=device, dtype=kb_layer.dtype), dim=-1)
    match = torch.einsum("nd,nkd->nk", F.normalize(e, dim=-1), ctx)  # (n, k) evidence cosine
    s = (sem_weight * sem + match).masked_fill(ids < 0, float("-inf"))
    best = s.argmax(dim=1, keepdim=True)  # (n, 1)
    if not with_group:
        return ids.gather(1, best).squeeze(1)
    if "head_id" in rows and "rel_id" in rows:
        h, r = rows["head_id"].to(device), rows["rel_id"].to(device)
        same = (h == h.gather(1, best)) & (r == r.gather(1, best))
    else:  # siblings have equal keys
        same = (keys == keys.gather(1, best.unsqueeze(-1).expand(-1, 1, keys.shape[-1]))).all(-1)
    return ids.gather(1, best).squeeze(1), ids.masked_fill(~same | (ids < 0), -1)


def hop_texts(question: str, c: TimeConstraint) -> tuple[str, str]:
    """(select text, search text) of an anchored question. Succession: the anchor is a sibling of the
    answer, so the question itself searches its (head, relation) and the clause ("X as CEO of Y", or
    just "X") picks X's fact. Relative: the clause searches and picks, unless it names nothing ("the
    event"), where the question stands in for it."""
    if c.kind in SUCCESSION_KINDS:
        return c.anchor, question
    text = c.anchor if names_something(c.anchor) else question
    return text, text


def question_times(questions: Sequence[str], reference_date: str | None = None, kb_layer: Any = None,
                   source: Any = None, embed: Callable[[list[str]], Any] | None = None,
                   relation_of: Callable[[int], str] | None = None) -> QuestionTimes:
    """Parse every question; anchored constraints are resolved by `first_hop` when a layer, source and
    embedder are given (else they stay undated, so g_time is 0 for them). `relation_of(fact_id)` names
    the anchor fact's relation (for the start-only rule); without it the whole window is used."""
    parsed = [parse_time_constraint(q, reference_date) for q in questions]
    used: list[TimeConstraint | None] = list(parsed)
    anchors: list[int | None] = [None] * len(parsed)
    todo = [i for i, c in enumerate(parsed) if needs_anchor(c)]
    if todo and kb_layer is not None and source is not None and embed is not None:
        texts = [hop_texts(questions[i], parsed[i]) for i in todo]
        e_select = torch.as_tensor(embed([t[0] for t in texts]), dtype=torch.float32)
        e_search = torch.as_tensor(embed([t[1] for t in texts]), dtype=torch.float32)
        ids, group = first_hop(kb_layer, source, e_select, e_search, with_group=True)
        windows = source.fetch(ids.clamp_min(0))
        groups: list[list[int]] = [[] for _ in parsed]
        for j, i in enumerate(todo):
            fact = int(ids[j])
            lo, hi = float(windows["tau_min"][j]), float(windows["tau_max"][j])
            start_only = relation_of is not None and relation_of(fact) in START_ONLY_RELATIONS
            anchors[i], used[i] = fact, anchored(parsed[i], lo, hi, start_only)
            if parsed[i].kind in SUCCESSION_KINDS:
                groups[i] = [int(x) for x in group[j].tolist() if x >= 0 and x != fact]
        return QuestionTimes(parsed, anchors, used, groups)
    return QuestionTimes(parsed, anchors, used)


def gold_anchor_times(parsed: Sequence[TimeConstraint | None], supporting: Sequence[Sequence[int]],
                      windows: Callable[[int], tuple[float, float]], relation_of: Callable[[int], str]
                      ) -> QuestionTimes:
    """Training: anchored constraints resolved with the gold anchor (the first supporting fact)."""
    used: list[TimeConstraint | None] = list(parsed)
    anchors: list[int | None] = [None] * len(parsed)
    for i, c in enumerate(parsed):
        if needs_anchor(c) and len(supporting[i]) >= 1:
            fact = int(supporting[i][0])
            lo, hi = windows(fact)
            anchors[i], used[i] = fact, anchored(c, lo, hi, relation_of(fact) in START_ONLY_RELATIONS)
    return QuestionTimes(list(parsed), anchors, used)


def window_satisfies(c: TimeConstraint | None, lo: float, hi: float) -> bool | None:
    """Whether a fact window [lo, hi] (days) fits the constraint's dates: it overlaps them (for
    before / after / just_before / right_after the open side counts). None without dates."""
    q_lo, q_hi = constraint_days(c)
    if math.isnan(q_lo):
        return None
    return lo <= q_hi and hi >= q_lo
