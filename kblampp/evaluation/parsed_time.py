"""The one place evaluation reads a question's time: parsed from the question text, exactly as the
server does, never taken from the QA record (whose `question_time` is gold, for checking only).

Every row (KBLaM++ variants, `lookup`, `lookup_chain`) calls `question_window` / `question_tau`, so a
richer parser (a typed constraint) changes this file only.
"""
from __future__ import annotations

from kblampp.question_time import parse_question_time
from kblampp.timewin import window_days

Window = tuple[str | None, str | None]


def question_window(text: str) -> Window | None:
    """(start, end) ISO partial dates parsed from the question text (None ends open); None = no time."""
    return parse_question_time(text)


def question_tau(text: str) -> tuple[float, float] | None:
    """The parsed window in days (open ends +-inf); None when the question states no time."""
    window = question_window(text)
    if window is None or window == (None, None):
        return None
    return window_days(*window)
