"""A question's typed time constraint as the model reads it: `tau` (lo, hi) days and a `time_kind` id.

One place for training, evaluation and the server: parse the text (`kblampp.question_time`), resolve
anchored constraints through a first retrieval, and turn the result into KBContext tensors.

Succession and relative questions need two facts: "who succeeded X as CEO of Y" is a `right_after`
constraint whose date is the end of X's tenure, which only the KB knows. They are answered in two
retrievals: (1) the first inject layer's own query (Q = kb_query_ctx(e) + kb_linear_q(0), e the
embedding of the question for succession, of the anchor clause for relative questions) searches 16
candidates, and the one whose evidence sentence best matches the anchor clause is the anchor fact
(`first_hop`, `hop_texts`); (2) its time becomes the constraint's dates and the question is
answered as a dated one:
  just_before (predecessor): (None, anchor start - 1 day)  -> the latest sibling started by then
  right_after (successor):   (anchor end + 1 day, None)    -> the earliest-ending sibling still valid
  relative:                  the anchor's window, or its start's own period for facts that mark a
                             beginning (place of birth, spouse, founded by: "the year Y was founded")
For succession the anchor's siblings that the first hop found are the second retrieval's only
candidates (the answer is one of them). For relative questions the anchor and its siblings are never
candidates (the answer is another fact), and e_q is the embedding of the question without its clause
(`relative_query_text`), so the query asks for what the answer fact is about, not for the anchor;
when that still names the anchor's head ("the organiser of the Expo"), the anchor's tail joins it.
No backbone forward is needed for step (1): the query's question-state part is left at its bias.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch.nn import functional as F

from kblampp.question_time import TIME_KINDS, TimeConstraint, parse_time_constraint, without_relative_clause
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


def anchor_days(c: TimeConstraint, relation: str, start: str | None, end: str | None) -> tuple[float, float]:
    """The time (lo, hi) days an anchor fact stands for: for succession its whole window; for a
    relative constraint too, except that a fact marking a beginning (place of birth, spouse, founded by)
    stands for its start's own period ("founded in 1993" -> all of 1993, not its first day)."""
    if c.kind not in SUCCESSION_KINDS and relation in START_ONLY_RELATIONS and start is not None:
        return window_days(start, start)
    return window_days(start, end)


def anchored(c: TimeConstraint, lo: float, hi: float) -> TimeConstraint:
    """The constraint with dates from the anchor's time [lo, hi] (days; `anchor_days`; hi may be +inf)."""
    if c.kind == "just_before":
        return replace(c, start=None, end=days_to_iso(lo - DAY) if math.isfinite(lo) else None)
    if c.kind == "right_after":
        return replace(c, start=days_to_iso(hi + DAY) if math.isfinite(hi) else None, end=None)
    return replace(c, start=days_to_iso(lo), end=days_to_iso(hi))


class AnchorFact(NamedTuple):
    """What the second retrieval needs of an anchor fact."""

    relation: str
    start: str | None
    end: str | None
    head: str = ""
    tail: str = ""


FactTime = Callable[[int], AnchorFact]


def anchor_fact_of(fact: Any) -> AnchorFact:
    """A `kblampp.schema.Fact` as an anchor."""
    return AnchorFact(fact.relation_name, fact.start, fact.end, fact.head_name, fact.tail_name)


@dataclass
class AnchorUse:
    """What an anchor fact does to its question: the dated constraint, the second retrieval's only
    candidates (succession) or excluded ones (relative), and e_q's text (relative; None = the question)."""

    used: TimeConstraint
    forced: list[int]
    excluded: list[int]
    query_text: str | None


def use_anchor(question: str, c: TimeConstraint, fact: int, siblings: Sequence[int], info: AnchorFact | None,
               window: tuple[float, float] | None = None) -> AnchorUse:
    """One place for evaluation, training signals and the server: date `c` by anchor `fact` (its
    `info`, or without it the store's `window` in days) and say how the second retrieval uses it."""
    lo, hi = anchor_days(c, info.relation, info.start, info.end) if info is not None else window
    used = anchored(c, lo, hi)
    if c.kind in SUCCESSION_KINDS:  # the successor / predecessor is one of the anchor's siblings
        return AnchorUse(used, list(siblings), [], None)
    return AnchorUse(used, [], [fact, *siblings], relative_query_text(question, info))  # the answer is another fact


def relative_query_text(question: str, anchor: AnchorFact | None) -> str:
    """The text whose embedding queries a dated relative question's answer: the question without its
    clause; when what is left still asks about the anchor's own head ("the organiser of the Expo"), or
    names nothing but a pronoun's referent ("its organiser"), the answer is about the anchor's tail,
    which the text then carries (a chain: event -> organiser -> its CEO)."""
    rest = without_relative_clause(question)
    if anchor is None or not anchor.tail:
        return rest
    about_head = bool(anchor.head) and anchor.head.lower() in rest.lower()
    if about_head or not names_something(rest[1:]):
        return f"{rest} {anchor.tail}"
    return rest



def padded_ids(groups: Sequence[Sequence[int]]) -> torch.Tensor | None:
    """(n, W) long ids, -1 padded; None when every group is empty."""
    width = max([len(g) for g in groups] + [0])
    if width == 0:
        return None
    out = torch.full((len(groups), width), -1, dtype=torch.long)
    for i, g in enumerate(groups):
        out[i, :len(g)] = torch.tensor(list(g), dtype=torch.long)
    return out


