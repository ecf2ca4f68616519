"""Parse the time constraint of a question from its text: one typed `TimeConstraint` per question.

Why rules and not a model: the generator's checks, training, every evaluation row and the server must
all read a question's time the same way, deterministically and without loading anything.

Kinds (`TIME_KINDS`; docs/DESIGN_QA.md) and the forms that give them (case-insensitive, extra spaces
and common typos such as "befor", "betwen", "Decmber" tolerated). X is `YYYY`, `Mon YYYY`,
`Month D, YYYY`, `Dec. 3rd, 1999`, `D Month YYYY`, `YYYY-MM-DD`, `the 1990s`, `the '90s`,
`early/mid/late 1990s` or a season `1999/2000`:
  at          in/on/during/around/as of X; bare `Mon YYYY`, a decade or a season -> (X, X)
  between     from X to Y, between X and Y, X to Y, X-Y -> (X, Y); from/since X to present -> (X, None)
  before      before/prior to X -> (None, period before X); until/till X -> (None, X)
  after       after X -> (period after X, None); since X -> (X, None)
  just_before just/right/immediately/shortly before X, just prior to X, "the last ... before X";
              with no date: "who preceded X as CEO of Y" (anchor "X as CEO of Y", no dates)
  right_after just/right/immediately/shortly after X, "the first ... after X";
              with no date: "who succeeded X as CEO of Y" (anchor, no dates)
  current     now, currently, at present, as of now, today ... -> (reference_date, reference_date)
  first/last  the first/earliest/original ..., the last/latest/most recent ... (no dates)
  relative    "when X was CEO of Y, ...", "in the year Y was founded, ...", "at the time of the Z"
              (anchor = the clause, no dates until a first hop supplies the anchor fact's window)
When a question holds several dated expressions, the one that constrains the answer is picked:
expressions right after a describing verb ("born in 1136", "founded in 1991") lose to any other;
closed windows beat open ones; among equals the last one wins (questions put the constraint at the
end). Any dated expression beats a relative clause ("when X joined Y in 1995" reads as 1995).
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from kblampp.timewin import window_days

TIME_KINDS = ("none", "at", "between", "before", "after", "just_before", "right_after",
              "first", "last", "current", "relative")

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_ORD = r"(?:st|nd|rd|th)?"
_Y34 = r"\d{3,4}"
_NOT_UNIT = (r"(?!\s*(?:am|pm|a\.m|p\.m|%|percent|million|billion|thousand|people|points?|goals?|games?"
             r"|times|km|miles?|meters?|metres?|feet|ft|kg|years?|months?|weeks?|days?|hours?|minutes?"
             r"|seconds?)\b)(?![\d/])")
# A date with an explicit month, decade or season (never a bare number), then one that may be a bare year.
_DATED = (rf"(?:\d{{4}}-\d{{2}}-\d{{2}}|{_MONTH}\s*\d{{1,2}}{_ORD},?\s+{_Y34}"
          rf"|\d{{1,2}}{_ORD}\s+(?:of\s+)?{_MONTH},?\s+{_Y34}|{_MONTH},?\s+{_Y34}"
          rf"|\d{{4}}\s*/\s*(?:\d{{4}}|\d{{2}})(?:\s+season)?"
          rf"|(?:the\s+)?(?:(?:early|mid|middle|late)[\s-]+)?\d{{2,3}}0'?s"
          rf"|the\s+(?:(?:early|mid|middle|late)[\s-]+)?'?\d0'?s|'\d0'?s)")
_LEAD = r"(?:the\s+(?:year|season)\s+)?"
_X = rf"(?:{_DATED}|(?:the\s+year\s+)?{_Y34})"
_X_SHORT = rf"(?:{_DATED}|\d{{1,4}})"  # after from/between, years like 8 or 190 are real (Han dynasty)
_NOW = r"(?:the\s+)?(?:present(?:\s+day)?|now|today|date)"
_B = r"(?<![\w/-])"
_E = rf"(?![\w/]){_NOT_UNIT}"
_CLOSE = r"(?P<mod>(?:just|right|immediately|shortly|directly|soon)\s+)?"

_RANGE_KW = re.compile(
    rf"{_B}(?:from|since|between)\s+(?:the\s+(?:years?|period)\s+)?(?P<a>{_X_SHORT})\s*"
    rf"(?:to|until|till|through|thru|and|-|–|—)\s*(?P<b>{_NOW}|{_X_SHORT}){_E}", re.I)
_RANGE_BARE = re.compile(
    rf"{_B}(?P<a>{_X})\s*(?:to|until|till|through|-|–|—)\s*(?P<b>{_NOW}|{_X}){_E}", re.I)
_OPEN = re.compile(rf"{_B}{_CLOSE}(?P<kw>before|prior\s+to|after|since|until|till)\s+{_LEAD}(?P<a>{_X}){_E}", re.I)
_POINT_KW = re.compile(
    rf"{_B}(?:in|on|during|around|circa|throughout|as\s+of)\s+{_LEAD}(?P<a>{_X}){_E}", re.I)
_POINT_BARE = re.compile(rf"{_B}(?P<a>{_DATED}){_E}", re.I)

_DESCRIBING = re.compile(
    r"\b(?:born|died|founded|established|built|chartered|created|formed|opened|launched|relocated|began|started"
    r"|appointed|constructed|completed|incorporated|introduced|released|published|named)\b(?:\s+\S+){0,4}\s*$", re.I)
_LAST_BEFORE = re.compile(r"\b(?:last|latest|most\s+recent)\b[^;?]*$", re.I)
_FIRST_AFTER = re.compile(r"\b(?:first|earliest|next)\b[^;?]*$", re.I)

_AUX = r"(?!(?:was|were|is|are|did|does|do|has|have|had|will|would|can|could|should)\b)"
# A clause runs to the main question (", who ...") or to the end; names may hold commas ("Miller, Oconnell and Mitchell").
_CLAUSE_END = (r"(?=\s*,\s*(?:who|whom|whose|what|where|which|when|how|in\s+which|at\s+which|for\s+which)\b"
               r"|\s*[?;]|\s*$)")
_CLAUSE = rf"(?P<anchor>[^?;]*?[^,?;\s]){_CLAUSE_END}"
_RELATIVE = (
    re.compile(rf"\b(?:when|while|whilst|(?:during|at|by)\s+the\s+time)\s+(?!of\b)(?:that\s+)?{_AUX}{_CLAUSE}", re.I),
    re.compile(rf"\bat\s+the\s+time\s+of\s+{_CLAUSE}", re.I),
    re.compile(rf"\bduring\s+(?P<anchor>[^?;]*?\b(?:tenure|term|time|presidency|membership)\b(?:[^?;]*?[^,?;\s])?)"
               rf"{_CLAUSE_END}", re.I),
    re.compile(rf"\bin\s+the\s+(?:same\s+)?year\s+(?:that\s+|when\s+|in\s+which\s+)?(?!\d)(?!of\b){_CLAUSE}", re.I),
)
_SUCCESSION = (
    ("just_before", re.compile(
        rf"\b(?:preceded|came\s+before|was\s+(?:the\s+)?predecessor\s+(?:of|to)|was\s+replaced\s+by"
        rf"|(?:just|right|immediately|directly)\s+(?:before|prior\s+to))\s+(?!\d){_CLAUSE}", re.I)),
    ("right_after", re.compile(
        rf"\b(?:succeeded|followed|came\s+after|replaced|took\s+over\s+from|was\s+(?:the\s+)?successor\s+(?:of|to)"
        rf"|(?:just|right|immediately|directly)\s+after)\s+(?!\d){_CLAUSE}", re.I)),
)
_SUCCESSOR_NOUN = re.compile(r"(?:\bwho\s+(?:was|is|became)\s+)?(?P<name>[^,?;]+?)['’]s?\s+(?P<noun>successor|predecessor)"
                             r"(?P<rest>\s+as\s+[^?;]*[^,?;\s])?(?=\s*[?;]|\s*$)", re.I)
_CURRENT = re.compile(r"\b(?:now|currently|current|presently|at\s+present|today|these\s+days|nowadays"
                      r"|at\s+the\s+moment|as\s+of\s+(?:now|today))\b", re.I)
_FIRST = re.compile(r"\b(?:first|earliest|original|inaugural|founding)\b(?!\s+name)", re.I)
_LAST = re.compile(r"\b(?:last|latest|most\s+recent(?:ly)?|final)\b(?!\s+name)", re.I)

# Words whose misspellings are repaired before parsing (same first letter, edit distance 1; 2 for
# words of 7+ letters); real words that sit that close to one of them are left alone.
_KEYWORDS = ("january", "february", "march", "april", "august", "september", "october", "november",
             "december", "before", "after", "between", "during", "since", "until", "through", "prior",
             "around", "immediately", "shortly", "present", "currently", "current", "succeeded", "preceded",
             "season", "early", "middle", "right")
_MONTH_NAMES = _KEYWORDS[:9]
_NOT_TYPOS = frozenset({"earl", "alter", "match", "marsh", "marches", "matches", "aster", "attar", "befall", "untie",
                        "currant", "currants", "prion", "prism", "sincere", "seasons", "afters",
                        "dearly", "yearly", "riddle", "octet", "decent", "decimal", "decembers", "aground",
                        "among", "durian", "curing", "rights", "rigid"})


@dataclass(frozen=True)
class TimeConstraint:
    """The typed time constraint of a question (docs/DESIGN_QA.md)."""

    kind: str                  # one of TIME_KINDS except "none"
    start: str | None          # ISO partial dates, inclusive; None = open
    end: str | None
    anchor: str | None = None  # relative / succession: the anchoring clause's text

    def window(self) -> tuple[str | None, str | None] | None:
        """The bare (start, end) window of old callers; None when the constraint carries no dates."""
        return None if self.start is None and self.end is None else (self.start, self.end)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "start": self.start, "end": self.end, "anchor": self.anchor}


@dataclass(frozen=True)
class TimeExpr:
    """One dated time expression found in a text: its window, its form and where it is."""

    start: str | None
    end: str | None
    kind: str  # form: range | point | open
    span: tuple[int, int]
    text: str
    describing: bool  # right after a verb like "born"/"founded": describes an entity, not the answer
    order: str = "at"  # the constraint kind it gives: at | between | before | after | just_before | right_after


def _distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment edit distance (a transposition counts 1), stopping above `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


def _repair(match: re.Match) -> str:
    word = match[0]
    low = word.lower()
    if len(low) < 4 or low in _NOT_TYPOS or low in _KEYWORDS:
        return word
    # a capitalised word inside the text is a name ("Earl", "Marc") unless a number follows (a month)
    name_like = word[0].isupper() and match.start() > 0
    dated = bool(re.match(r"\s*\.?\s*\d", match.string[match.end():]))
    for key in _KEYWORDS:
        limit = 2 if len(key) >= 7 and len(low) >= 6 else 1
        if key[0] == low[0] and (not name_like or (dated and key in _MONTH_NAMES)) \
                and _distance(low, key, limit) <= limit:
            return key
    return word


def normalize_question(text: str) -> str:
    """The text with misspelled time words repaired ("befor" -> "before", "Decmber 3" -> "december 3").

    Correctly spelled text comes back unchanged, so expression spans index either."""
    return re.sub(r"[A-Za-z]+", _repair, text)


def _year(text: str) -> str:
    return f"{int(text):04d}"


def _month(text: str) -> int:
    return _MONTHS.index(text.strip(". ").lower()[:3]) + 1


def _date(text: str) -> tuple[str, str] | None:
    """Inclusive (first, last) ISO partial dates of one date phrase; None if it is not a valid date."""
    t = re.sub(r"\s+", " ", text.strip().lower().replace("’", "'"))
    t = re.sub(r"^the (?:year |season )?", "", t)
    try:
        if m := re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", t):
            d = dt.date(int(m[1]), int(m[2]), int(m[3]))
            return (d.isoformat(),) * 2
        if m := re.fullmatch(rf"({_MONTH}) ?(\d{{1,2}}){_ORD},? (\d{{3,4}})", t):
            d = dt.date(int(m[3]), _month(m[1]), int(m[2]))
            return (d.isoformat(),) * 2
        if m := re.fullmatch(rf"(\d{{1,2}}){_ORD} (?:of )?({_MONTH}),? (\d{{3,4}})", t):
            d = dt.date(int(m[3]), _month(m[2]), int(m[1]))
            return (d.isoformat(),) * 2
        if m := re.fullmatch(rf"({_MONTH}),? (\d{{3,4}})", t):
            iso = f"{_year(m[2])}-{_month(m[1]):02d}"
            return (iso, iso) if int(m[2]) > 0 else None
        if m := re.fullmatch(r"(\d{4}) ?/ ?(\d{4}|\d{2})(?: season)?", t):
            first = int(m[1])
            second = int(m[2]) if len(m[2]) == 4 else first // 100 * 100 + int(m[2])
            if len(m[2]) == 2 and second < first:
                second += 100  # 1999/00
            return (_year(m[1]), _year(str(second))) if first <= second <= first + 1 else None
        if m := re.fullmatch(r"(?:(early|mid|middle|late)[ -]+)?(?:the )?('?\d0|\d{2,3}0)'?s", t):
            digits = m[2].lstrip("'")
            first = 1900 + int(digits) if len(digits) == 2 else int(digits)  # "the 90s" is the 1990s
            # "the 1800s" is a century, "the 1990s" a decade, and "the 2000s" the decade 2000-2009
            length = 100 if first % 100 == 0 and first != 2000 and len(digits) > 2 else 10
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


def _open_order(kw: str, close: bool, before_text: str) -> str:
    """The constraint kind of an open expression ("before X" ... "the last one before X")."""
    if kw.startswith("prior") or kw == "before":
        return "just_before" if close or _LAST_BEFORE.search(before_text) else "before"
    if kw == "after":
        return "right_after" if close or _FIRST_AFTER.search(before_text) else "after"
    return "after" if kw == "since" else "before"


def find_time_expressions(text: str) -> list[TimeExpr]:
    """Every dated time expression of `text`, in reading order (ranges claim their words first).

    Spans index `normalize_question(text)` (the text itself when nothing was misspelled)."""
    text = normalize_question(text)
    work = text
    found: list[TimeExpr] = []

    def claim(match: re.Match, start: str | None, end: str | None, kind: str, order: str) -> None:
        nonlocal work
        i, j = match.span()
        work = work[:i] + " " * (j - i) + work[j:]
        if _valid(start, end):
            describing = bool(_DESCRIBING.search(text[:i]))
            found.append(TimeExpr(start, end, kind, (i, j), text[i:j], describing, order))

    for pattern in (_RANGE_KW, _RANGE_BARE):
        for m in list(pattern.finditer(work)):
            a = _date(m["a"])
            b = None if re.fullmatch(_NOW, m["b"], re.I) else _date(m["b"])
            if a is None or (b is None and not re.fullmatch(_NOW, m["b"], re.I)):
                continue
            claim(m, a[0], None if b is None else b[1], "range", "between")
    for m in list(_OPEN.finditer(work)):
        a = _date(m["a"])
        if a is None:
            continue
        kw = re.sub(r"\s+", " ", m["kw"].lower())
        order = _open_order(kw, m["mod"] is not None, text[:m.start()])
        if order in ("before", "just_before") and kw not in ("until", "till"):
            claim(m, None, _shift(a[0], -1), "open", order)
        elif order in ("after", "right_after") and kw != "since":
            claim(m, _shift(a[1], +1), None, "open", order)
        elif kw == "since":
            claim(m, a[0], None, "open", order)
        else:
            claim(m, None, a[1], "open", order)
    for pattern in (_POINT_KW, _POINT_BARE):
        for m in list(pattern.finditer(work)):
            a = _date(m["a"])
            if a is not None:
                claim(m, a[0], a[1], "point", "at")
    return sorted(found, key=lambda e: e.span)


def pick_time_expression(found: list[TimeExpr]) -> TimeExpr | None:
    """The expression that constrains the answer (rules in the module docstring)."""
    if not found:
        return None
    return max(enumerate(found), key=lambda ie: (not ie[1].describing, ie[1].kind != "open", ie[0]))[1]


def _clause(text: str, patterns) -> str | None:
    for pattern in patterns:
        if m := pattern.search(text):
            return re.sub(r"\s+", " ", m["anchor"]).strip()
    return None


def parse_time_constraint(text: str, reference_date: str | None = None) -> TimeConstraint | None:
    """The question's typed time constraint, or None when it states none.

    `reference_date` (ISO) resolves "now"/"current"; without one a `current` constraint has no dates."""
    if not isinstance(text, str):
        raise TypeError(f"question text must be a string, got {type(text).__name__}")
    if reference_date is not None:
        window_days(reference_date, reference_date)  # rejects a bad reference date early
    norm = normalize_question(text)
    best = pick_time_expression(find_time_expressions(norm))
    if best is not None:
        return TimeConstraint(best.order, best.start, best.end)
    relative = _clause(norm, _RELATIVE)
    if relative is not None:
        return TimeConstraint("relative", None, None, relative)
    for kind, pattern in _SUCCESSION:
        if m := pattern.search(norm):
            return TimeConstraint(kind, None, None, re.sub(r"\s+", " ", m["anchor"]).strip())
    if m := _SUCCESSOR_NOUN.search(norm):
        kind = "just_before" if m["noun"].lower() == "predecessor" else "right_after"
        return TimeConstraint(kind, None, None, (m["name"] + (m["rest"] or "")).strip())
    if _CURRENT.search(norm):
        return TimeConstraint("current", reference_date, reference_date)
    if _FIRST.search(norm):
        return TimeConstraint("first", None, None)
    if _LAST.search(norm):
        return TimeConstraint("last", None, None)
    return None


def without_relative_clause(text: str) -> str:
    """The question with its relative-time clause cut out ("When X was CEO of Y, who was the CEO of
    Z?" -> "who was the CEO of Z?"): what the answer fact itself is about, for the query of a relative
    question's second retrieval (the clause only dates it). Text without such a clause comes back as is."""
    norm = normalize_question(text)
    for pattern in _RELATIVE:
        if m := pattern.search(norm):
            rest = norm[:m.start()] + norm[m.end():]
            rest = re.sub(r"\s+([,?;.])", r"\1", re.sub(r"\s+", " ", rest)).strip()
            rest = re.sub(r"^[,;]\s*|,\s*(?=[?;.]|$)", "", rest)
            return rest[:1].upper() + rest[1:] if rest else text
    return text


def parse_question_time(text: str, reference_date: str | None = None) -> tuple[str | None, str | None] | None:
    """(start, end) ISO partial dates of the question's time constraint, None ends open; None if none."""
    constraint = parse_time_constraint(text, reference_date)
    return None if constraint is None else constraint.window()


def question_time_dict(text: str, reference_date: str | None = None) -> dict | None:
    """`parse_question_time` in the QA record's `question_time` shape ({start, end} or None)."""
    window = parse_question_time(text, reference_date)
    return None if window is None else {"start": window[0], "end": window[1]}
