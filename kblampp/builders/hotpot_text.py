"""One HotpotQA sentence -> the (relation, tail) pairs it states. Nothing here sees a question or answer.

Why a module of its own: the builder's honesty rests on this code reading only the sentence, the
paragraph title and the other paragraph titles (an answer-blind KB, as a user would build from text).

Rules, in order (the first accepted span wins where spans overlap):
  head mention - a sentence-initial run of capitalised words sharing a word with the title
                 ("Kasper Peter Schmeichel"); else the title without its disambiguation suffix ("Kiss and
                 Tell (1945 film)" -> "Kiss and Tell", HTML entities un-escaped, also without a trailing
                 abbreviation: "Leicester City F.C." -> "Leicester City") as whole words; else a
                 leading pronoun or "The <noun>" ("It", "The film"); else none (relations read from 0).
                 A sentence-initial run sharing a word with the title wins over a later exact mention
                 ("Count Lev Nikolayevich Tolstoy ..., usually referred to as Leo Tolstoy");
  tails        - (native) "(Russian: Фёдор ...;" -> relation "Russian name"; (title) another paragraph's
                 title, case-sensitive whole words (a common-noun title such as "Glam metal" also with
                 a lower-case first letter), linked to its page; (date) "March 3, 1931",
                 "3 March 1931", "March 1931", "1931", decades "1980s" (a 1980-1989 window); (number)
                 "2,100", "$1.5 million"; (name) a run of capitalised words (connectors such as "of",
                 "de", "&" inside); never inside the head mention, never words of the head's own name;
  relation     - the predicate phrase nearest the tail: from the last predicate word (a verb from a
                 short list, or a lowercase word ending in -ed) before the tail to the tail, determiners
                 dropped, at most MAX_RELATION_WORDS words; when an earlier tail stands between them,
                 the predicate plus the prepositions just before this tail ("published ... by");
                 a tail after no predicate word and no preposition continues the previous tail's relation
                 (lists and appositions: "Duluth, Minnesota", "by the Bengali poet Rabindranath Tagore");
                 "(DATE – DATE)" right after the head is "born" / "died" (full dates) or "from" / "until"
                 (years: "(1844–1846)"); with no predicate word before
                 the tail, the gap's own words, else the first predicate after the tail plus the
                 preposition before it ("In 1990, she retired" -> "retired in"); tails before the
                 head mention get " (inverse)"; "mentions" when nothing is left.
Words are Unicode words: letters, digits and combining marks (Bengali vowel signs, Russian stress
accents) stay inside one word.
"""
from __future__ import annotations

import calendar
import html
import re
import unicodedata
from dataclasses import dataclass

MAX_RELATION_WORDS = 5


def _mark_class() -> str:
    """A regex character class body of every combining mark in the Basic Multilingual Plane."""
    ranges: list[list[int]] = []
    for code in range(0x300, 0x10000):
        if unicodedata.category(chr(code))[0] == "M":
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return "".join(f"\\u{a:04x}-\\u{b:04x}" if a != b else f"\\u{a:04x}" for a, b in ranges)


_W = rf"[^\W_]|[{_mark_class()}]"  # a word character: letter, digit or combining mark
_WORD = re.compile(rf"(?:{_W})+(?:['’](?:{_W})+)*")
_MONTHS = {name: i for i, name in enumerate(calendar.month_name) if name}
_MONTH = "(?:" + "|".join(_MONTHS) + ")"
_DATES = [  # (pattern, kind); tried in this order, longest forms first
    (re.compile(rf"(?<!\w)({_MONTH})\s+(\d{{1,2}}),\s+(\d{{3,4}})(?!\d)"), "mdy"),
    (re.compile(rf"(?<![\w,])(\d{{1,2}})\s+({_MONTH})\s+(\d{{3,4}})(?!\d)"), "dmy"),
    (re.compile(rf"(?<!\w)({_MONTH})\s+(\d{{3,4}})(?!\d|,\d)"), "my"),
    (re.compile(r"(?<![\w$.,])(1\d{2}0|20\d0)s(?!\w)"), "decade"),
    (re.compile(r"(?<![\w$.,])(1\d{3}|20\d{2})(?![\w]|[.,]\d)"), "year"),
]
_NUMBER = re.compile(r"(?<![\w.,])\$?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?:\s+(?:million|billion|thousand))?(?![\w-])"
                     r"|(?<![\w.,-])\$?\d+(?:\.\d+)?(?:\s+(?:million|billion|thousand))?(?![\w-]|[.,]\d)")