@dataclass
class QuestionTimes:
    """Per question: the parsed constraint, the anchor fact (or None) and the constraint as used."""

    parsed: list[TimeConstraint | None]
    anchor_facts: list[int | None]
    used: list[TimeConstraint | None]
    hop_group: list[list[int]] | None = None  # succession: the anchor's siblings the first hop found
    excluded: list[list[int]] | None = None  # relative: the anchor and its siblings
    query_texts: list[str | None] | None = None  # relative: the question without its clause (e_q's text)

    def forced(self) -> torch.Tensor | None:
        """(n, F) the second retrieval's only candidates (the successor / predecessor is one of the
        anchor's siblings), -1 padded; None when no question has any."""
        return padded_ids(self.hop_group or [])

    def excluded_ids(self) -> torch.Tensor | None:
        """(n, E) facts the second retrieval must not return (a relative question's anchor group)."""
        return padded_ids(self.excluded or [])

    def row(self, i: int) -> dict:
        """Question i's constraint for the evidence: as parsed, the anchor fact, and as used."""
        show = (lambda c: None if c is None else c.to_dict())
        out = {"parsed": show(self.parsed[i]), "anchor_fact": self.anchor_facts[i], "used": show(self.used[i])}
        if self.query_texts and self.query_texts[i] is not None:
            out["query_text"] = self.query_texts[i]
        return out

    def select(self, rows: Sequence[int]) -> "QuestionTimes":
        """The same per-question lists for `rows` only, in that order."""
        pick = (lambda lists: None if lists is None else [lists[i] for i in rows])
        return QuestionTimes(pick(self.parsed), pick(self.anchor_facts), pick(self.used), pick(self.hop_group),
                             pick(self.excluded), pick(self.query_texts))

    def query_text(self, i: int, question: str) -> str:
        """The text whose embedding is question i's e_q: the question, or for a dated relative
        question the question without its clause (the clause's time is now in the constraint)."""
        return question if not self.query_texts or self.query_texts[i] is None else self.query_texts[i]

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
                   fact_time: FactTime | None = None) -> QuestionTimes:
    """Parse every question; anchored constraints are resolved by `first_hop` when a layer, source and
    embedder are given (else they stay undated, so g_time is 0 for them). `fact_time(fact_id)` gives
    the anchor fact's relation and dates (`anchor_days`); without it the store's window is used.
    Succession: the anchor's siblings become the only candidates; relative: the anchor and its
    siblings are excluded (the answer is another fact, dated by the anchor)."""
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
        excluded: list[list[int]] = [[] for _ in parsed]
        texts_q: list[str | None] = [None] * len(parsed)
        for j, i in enumerate(todo):
            fact = int(ids[j])
            siblings = [int(x) for x in group[j].tolist() if x >= 0 and x != fact]
            window = (float(windows["tau_min"][j]), float(windows["tau_max"][j]))
            use = use_anchor(questions[i], parsed[i], fact, siblings,
                             None if fact_time is None else fact_time(fact), window)
            anchors[i], used[i], groups[i], excluded[i], texts_q[i] = fact, use.used, use.forced, use.excluded, \
                use.query_text
        return QuestionTimes(parsed, anchors, used, groups, excluded, texts_q)
    return QuestionTimes(parsed, anchors, used)


def gold_anchor_times(parsed: Sequence[TimeConstraint | None], supporting: Sequence[Sequence[int]],
                      fact_time: FactTime, questions: Sequence[str] | None = None) -> QuestionTimes:
    """Training: anchored constraints resolved with the gold anchor (the first supporting fact); with
    `questions`, relative questions also get their query text (`relative_query_text`), as at run time."""
    used: list[TimeConstraint | None] = list(parsed)
    anchors: list[int | None] = [None] * len(parsed)
    texts: list[str | None] = [None] * len(parsed)
    for i, c in enumerate(parsed):
        if needs_anchor(c) and len(supporting[i]) >= 1:
            fact = int(supporting[i][0])
            use = use_anchor("" if questions is None else questions[i], c, fact, [], fact_time(fact))
            anchors[i], used[i] = fact, use.used
            if questions is not None:
                texts[i] = use.query_text
    return QuestionTimes(list(parsed), anchors, used, query_texts=texts if questions is not None else None)


def query_vectors(embed: Callable[[list[str]], Any], questions: Sequence[str], times: QuestionTimes,
                  q_vecs: Any) -> Any:
    """(n, d_ctx) e_q of the KB model: each question's vector `q_vecs` (numpy or torch), or where
    `times` gives another query text (a dated relative question without its clause) that text's."""
    out = q_vecs.clone() if isinstance(q_vecs, torch.Tensor) else q_vecs.copy()
    todo = [i for i, q in enumerate(questions) if times.query_text(i, q) != q]
    if todo:
        vecs = embed([times.query_text(i, questions[i]) for i in todo])
        out[todo] = torch.as_tensor(vecs, dtype=out.dtype) if isinstance(out, torch.Tensor) else vecs
    return out


def window_satisfies(c: TimeConstraint | None, lo: float, hi: float) -> bool | None:
    """Whether a fact window [lo, hi] (days) fits the constraint's dates: it overlaps them (for
    before / after / just_before / right_after the open side counts). None without dates."""
    q_lo, q_hi = constraint_days(c)
    if math.isnan(q_lo):
        return None
    return lo <= q_hi and hi >= q_lo
