"""Retrieval metrics at the last prompt token (SPEC section 7), from recorded alpha / cand_ids.

The last prompt token is where the model must retrieve before it writes any answer token, and it is
what the answer head's pointer reads, so every number here is measured there:
- recall@1: the answer fact (the fact whose tail is the gold answer) has the highest alpha;
- recall@K: the share of the supporting facts among the K_top candidates;
- top-alpha precision: the highest-alpha candidate is one of the supporting facts;
- temporal questions: alpha mass on candidates sharing the answer fact's (head, relation) whose window
  overlaps the question window ("match") versus those whose window does not ("mismatch").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kblampp.schema import Fact, QARecord


def answer_fact_of(record: QARecord) -> int:
    """Index of the fact whose tail is the gold answer: `answer_fact` if given, else the last support."""
    value = record.raw.get("answer_fact")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not record.supporting_facts:
        raise ValueError(f"qid {record.qid}: supporting_facts: empty, cannot tell the answer fact")
    return record.supporting_facts[-1]


def windows_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Closed intervals in days intersect (open ends are +-inf)."""
    return min(a[1], b[1]) >= max(a[0], b[0])


@dataclass(frozen=True)
class RetrievalScore:
    """Scores of one question; temporal fields are None when they do not apply."""

    recall_at_1: float | None  # None on unanswerable questions (no fact to retrieve)
    recall_at_k: float | None
    top_alpha_precision: float | None
    time_match_mass: float | None = None
    time_mismatch_mass: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"recall@1": self.recall_at_1, "recall@K": self.recall_at_k,
                "top_alpha_precision": self.top_alpha_precision,
                "time_match_mass": self.time_match_mass, "time_mismatch_mass": self.time_mismatch_mass}


def score_question(cand_ids: Sequence[int], alpha: Sequence[float], record: QARecord,
                   facts: Sequence[Fact]) -> RetrievalScore:
    """Metrics of one question from its K candidates (-1 = empty slot) and their alpha weights."""
    ids = np.asarray(cand_ids, dtype=np.int64).reshape(-1)
    weights = np.asarray(alpha, dtype=np.float64).reshape(-1)
    if ids.shape != weights.shape:
        raise ValueError(f"qid {record.qid}: cand_ids has {ids.size} entries but alpha has {weights.size}")
    if not record.answerable:  # nothing to retrieve: retrieval metrics do not apply
        return RetrievalScore(None, None, None)
    valid = ids >= 0
    if not valid.any():
        return RetrievalScore(0.0, 0.0, 0.0, *_temporal(ids, weights, record, facts))
    masked = np.where(valid, weights, -np.inf)
    top = int(ids[int(np.argmax(masked))])
    support = set(record.supporting_facts)
    present = set(ids[valid].tolist())
    recall_k = len(support & present) / len(support) if support else 0.0
    match, mismatch = _temporal(ids, weights, record, facts)
    return RetrievalScore(recall_at_1=float(top == answer_fact_of(record)), recall_at_k=float(recall_k),
                          top_alpha_precision=float(top in support), time_match_mass=match,
                          time_mismatch_mass=mismatch)


def _temporal(ids: np.ndarray, weights: np.ndarray, record: QARecord,
              facts: Sequence[Fact]) -> tuple[float | None, float | None]:
    """(match mass, mismatch mass) over same-(head, relation) candidates, or (None, None)."""
    if record.type != "temporal" or record.tau is None:
        return None, None
    gold = facts[answer_fact_of(record)]
    key = (gold.head_id or gold.head_name, gold.relation_id or gold.relation_name)
    match = mismatch = 0.0
    for idx, a in zip(ids.tolist(), weights.tolist()):
        if idx < 0:
            continue
        fact = facts[idx]
        if (fact.head_id or fact.head_name, fact.relation_id or fact.relation_name) != key:
            continue
        if windows_overlap((fact.tau_min, fact.tau_max), record.tau):
            match += a
        else:
            mismatch += a
    return match, mismatch


def aggregate(scores: Sequence[RetrievalScore]) -> dict[str, float | None]:
    """Means over questions; temporal masses averaged over the questions where they apply."""
    def avg(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "recall@1": avg([s.recall_at_1 for s in scores]),
        "recall@K": avg([s.recall_at_k for s in scores]),
        "top_alpha_precision": avg([s.top_alpha_precision for s in scores]),
        "time_match_mass": avg([s.time_match_mass for s in scores]),
        "time_mismatch_mass": avg([s.time_mismatch_mass for s in scores]),
    }