_NATIVE = re.compile(rf"\((?:in\s+)?([A-Z][a-z]+(?:\s+[A-Z][a-z]+)?):\s*([^;,()\[\]]*?(?:{_W})[^;,()\[\]]*?)\s*(?=[;,)])")
_LEAD = re.compile(r"^(?:(?:He|She|It|They|His|Her|Its|Their)\b|(?:The|This|These)\s+[a-z]+\b)")
_SUFFIX = re.compile(r"\s*\([^()]*\)\s*$")
_CONNECTORS = {"of", "the", "de", "del", "der", "la", "le", "von", "van", "da", "di", "du", "y", "&", "St"}
_SKIP_NAMES = {"The", "A", "An", "It", "He", "She", "They", "His", "Her", "Its", "Their", "This", "These", "Those",
               "In", "On", "At", "As", "By", "For", "From", "After", "Before", "During", "Since", "With", "When",
               "While", "Although", "However", "Following", "There", "Some", "Many", "Both"}
_DETERMINERS = {"a", "an", "the", "its", "his", "her", "their", "this", "that", "these", "those", "also", "and",
                "or", "but", "which", "who", "whom", "whose", "where", "then", "first", "later", "both"}
_PREPOSITIONS = {"by", "in", "on", "at", "of", "for", "from", "to", "with", "as", "into", "near", "under", "over",
                 "between", "during", "after", "before", "through", "against", "alongside", "about", "since",
                 "until", "within", "across", "behind", "beside", "outside", "inside", "via", "than"}
_VERBS = set("""is was are were be been being has had have became become becomes born died dies won wins wrote
writes written made makes known began begins begun led leads took takes taken gave gives given held holds
includes include included contains stars plays lies flows runs serves hosts houses features borders lost sold
met chose chosen built set left grew grown drew drawn sang sung ran fought taught brought bought spoken shown
worn beaten starring featuring including containing serving playing using following located represents
represented became marries married attended attends directs produces owns operates""".split())
_NOT_VERBS = {"hundred", "kindred", "sacred", "naked", "wicked", "rugged", "beloved", "aged", "red", "bed",
              "need", "seed", "speed", "breed", "creed", "greed", "steed", "weed", "feed", "deed", "bled"}


def unescape_title(title: str) -> str:
    """A HotpotQA title as a name: HTML entities un-escaped, outer spaces dropped."""
    return html.unescape(title).strip()


def title_base(title: str) -> str:
    """The title without its disambiguation suffix: "Winner (band)" -> "Winner"."""
    name = unescape_title(title)
    return _SUFFIX.sub("", name).strip() or name


@dataclass(frozen=True)
class Span:
    """A candidate tail: sentence offsets [start, end), its text, kind, linked title and parsed date."""

    start: int
    end: int
    text: str
    kind: str  # native | title | date | number | name
    title: str | None = None  # linked paragraph title (kind "title")
    date: tuple[str, str] | None = None  # ISO (start, end) of a date or decade
    label: str | None = None  # the language of a native name


@dataclass(frozen=True)
class Statement:
    """One fact a sentence states: relation, tail span."""

    relation: str
    tail: Span


def _lowercase_mentions(text: str, base: str) -> list[tuple[int, int]]:
    """A common-noun title ("Glam metal") also matches with a lower-case first letter ("glam metal");
    one-word and proper-name titles ("Winner") do not (they would match ordinary words)."""
    ws = base.split()
    if len(ws) < 2 or not all(w.islower() for w in ws[1:]) or not ws[0][:1].isupper():
        return []
    return find_whole(text, base[0].lower() + base[1:])


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or unicodedata.category(ch)[0] == "M"


