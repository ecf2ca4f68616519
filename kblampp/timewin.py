"""Time windows as float days since 1970-01-01.

Partial ISO dates (YYYY, YYYY-MM, YYYY-MM-DD) expand to their first day as a window start and to
their last day as a window end; an open start is -inf (unbounded past), an open end +inf (still true).
"""
from __future__ import annotations

import calendar
import datetime as dt
import math
import re

EPOCH = dt.date(1970, 1, 1)
_ISO = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def parse_date(text: str, *, as_end: bool) -> float:
    """Days since epoch of an ISO partial date; `as_end` picks the last day of a partial date."""
    if not isinstance(text, str):
        raise ValueError(f"expected an ISO date string, got {type(text).__name__}")
    match = _ISO.match(text.strip())
    if not match:
        raise ValueError(f"unparsable date {text!r} (expected YYYY, YYYY-MM or YYYY-MM-DD)")
    year, month, day = int(match.group(1)), match.group(2), match.group(3)
    try:
        if month is None:
            date = dt.date(year, 12, 31) if as_end else dt.date(year, 1, 1)
        elif day is None:
            m = int(month)
            last = calendar.monthrange(year, m)[1] if 1 <= m <= 12 else 0
            date = dt.date(year, m, last if as_end else 1)
        else:
            date = dt.date(year, int(month), int(day))
    except ValueError as err:
        raise ValueError(f"unparsable date {text!r} ({err})") from None
    return float((date - EPOCH).days)


def window_days(start: str | None, end: str | None) -> tuple[float, float]:
    """(tau_min, tau_max) in days; raises ValueError naming `start`/`end` if bad or inverted."""
    try:
        lo = -math.inf if start is None else parse_date(start, as_end=False)
    except ValueError as err:
        raise ValueError(f"start: {err}") from None
    try:
        hi = math.inf if end is None else parse_date(end, as_end=True)
    except ValueError as err:
        raise ValueError(f"end: {err}") from None
    if hi < lo:
        raise ValueError(f"end: window ends ({end}) before it starts ({start})")
    return lo, hi


def days_to_iso(days: float) -> str | None:
    """Inverse for display: finite days to YYYY-MM-DD, infinite ends to None."""
    if not math.isfinite(days):
        return None
    return (EPOCH + dt.timedelta(days=int(days))).isoformat()


def year_of(days: float) -> int:
    """Calendar year of a finite day number."""
    return (EPOCH + dt.timedelta(days=int(days))).year
