"""Parse the time constraint of a question from its text ("in 1995", "from 1990 to 1995", ...).

Returns ISO partial dates usable as a QA record's `question_time` {start, end}; None marks an open
end. Why rules and not a model: the builders, the QA code and the server must all read a question's
time the same way, deterministically and without loading anything.

Forms understood (case-insensitive; X is `YYYY`, `Mon YYYY`, `Month D, YYYY`, `D Month YYYY`,
`YYYY-MM-DD`, `the 1990s`, `early/mid/late 1990s`):
  in/on/during/around X -> (X, X); bare `Mon YYYY` or a decade -> (X, X)
  from X to Y, between X and Y, X to Y, X-Y -> (X, Y); from/since X to present -> (X, None)
  before X -> (None, period before X); after X -> (period after X, None)
  since X -> (X, None); until/till X -> (None, X)
When a question holds several, the one that constrains the answer is picked: expressions right after
a describing verb ("born in 1136", "founded in 1991") lose to any other; closed windows beat open
ones; among equals the last one wins (questions put the constraint at the end).
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from kblampp.timewin import window_days

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_ORD = r"(?:st|nd|rd|th)?"
_Y34 = r"\d{3,4}"
_NOT_UNIT = (r"(?!\s*(?:am|pm|a\.m|p\.m|%|percent|million|billion|thousand|people|points?|goals?|games?"
             r"|times|km|miles?|meters?|metres?|feet|ft|kg|years?|months?|weeks?|days?|hours?|minutes?"
             r"|seconds?)\b)(?![\d/])")
# A date with an explicit month or decade (never a bare number), then one that may be a bare year.
_DATED = (rf"(?:\d{{4}}-\d{{2}}-\d{{2}}|{_MONTH}\s+\d{{1,2}}{_ORD},?\s+{_Y34}"
          rf"|\d{{1,2}}{_ORD}\s+(?:of\s+)?{_MONTH},?\s+{_Y34}|{_MONTH},?\s+{_Y34}"
          rf"|(?:the\s+)?(?:(?:early|mid|middle|late)[\s-]+)?\d{{2,3}}0'?s)")
_X = rf"(?:{_DATED}|(?:the\s+year\s+)?{_Y34})"
_X_SHORT = rf"(?:{_DATED}|\d{{1,4}})"  # after from/between, years like 8 or 190 are real (Han dynasty)
_NOW = r"(?:the\s+)?(?:present(?:\s+day)?|now|today|date)"
_B = r"(?<![\w/-])"
_E = rf"(?![\w/]){_NOT_UNIT}"

_RANGE_KW = re.compile(
    rf"{_B}(?:from|since|between)\s+(?:the\s+(?:years?|period)\s+)?(?P<a>{_X_SHORT})\s*"
    rf"(?:to|until|till|through|thru|and|-|–|—)\s*(?P<b>{_NOW}|{_X_SHORT}){_E}", re.I)
_RANGE_BARE = re.compile(
    rf"{_B}(?P<a>{_X})\s*(?:to|until|till|through|-|–|—)\s*(?P<b>{_NOW}|{_X}){_E}", re.I)
_OPEN = re.compile(rf"{_B}(?P<kw>before|prior\s+to|after|since|until|till)\s+(?:the\s+year\s+)?(?P<a>{_X}){_E}", re.I)
_POINT_KW = re.compile(
    rf"{_B}(?:in|on|during|around|circa|throughout|as\s+of)\s+(?:the\s+year\s+)?(?P<a>{_X}){_E}", re.I)
_POINT_BARE = re.compile(rf"{_B}(?P<a>{_DATED}){_E}", re.I)

_DESCRIBING = re.compile(
    r"\b(?:born|died|founded|established|built|chartered|created|formed|opened|launched|relocated|began|started"
    r"|appointed|constructed|completed|incorporated|introduced|released|published|named)\b(?:\s+\S+){0,4}\s*$", re.I)


@dataclass(frozen=True)
class TimeExpr:
    """One time expression found in a text: its window, its kind and where it is."""

    start: str | None
    end: str | None
    kind: str  # range | point | open
    span: tuple[int, int]
    text: str
    describing: bool  # right after a verb like "born"/"founded": describes an entity, not the answer


def _year(text: str) -> str:
    return f"{int(text):04d}"


def _month(text: str) -> int:
    return _MONTHS.index(text.strip(". ").lower()[:3]) + 1


def _date(text: str) -> tuple[str, str] | None:
    """Inclusive (first, last) ISO partial dates of one date phrase; None if it is not a valid date."""
    t = re.sub(r"\s+", " ", text.strip().lower().replace("’", "'"))
    t = re.sub(r"^the (?:year )?", "", t)
    try:
        if m := re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", t):
            d = dt.date(int(m[1]), int(m[2]), int(m[3]))
            return (d.isoformat(),) * 2
        if m := re.fullmatch(rf"({_MONTH}) (\d{{1,2}}){_ORD},? (\d{{3,4}})", t):
            d = dt.date(int(m[3]), _month(m[1]), int(m[2]))
            return (d.isoformat(),) * 2
        if m := re.fullmatch(rf"(\d{{1,2}}){_ORD} (?:of )?({_MONTH}),? (\d{{3,4}})", t):
            d = dt.date(int(m[3]), _month(m[2]), int(m[1]))
            return (d.isoformat(),) * 2
        if m := re.fullmatch(rf"({_MONTH}),? (\d{{3,4}})", t):
            iso = f"{_year(m[2])}-{_month(m[1]):02d}"
            return (iso, iso) if int(m[2]) > 0 else None
        if m := re.fullmatch(r"(?:(early|mid|middle|late)[ -]+)?(?:the )?(\d{2,3}0)'?s", t):
            first = int(m[2])
            # "the 1800s" is a century, "the 1990s" a decade, and "the 2000s" the decade 2000-2009
            length = 100 if first % 100 == 0 and first != 2000 else 10
            part = {None: (0, length), "early": (0, length * 4 // 10), "mid": (length * 4 // 10, length * 7 // 10),
                    "middle": (length * 4 // 10, length * 7 // 10), "late": (length * 7 // 10, length)}[m[1]]
            lo, hi = first + part[0], first + part[1] - 1
            return (_year(str(lo)), _year(str(hi))) if lo > 0 else None
        if re.fullmatch(r"\d{1,4}", t):
            return (_year(t),) * 2 if int(t) > 0 else None
    except ValueError:
        return None
    return None


def _shift(iso: str, step: int) -> str | None:
    """The period next to `iso` at its own precision (step -1: before, +1: after)."""
    parts = [int(p) for p in iso.split("-")]
    try:
        if len(parts) == 1:
            year = parts[0] + step
            return _year(str(year)) if 1 <= year <= 9999 else None
        if len(parts) == 2:
            index = parts[0] * 12 + parts[1] - 1 + step
            year, month = divmod(index, 12)
            return f"{year:04d}-{month + 1:02d}" if 1 <= year <= 9999 else None
        return (dt.date(*parts) + dt.timedelta(days=step)).isoformat()
    except (ValueError, OverflowError):
        return None


def _valid(start: str | None, end: str | None) -> bool:
    try:
        window_days(start, end)
    except ValueError:
        return False
    return start is not None or end is not None


def find_time_expressions(text: str) -> list[TimeExpr]:
    """Every time expression of `text`, in reading order (ranges claim their words first)."""
    work = text
    found: list[TimeExpr] = []

    def claim(match: re.Match, start: str | None, end: str | None, kind: str) -> None:
        nonlocal work
        i, j = match.span()
        work = work[:i] + " " * (j - i) + work[j:]
        if _valid(start, end):
            describing = bool(_DESCRIBING.search(text[:i]))
            found.append(TimeExpr(start, end, kind, (i, j), text[i:j], describing))

    for pattern in (_RANGE_KW, _RANGE_BARE):
        for m in list(pattern.finditer(work)):
            a = _date(m["a"])
            b = None if re.fullmatch(_NOW, m["b"], re.I) else _date(m["b"])
            if a is None or (b is None and not re.fullmatch(_NOW, m["b"], re.I)):
                continue
            claim(m, a[0], None if b is None else b[1], "range")
    for m in list(_OPEN.finditer(work)):
        a = _date(m["a"])
        if a is None:
            continue
        kw = m["kw"].lower()
        if kw in ("before", "prior to") or kw.startswith("prior"):
            claim(m, None, _shift(a[0], -1), "open")
        elif kw == "after":
            claim(m, _shift(a[1], +1), None, "open")
        elif kw == "since":
            claim(m, a[0], None, "open")
        else:
            claim(m, None, a[1], "open")
    for pattern in (_POINT_KW, _POINT_BARE):
        for m in list(pattern.finditer(work)):
            a = _date(m["a"])
            if a is not None:
                claim(m, a[0], a[1], "point")
    return sorted(found, key=lambda e: e.span)


def pick_time_expression(found: list[TimeExpr]) -> TimeExpr | None:
    """The expression that constrains the answer (rules in the module docstring)."""
    if not found:
        return None
    return max(enumerate(found), key=lambda ie: (not ie[1].describing, ie[1].kind != "open", ie[0]))[1]


def parse_question_time(text: str) -> tuple[str | None, str | None] | None:
    """(start, end) ISO partial dates of the question's time constraint, None ends open; None if none."""
    if not isinstance(text, str):
        raise TypeError(f"question text must be a string, got {type(text).__name__}")
    best = pick_time_expression(find_time_expressions(text))
    return None if best is None else (best.start, best.end)


def question_time_dict(text: str) -> dict | None:
    """`parse_question_time` in the QA record's `question_time` shape ({start, end} or None)."""
    window = parse_question_time(text)
    return None if window is None else {"start": window[0], "end": window[1]}


TIME_KINDS = ("none", "at", "between", "before", "after", "just_before", "right_after",
              "first", "last", "current", "relative")
