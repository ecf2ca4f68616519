"""The one place evaluation reads a question's time: parsed from the question text, exactly as the
server does, never taken from the QA record (whose `question_time` is gold, for checking only).

Every row (KBLaM++ variants, `lookup`, `lookup_chain`) goes through `question_time`, the single call
of the typed parser (`kblampp.question_time.parse_time_constraint`): its kind ("before", "first",
"current", ...), its window in days and, for "relative" and succession questions, the anchoring clause.
"""
from __future__ import annotations

from dataclasses import dataclass

from kblampp.question_time import parse_time_constraint
from kblampp.timewin import window_days

Tau = tuple[float, float]


@dataclass(frozen=True)
class QuestionTime:
    """A question's parsed time: kind ("none" when it states none), window in days (open ends +-inf;
    None = no dates), anchor clause (relative / succession)."""

    kind: str = "none"
    tau: Tau | None = None
    anchor: str | None = None


def question_time(text: str, reference_date: str | None = None) -> QuestionTime:
    """The typed time of a question, parsed from its text; `reference_date` resolves "now"/"current"."""
    constraint = parse_time_constraint(text, reference_date)
    if constraint is None:
        return QuestionTime()
    window = constraint.window()
    return QuestionTime(constraint.kind, None if window is None else window_days(*window), constraint.anchor)


def question_tau(text: str, reference_date: str | None = None) -> Tau | None:
    """The parsed window in days; None when the question states no dates."""
    return question_time(text, reference_date).tau