def find_whole(text: str, needle: str, case: bool = True, start: int = 0) -> list[tuple[int, int]]:
    """[start, end) of each whole-word occurrence of `needle` in `text` (Unicode word boundaries)."""
    needle = needle.strip()
    if not needle:
        return []
    out = []
    for m in re.finditer(re.escape(needle), text[start:], 0 if case else re.I):
        lo, hi = m.start() + start, m.end() + start
        if (lo == 0 or not _is_word_char(text[lo - 1])) and (hi == len(text) or not _is_word_char(text[hi])):
            out.append((lo, hi))
    return out


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def _name_words(text: str) -> set[str]:
    return {w.casefold() for w in words(text) if len(w) > 1}


def _date_iso(kind: str, groups: tuple[str, ...]) -> tuple[str, str] | None:
    """ISO (start, end) of a matched date; None for an impossible one (February 30)."""
    if kind in ("year", "decade"):
        year = int(groups[0])
        return (f"{year:04d}", f"{year + 9:04d}") if kind == "decade" else (f"{year:04d}", f"{year:04d}")
    if kind == "my":
        iso = f"{int(groups[1]):04d}-{_MONTHS[groups[0]]:02d}"
        return iso, iso
    month, day, year = (groups[0], groups[1], groups[2]) if kind == "mdy" else (groups[1], groups[0], groups[2])
    m, d, y = _MONTHS[month], int(day), int(year)
    if not 1 <= d <= calendar.monthrange(y, m)[1]:
        return None
    iso = f"{y:04d}-{m:02d}-{d:02d}"
    return iso, iso


def head_mention(sentence: str, title: str) -> tuple[int, int] | None:
    """[start, end) of the paragraph's own entity in the sentence (rules in the module doc)."""
    base = title_base(title)
    runs = _capitalised_runs(sentence)
    names = [n for n in dict.fromkeys((base, *title_aliases(base), base.split(",")[0]))]  # "Racine, Wisconsin" -> "Racine"
    lead = runs[0] if runs and re.fullmatch(r"(?:The\s+)?", sentence[:runs[0][0]]) else None
    if lead and _name_words(sentence[lead[0]:lead[1]]) & _name_words(base):
        return lead  # "Kasper Peter Schmeichel", "Count Lev Nikolayevich Tolstoy", "The Scotch Collie"
    for name in names:
        found = find_whole(sentence, name, case=False)
        if found:  # the whole capitalised run: "Shirley Temple Black", "Flying Buffalo Inc."
            lo, hi = found[0]
            for a, b in runs:
                if a < hi and lo < b:
                    lo, hi = min(lo, a), max(hi, b)
            return lo, hi
    match = _LEAD.match(sentence)
    return (0, match.end()) if match else None


def title_aliases(base: str) -> list[str]:
    """Shorter names a page goes by: "Leicester City F.C." -> "Leicester City" (a trailing abbreviation)."""
    short = re.sub(r"\s+(?:[A-Z][a-z]?\.)+$", "", base)
    return [short] if short != base and short else []


def _tokens(sentence: str) -> list[tuple[int, int, str]]:
    """Words, "&" and abbreviations with their period ("St.", "Jr.") as (start, end, text)."""
    out = []
    for m in re.finditer(rf"(?:{_WORD.pattern})(?:[-.](?:{_WORD.pattern}))*\.?|&", sentence):
        lo, hi, text = m.start(), m.end(), m.group(0)
        if text.endswith(".") and not (len(text) <= 4 and text[0].isupper() or "." in text[:-1]):
            hi, text = hi - 1, text[:-1]  # a sentence's full stop, not an abbreviation
        out.append((lo, hi, text))
    return out


