"""A fact's time window inferred from the page text around its answer span, never from a question.

Why rules: a real KB gets its windows from the text that states the fact; TimeQA's pages are
space-tokenised Wikipedia text ("February 4 , 2005 – September 8 , 2005", "- 1719–1724 : Name",
"In 1834 , William Redin ... purchased it", "( 1894-1932 )"), and a few regular forms cover most.

Time expressions (`find_page_times`): dates `YYYY` (1000-2039, not a measure or a sum), `Mon YYYY`,
`D Mon YYYY`, `Mon D , YYYY`; ranges `A–B`, `A - B`, `A to B`, `from A to B`, `between A and B`,
`A–present`, `1916–20`; open `since A`, `until/till A`; anything else dated is a point.

The window of a span (`infer_window`), first rule that gives a date wins:
  1. `range`: among the dates of the span's list row (a sentence cut at " - " / " ; " bullets) if
     it has any, else of its sentence, the range nearest the span (ties: the one before it), unless
     a point or `since` is nearer; "nearest" counts a date in the span's own clause (no " , ",
     " and ", "when", ... between them) before any across a clause boundary ("Pistoiese in 2002–03
     and Livorno in 2003–04");
  2. `point`: start = the last point / `since` / `until` ("until 1990 , when X took over") before
     the span in the sentence (else the first point after it), unless that one is across a clause
     boundary and the first after it is not ("an assistant in 1881 , an instructor in 1882");
     end = an `until` after the span, or
     a later point in the sentence introduced by an ending word ("resigned", "left", "replaced", ...);
  3. `neighbour`: rules 1-2 on the previous sentence, then on the next one;
  4. `preceding`: the page's last date before the span, as an open start (a narrative's order:
     "In March 1943 he was posted ... He was promoted to Junior Lieutenant").
Life data in parentheses right after the span is the tail's own, never the fact's window: a range of
LIFESPAN_YEARS or more ("Herbert Dallmann ( 1909–1996 ) was appointed ...") or a date introduced by
born / died ("Hans-Heinz Emons ( born 1930 ) , chemist , 1968 - 1975": the row's range is the tenure).
`close_open_ends` then ends an open window at the next start among the same (page, relation)'s
facts (`+next_start`): successive owners, coaches, office holders.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MON = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
        r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_YEAR = r"(?:1[0-9]{3}|20[0-3][0-9])"
_NOT_MEASURE = (r"(?![\d.,]\d)(?!\s*(?:%|percent|million|billion|people|persons|inhabitants|residents|km|miles?"
                r"|metres?|meters?|feet|ft|kg|tons?|tonnes?|acres?|hectares?|dunams?|students|seats|votes)\b)")
_DATE = (rf"(?:\d{{1,2}}\s+{_MON}\s*,?\s*{_YEAR}|{_MON}\s+\d{{1,2}}\s*,?\s*{_YEAR}|{_MON}\s*,?\s*{_YEAR}"
         rf"|(?<![$£€\d./]){_YEAR})(?![\w/]){_NOT_MEASURE}")
_NOW = r"(?:present|now|today|incumbent)"
_DASH = r"(?:-|–|—|to|until|till|through)"
_RANGE = re.compile(
    rf"(?:between\s+(?P<a1>{_DATE})\s*and\s*(?P<b1>{_DATE}))"
    rf"|(?:(?:from\s+)?(?P<a>{_DATE})\s*{_DASH}\s*(?P<b>{_NOW}\b|{_DATE}|\d{{2}}(?![\w/])))", re.I)
_OPEN = re.compile(rf"\b(?P<kw>since|until|till|up\s+to)\s+(?P<a>{_DATE})", re.I)
_POINT = re.compile(_DATE, re.I)
_BULLET = re.compile(r" (?:-|–|;|•) ")
_OPEN_PAREN = re.compile(r"\s*\(\s*")
LIFESPAN_YEARS = 60  # a parenthesised range this long after a name is a life, not a tenure
_LIFE_CUE = re.compile(r"\s*\(\s*(?:born|died)\s*", re.I)  # "( born 1930", "( died 1712"
_END_CUE = re.compile(r"\b(?:resign\w*|left|leav\w+|until|till|replac\w+|succeed\w*|sack\w*|dismiss\w*|retir\w+"
                      r"|end\w*|died|death|sold|relieved|depart\w*|quit|fired|stepped\s+down|lost|moved|closed"
                      r"|dissolved|abolished|renamed|released|transferred|joined)\b", re.I)


@dataclass(frozen=True)
class PageTime:
    """One time expression of a page: ISO partial dates (None = open), its kind and character span."""

    start: str | None
    end: str | None
    kind: str  # range | since | until | point
    span: tuple[int, int]


@dataclass(frozen=True)
class InferredWindow:
    start: str | None
    end: str | None
    rule: str  # range | point | neighbour-range | neighbour-point | preceding (+next_start added later)


def _date(text: str, last: bool = False) -> str | None:
    """ISO partial date of one date phrase (its first day's precision kept: YYYY, YYYY-MM, YYYY-MM-DD)."""
    t = re.sub(r"\s+", " ", text.replace(",", " ")).strip().lower()
    year = re.search(r"\d{4}$", t)
    if year is None:
        return None
    words = t[:year.start()].split()
    month = next((_MONTHS.index(w.rstrip(".")[:3]) + 1 for w in words if w.rstrip(".")[:3] in _MONTHS and w[0].isalpha()), None)
    day = next((int(w) for w in words if w.isdigit()), None)
    if month is None:
        return year.group()
    if day is None or not 1 <= day <= 31:
        return f"{year.group()}-{month:02d}"
    return f"{year.group()}-{month:02d}-{day:02d}"


def find_page_times(text: str) -> list[PageTime]:
    """Every time expression of `text` in reading order; ranges and open ends claim their words first."""
    work = list(text)
    found: list[PageTime] = []

    def claim(m: re.Match, start: str | None, end: str | None, kind: str) -> None:
        i, j = m.span()
        work[i:j] = " " * (j - i)
        found.append(PageTime(start, end, kind, (i, j)))

    for m in _RANGE.finditer(text):
        a, b = _date(m["a"] or m["a1"]), m["b"] or m["b1"]
        if re.fullmatch(_NOW, b, re.I):
            end = None
        elif re.fullmatch(r"\d{2}", b):  # "1916–20"
            end = a[:2] + b if a and int(a[:2] + b) > int(a[:4]) else None
            if end is None:
                continue
        else:
            end = _date(b)
        if a is None or (end is not None and end[:4] < a[:4]):
            continue
        claim(m, a, end, "range")
    rest = "".join(work)
    for m in _OPEN.finditer(rest):
        a = _date(m["a"])
        kind = "since" if m["kw"].lower() == "since" else "until"
        claim(m, a if kind == "since" else None, a if kind == "until" else None, kind)
    rest = "".join(work)
    for m in _POINT.finditer(rest):
        a = _date(m.group())
        if a is not None:
            claim(m, a, a, "point")
    return sorted(found, key=lambda t: t.span)


def _gap(t: PageTime, lo: int, hi: int) -> int:
    return lo - t.span[1] if t.span[1] <= lo else t.span[0] - hi if t.span[0] >= hi else 0


def _from_unit(times: list[PageTime], text: str, lo: int, hi: int, unit: tuple[int, int],
               row: tuple[int, int] | None) -> tuple[str | None, str | None, str] | None:
    """(start, end, rule) from the times inside `unit` (a sentence) for the span [lo, hi), or None."""
    inside = [t for t in times if unit[0] <= t.span[0] and t.span[1] <= unit[1] and not _lifespan(t, text, hi)]
    in_row = [t for t in inside if row and row[0] <= t.span[0] and t.span[1] <= row[1]]
    inside = in_row or inside  # a list row that carries a date speaks for its own entry
    ranges = [t for t in inside if t.kind == "range"]
    # "... until 1990 , when Anna Berg took over": an `until` before the span starts the span's fact
    starts = [t for t in inside if t.kind in ("point", "since") or (t.kind == "until" and t.span[1] <= lo)]
    nearest = lambda pool: min(pool, key=lambda t: (_apart(t, text, lo, hi), _gap(t, lo, hi), t.span[0] > lo))  # noqa: E731
    if ranges and (not starts or _gap(nearest(ranges), lo, hi) <= _gap(nearest(starts), lo, hi)):
        best = nearest(ranges)
        return best.start, best.end, "range"
    if not starts:
        after = [t for t in inside if t.kind == "until" and t.span[0] >= hi]
        return (None, after[0].end, "point") if after else None
    before = [t for t in starts if t.span[1] <= lo]
    after = [t for t in starts if t.span[0] >= hi]
    first = before[-1] if before else next(iter(after), starts[0])
    if before and after and _apart(first, text, lo, hi) and not _apart(after[0], text, lo, hi):
        first = after[0]  # "an instructor in 1882": the date in the span's own clause
    begin = first.end if first.kind == "until" else first.start
    for t in inside:
        if t.span[0] < max(first.span[1], hi):
            continue
        cue = _END_CUE.search(text[max(first.span[1], hi, t.span[0] - 60):t.span[0]])
        if t.kind == "until" or (t.kind == "point" and t.start >= begin and cue):
            return begin, t.end, "point"
    return begin, None, "point"


_CLAUSE = re.compile(r" (?:,|;|and|but|then|while|when|before|after|until|as) ", re.I)


def _apart(t: PageTime, text: str, lo: int, hi: int) -> bool:
    """A clause boundary (" , ", " and ", ...) lies between time `t` and the span [lo, hi)."""
    a, b = (t.span[1], lo) if t.span[1] <= lo else (hi, t.span[0])
    return a < b and _CLAUSE.search(text, a - 1, b + 1) is not None


def _lifespan(t: PageTime, text: str, hi: int) -> bool:
    """`t` is the tail's life data in parentheses right after the span ending at `hi`: a long range,
    or a date after born / died."""
    if t.span[0] < hi:
        return False
    gap = text[hi:t.span[0]]
    if _LIFE_CUE.fullmatch(gap):
        return True
    return (t.kind == "range" and t.start is not None and t.end is not None
            and int(t.end[:4]) - int(t.start[:4]) >= LIFESPAN_YEARS and _OPEN_PAREN.fullmatch(gap) is not None)


def _preceding(times: list[PageTime], lo: int) -> tuple[str | None, str | None, str] | None:
    """Rule 4: the latest date of the page's last time expression before the span, as an open start."""
    before = [t for t in times if t.span[1] <= lo]
    return (before[-1].end or before[-1].start, None, "preceding") if before else None


def _row(text: str, unit: tuple[int, int], lo: int, hi: int, times: list[PageTime]) -> tuple[int, int] | None:
    """The list row of a span: its sentence cut at bullets that are not inside a time expression."""
    masked = list(text[unit[0]:unit[1]])
    for t in times:
        a, b = max(t.span[0], unit[0]) - unit[0], min(t.span[1], unit[1]) - unit[0]
        if a < b:
            masked[a:b] = "x" * (b - a)
    cuts = [m.start() + unit[0] for m in _BULLET.finditer("".join(masked))]
    if not cuts:
        return None
    left = max([c for c in cuts if c < lo], default=unit[0])
    right = min([c for c in cuts if c >= hi], default=unit[1])
    return left, right


def sentence_bounds(ends: tuple[int, ...], length: int, lo: int, hi: int) -> tuple[int, int]:
    """[start, end) of the sentence(s) holding [lo, hi), from sentence end offsets."""
    return max([e for e in ends if e <= lo], default=0), min([e for e in ends if e >= hi], default=length)


def infer_window(text: str, lo: int, hi: int, ends: tuple[int, ...],
                 times: list[PageTime] | None = None) -> InferredWindow | None:
    """The window of the fact whose answer is `text[lo:hi]` (rules in the module docstring), or None."""
    times = find_page_times(text) if times is None else times
    unit = sentence_bounds(ends, len(text), lo, hi)
    got = _from_unit(times, text, lo, hi, unit, _row(text, unit, lo, hi, times))
    if got is not None:
        return InferredWindow(*got)
    if unit[0] > 0:  # previous sentence: the span sits at its end
        prev = sentence_bounds(ends, len(text), unit[0] - 1, unit[0] - 1)
        got = _from_unit(times, text, unit[0], unit[0], prev, None)
    if got is None and unit[1] < len(text):  # next sentence: the span sits at its start
        nxt = sentence_bounds(ends, len(text), unit[1] + 1, unit[1] + 1)
        got = _from_unit(times, text, unit[1], unit[1], nxt, None)
    if got is not None:
        return InferredWindow(got[0], got[1], "neighbour-" + got[2])
    got = _preceding(times, lo)
    return None if got is None else InferredWindow(*got)


def close_open_ends(windows: list[tuple[str | None, str | None]]) -> list[tuple[str | None, str | None, bool]]:
    """(start, end, closed_here) per window of one (page, relation): an open end becomes the next
    later start among the others (successive holders of one role); other windows are kept."""
    starts = sorted({w[0] for w in windows if w[0] is not None}, key=lambda s: s)
    out = []
    for start, end in windows:
        if start is not None and end is None:
            later = [s for s in starts if s[:4] > start[:4]]
            if later:
                out.append((start, later[0], True))
                continue
        out.append((start, end, False))
    return out