def _capitalised_runs(sentence: str) -> list[tuple[int, int]]:
    """Maximal runs of capitalised tokens (connectors allowed inside), leading function words dropped."""
    runs: list[list[tuple[int, int, str]]] = []
    current: list[tuple[int, int, str]] = []
    for tok in _tokens(sentence):
        gap = sentence[current[-1][1]:tok[0]] if current else ""
        joined = not current or (gap.strip() == "" and len(gap) <= 1)
        if tok[2][0].isupper() and joined:
            current.append(tok)
        elif tok[2] in _CONNECTORS and current and joined:
            current.append(tok)
        else:
            if current:
                runs.append(current)
            current = [tok] if tok[2][0].isupper() else []
    if current:
        runs.append(current)
    out = []
    for run in runs:
        while run and (run[-1][2] in _CONNECTORS):
            run = run[:-1]
        while run and (run[0][2] in _SKIP_NAMES or run[0][2] in _CONNECTORS or run[0][2] in _MONTHS):
            run = run[1:]
        if run:
            out.append((run[0][0], run[-1][1]))
    return out


def candidate_tails(sentence: str, head: tuple[int, int] | None, own_name: str,
                    titles: dict[str, str]) -> list[Span]:
    """Every tail the sentence states, in sentence order (`titles`: base name -> full title)."""
    taken: list[tuple[int, int]] = [head] if head else []
    spans: list[Span] = []
    masked = re.sub(r"\[[^\]]*\]", lambda m: " " * len(m.group(0)), sentence)  # IPA and notes
    own = _name_words(own_name)

    def accept(span: Span) -> None:
        if any(span.start < hi and lo < span.end for lo, hi in taken):
            return
        taken.append((span.start, span.end))
        if span.kind in ("title", "name") and _name_words(span.text) <= own:
            return  # words of the head's own name ("Collie" in "Scotch Collie"): not a tail
        spans.append(span)

    for m in _NATIVE.finditer(masked):
        taken.append((m.start(1), m.end(1)))  # the language label is not a tail
        accept(Span(m.start(2), m.end(2), m.group(2).strip(), "native", label=m.group(1)))
    for base in sorted(titles, key=len, reverse=True):
        for lo, hi in find_whole(masked, base) + _lowercase_mentions(masked, base):
            accept(Span(lo, hi, sentence[lo:hi], "title", title=titles[base]))
    for pattern, kind in _DATES:
        for m in pattern.finditer(masked):
            iso = _date_iso(kind, m.groups())
            if iso:
                accept(Span(m.start(), m.end(), m.group(0), "date", date=iso))
    for m in _NUMBER.finditer(masked):
        accept(Span(m.start(), m.end(), m.group(0), "number"))
    for lo, hi in _capitalised_runs(masked):
        text = re.sub(r"['’]s$", "", sentence[lo:hi])  # "Hollywood's" names Hollywood
        accept(Span(lo, lo + len(text), text, "name"))
    return sorted(spans, key=lambda s: s.start)


def _is_predicate(word: str, previous: str | None) -> bool:
    """A verb from the list, a lowercase -ed word, or an -s word after "and" / "who" ("... and covers")."""
    if not word.isalpha() or not word.islower():
        return False
    if previous in ("and", "who", "which", "that") and len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return True
    return word in _VERBS or (len(word) >= 5 and word.endswith("ed") and word not in _NOT_VERBS)


def _clean(ws: list[str]) -> list[str]:
    while ws and ws[0] in _DETERMINERS:
        ws = ws[1:]
    return [w for w in ws if w not in ("a", "an", "the", "then", "also", "mid", "early", "late")]


def _tagged(text: str) -> list[tuple[str, bool]]:
    """(lower-case word, is a predicate) of the text's lowercase words (sentence-initial function words
    lowered); bracketed text and hyphen compounds ("17-year-old") are skipped."""
    out: list[tuple[str, bool]] = []
    for w in words(re.sub(r"\([^)]*\)?|\[[^\]]*\]?|\S+-\S+", " ", text)):
        low = w.lower()
        if w.islower() or low in _PREPOSITIONS or low in _DETERMINERS:
            out.append((low, _is_predicate(low, out[-1][0] if out else None)))
    return out


def _predicates(text: str) -> list[str]:
    return [w for w, pred in _tagged(text) if pred]


def _relation(sentence: str, anchor: int, tail: Span, previous: Span | None, prev_relation: str | None) -> str:
    """The relation of one tail after the head (rules in the module doc)."""
    gap_from = previous.end if previous is not None and previous.end > anchor else anchor
    gap = sentence[gap_from:tail.start]
    tagged = _tagged(gap)
    gap_words = [w for w, _ in tagged]
    if previous is not None and prev_relation and not any(pred or w in _PREPOSITIONS for w, pred in tagged) \
            and not re.search(r"[–—-]", gap):
        return prev_relation  # a list or apposition goes on: "Duluth, Minnesota", "by the Bengali poet Tagore"
    if previous is not None and previous.kind == "date" and tail.kind == "date" and prev_relation in ("born", "from") \
            and re.fullmatch(r"\s*[–—-]\s*", gap):
        return "died" if prev_relation == "born" else "until"
    if tail.kind == "date" and not _tagged(sentence[anchor:tail.start]) and "(" in sentence[anchor:tail.start]:
        return "born" if "-" in tail.date[0][5:] else "from"  # a life's dates are full dates; "(1844–1846)" is a span
    for i in range(len(tagged) - 1, -1, -1):
        if tagged[i][1]:
            phrase = _clean(gap_words[i:])
            return " ".join(phrase[:1] + phrase[1:][-(MAX_RELATION_WORDS - 1):])
    before = _predicates(sentence[anchor:gap_from])
    if before:
        preps: list[str] = []
        for w in reversed([w for w in gap_words if w not in ("a", "an", "the")]):
            if w not in _PREPOSITIONS:
                break
            preps.insert(0, w)
        return " ".join([before[-1]] + (preps or _clean(gap_words)[-(MAX_RELATION_WORDS - 1):]))
    own = _clean(gap_words)
    if own and not all(w in _PREPOSITIONS for w in own):
        return " ".join(own[-MAX_RELATION_WORDS:])
    after = _predicates(sentence[tail.end:])
    if after:
        return " ".join([after[0]] + own[-1:])
    return " ".join(own[-MAX_RELATION_WORDS:]) or "mentions"


def statements(sentence: str, title: str, titles: list[str]) -> list[Statement]:
    """The (relation, tail) pairs of one sentence of paragraph `title`; `titles` = the question's
    paragraph titles (raw, as in the file), used only to link mentions to their pages."""
    head = head_mention(sentence, title)
    own = unescape_title(title)
    links = {}
    for t in titles:
        base = title_base(t)
        if unescape_title(t) != own and base.casefold() != title_base(title).casefold() and base:
            for name in (base, *title_aliases(base)):
                links.setdefault(name, unescape_title(t))
    tails = candidate_tails(sentence, head, title_base(title), links)
    anchor = head[1] if head else 0
    out: list[Statement] = []
    previous: Span | None = None
    prev_relation: str | None = None
    for tail in tails:
        if tail.kind == "native":
            relation = f"{tail.label} name"
        elif tail.start < anchor:  # before the head mention ("The Root River flows through Racine")
            between = _clean([w for w, _ in _tagged(sentence[tail.end:head[0]])]) if head else []
            after = _predicates(sentence[head[1]:]) if head else []
            phrase = between[-MAX_RELATION_WORDS:] or after[:1]
            relation = (" ".join(phrase) + " (inverse)") if phrase else "mentions"
        else:
            relation = _relation(sentence, anchor, tail, previous, prev_relation)
            previous, prev_relation = tail, relation
        out.append(Statement(relation, tail))
    seen: set[tuple[str, str]] = set()
    unique = []
    for st in out:
        key = (st.relation, st.tail.text)
        if key not in seen:
            seen.add(key)
            unique.append(st)
    return unique

