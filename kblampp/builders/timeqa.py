"""TimeQA (JSON Lines, gzipped or not: `idx, question, context, targets, from, end, paragraphs`) to
temporal QA and a KB of 5-tuples built from the pages the way a real KB is built.

Rules: `idx` = `/wiki/<page>#<PID>#<k>`; one fact per (page, relation, tail): head = the page
(underscores to spaces), relation = PID with a readable label (TimeQA's relations.json `meaning`
when given, else the built-in table), tail = a non-empty target; evidence = the sentence of
`context` that holds the target's span `context[from:end]` (sentences split at " . ", " ? ", " ! "
except after abbreviations such as "Maj ." or "D ."). The fact's time window is inferred from the
page text around that span (`kblampp.builders.text_windows`, `source: "text_infer"`, the rule in
`context.time_rule`), or around another mention of the tail when neither the span's sentence nor
its neighbours date it, never from a question; no date near the span leaves it open (`source: "none"`).
Questions keep their own `question_time` (parsed from their text) and point at those facts.
Easy and hard files share idx: a file named `*.easy.*` / `*.hard.*` gives qids `<idx>#easy` /
`<idx>#hard` and `level`. `targets == [""]` marks an unanswerable question: counted and skipped,
or kept (DESIGN_QA.md: `answerable: false`, answer "no answer", no supporting facts).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

from kblampp.builders.common import BuildResult, iter_records, make_fact, position, require
from kblampp.builders.hotpot_text import find_whole
from kblampp.builders.text_windows import PageTime, close_open_ends, find_page_times, infer_window
from kblampp.builders.wikidata_labels import property_label
from kblampp.question_time import TimeConstraint, parse_time_constraint
from kblampp.synth.families import NO_ANSWER

_IDX = re.compile(r"^/wiki/([^#]+)#(P\d+)#(\d+)$")
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "maj", "col", "gen", "lt", "capt", "sgt", "rev", "st", "jr", "sr",
           "no", "co", "inc", "ltd", "mt", "ft", "gov", "sen", "rep", "hon", "adm", "cmdr", "brig", "cpl",
           "pvt", "vs", "vol", "fr", "bros", "corp", "dept", "univ", "est", "approx", "u.s", "d.c", "e.g", "i.e",
           "kgl", "kptlt", "oblt", "hptm", "coll"}  # German ranks ("Kptlt . Wolfgang Heyda"), "coll . Études"
_END = re.compile(r" [.?!](?= |$)")
_NEXT = re.compile(r"\s*(\S)")
RULE_ORDER = ("range", "point", "neighbour-range", "neighbour-point", "preceding")
MAX_EVIDENCE_CHARS = 400


def load_timeqa_relations(path: str | Path) -> dict[str, str]:
    """{PID: meaning} from TimeQA's relations.json ({PID: {meaning, template, mode}})."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: <file>: invalid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: <file>: expected an object of PID -> {{meaning, ...}}")
    return {pid: v["meaning"] for pid, v in data.items() if isinstance(v, dict) and isinstance(v.get("meaning"), str)}


def page_name(page: str) -> str:
    """Readable title of a Wikipedia page path segment: 'Alan_Bar%C3%B3' -> 'Alan Baró'."""
    return unquote(page).replace("_", " ").strip()


def clean_target(target: str) -> str:
    """A target without the separators TimeQA sometimes leaves at its ends ('Turchynov ,' -> 'Turchynov')."""
    return target.strip(" ,;:")


@lru_cache(maxsize=32)
def sentence_ends(context: str) -> tuple[int, ...]:
    """Offsets just past each sentence-final " ." / " ?" / " !" of TimeQA's space-tokenised text.

    Cached: TimeQA asks several questions about one page, in a row."""
    ends = []
    for match in _END.finditer(context):
        token = context[context.rfind(" ", 0, match.start()) + 1:match.start()]
        if re.fullmatch(r"[A-Z]", token) or token.lower().rstrip(".") in _ABBREV:
            continue
        after = _NEXT.match(context, match.end())
        nxt = after.group(1) if after else ""
        if nxt and not (nxt.isupper() or nxt.isdigit() or nxt in "\"'(“"):
            continue
        ends.append(match.end())
    return tuple(ends)


def evidence_sentence(context: str, start: int, end: int, ends: tuple[int, ...] | None = None,
                      max_chars: int = MAX_EVIDENCE_CHARS) -> str:
    """The sentence(s) of `context` holding the span [start, end) (merged if the span crosses a split).

    Wikipedia lists and tables arrive as one endless "sentence"; past `max_chars` the evidence is
    the span with up to `max_chars` // 2 characters either side, cut at spaces."""
    ends = sentence_ends(context) if ends is None else ends
    lo = max([e for e in ends if e <= start], default=0)
    hi = min([e for e in ends if e >= end], default=len(context))
    if hi - lo > max_chars:
        side = max(0, (max_chars - (end - start)) // 2)
        if start - side > lo:
            cut = context.find(" ", start - side, start)
            lo = cut if cut >= 0 else start
        if end + side < hi:
            cut = context.rfind(" ", end, end + side)
            hi = cut if cut >= 0 else end
    return context[lo:hi].strip()


def _targets(rec: dict) -> list[tuple[str, int, int]] | tuple[str, str]:
    """[(target, from, end)] of the non-empty targets, or (field, reason) when they are malformed."""
    for key in ("targets", "from", "end"):
        reason = require(rec, key, list)
        if reason:
            return key, reason
    targets, starts, ends = rec["targets"], rec["from"], rec["end"]
    if not all(isinstance(t, str) for t in targets):
        return "targets", "expected a list of strings"
    if not (len(targets) == len(starts) == len(ends)):
        return "from/end", f"lengths differ: targets {len(targets)}, from {len(starts)}, end {len(ends)}"
    out = []
    for i, (target, lo, hi) in enumerate(zip(targets, starts, ends)):
        if not clean_target(target):
            continue
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)):
            return f"from[{i}]/end[{i}]", f"expected integers, got {lo!r}, {hi!r}"
        if not 0 <= lo < hi <= len(rec["context"]):
            return f"from[{i}]/end[{i}]", f"[{lo}, {hi}) outside the context (length {len(rec['context'])})"
        found = rec["context"][lo:hi]
        if found != target:
            return f"from[{i}]/end[{i}]", f"context there is {found!r}, not the target {target!r}"
        out.append((target, lo, hi))
    return out


@lru_cache(maxsize=32)
def page_times(context: str) -> tuple[PageTime, ...]:
    """Time expressions of a page (cached: several questions ask about one page, in a row)."""
    return tuple(find_page_times(context))


@dataclass
class _Tail:
    """One (page, relation, tail) seen in the questions: the page text and every span of the tail."""

    page: str
    pid: str
    name: str
    context: str
    spans: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Question:
    rec: dict
    qid: str
    level: str | None
    page: str
    pid: str
    tails: list[tuple[str, str, str]]  # (page, pid, tail name) keys, answer first


def file_level(path: Path) -> str | None:
    """`easy` / `hard` from TimeQA's file names (`human_train.easy.json.gzip`), else None."""
    parts = path.name.lower().split(".")
    return next((p for p in ("easy", "hard") if p in parts), None)


def build_timeqa(paths: list[str | Path], max_samples: int | None = None,
                 relation_labels: dict[str, str] | None = None, keep_unanswerable: bool = False) -> BuildResult:
    """5-tuples (one per page, relation, tail; windows from the page text) + temporal QA whose
    supporting_facts index them. Facts are written in first-seen order."""
    result = BuildResult()
    seen: dict[tuple[str, str | None], str] = {}
    tails: dict[tuple[str, str, str], _Tail] = {}
    questions: list[_Question] = []
    for path in map(Path, paths):
        level = file_level(path)
        for where, rec in iter_records(path, result, max_samples):
            result.records_read += 1
            if not isinstance(rec, dict):
                result.bad(path, where, "<record>", f"expected a JSON object, got {type(rec).__name__}")
                continue
            bad = next(((k, r) for k, kind in (("idx", str), ("question", str), ("context", str))
                        if (r := require(rec, k, kind, nonempty=True))), None)
            if bad:
                result.bad(path, where, *bad)
                continue
            match = _IDX.match(rec["idx"])
            if not match:
                result.bad(path, where, "idx", f"{rec['idx']!r} is not /wiki/<page>#<PID>#<k>")
                continue
            key = (rec["idx"], level)
            if key in seen:
                result.bad(path, where, "idx", f"duplicate idx {rec['idx']!r} (first at {position(seen[key])})")
                continue
            targets = _targets(rec)
            if isinstance(targets, tuple):
                result.bad(path, where, *targets)
                continue
            seen[key] = where
            page, pid = match.group(1), match.group(2)
            keys = []
            for target, lo, hi in targets:
                tkey = (page, pid, clean_target(target))
                entry = tails.setdefault(tkey, _Tail(page, pid, tkey[2], rec["context"]))
                if rec["context"] == entry.context and (lo, hi) not in entry.spans:
                    entry.spans.append((lo, hi))
                keys.append(tkey)
            qid = rec["idx"] if level is None else f"{rec['idx']}#{level}"
            questions.append(_Question(rec, qid, level, page, pid, list(dict.fromkeys(keys))))
    index = _add_facts(tails, result, relation_labels)
    pairs = {(t.page, t.pid) for t in tails.values()}
    for q in questions:
        _add_question(q, index, pairs, result, keep_unanswerable)
    return result


_Found = tuple[int, tuple[int, int], tuple[str | None, str | None, str]]  # (rank in RULE_ORDER, span, window)


def _windows(entry: _Tail, spans: list[tuple[int, int]]) -> list[_Found]:
    """(rank in RULE_ORDER, span, (start, end, rule)) of each span that gets a window."""
    times = list(page_times(entry.context))
    ends = sentence_ends(entry.context)
    found = []
    for span in spans:
        w = infer_window(entry.context, span[0], span[1], ends, times)
        if w is not None:
            found.append((RULE_ORDER.index(w.rule), span, (w.start, w.end, w.rule)))
    return found


def _best_window(entry: _Tail) -> tuple[tuple[int, int], tuple[str | None, str | None, str] | None]:
    """(span, (start, end, rule) or None): the span whose rule ranks first (RULE_ORDER), first seen on ties.

    The tail's own spans (those the records point at) come first. When neither their sentences nor
    their neighbours date it (rule `preceding` or none), its other mentions in the page are tried as
    well: a list row often dates what the narrative does not ("Heinrich von Pierer ( 1992 to 2005 )").
    A neighbour's date is kept over a far mention's: far mentions are often about another event
    (`offline/timeqa_time_rules.py` on the training, dev and test pages: trying them after `neighbour-*`
    windows too wins on the training pages and loses 3.9 points on the test pages)."""
    found = _windows(entry, entry.spans)
    if not found or min(f[0] for f in found) >= RULE_ORDER.index("preceding"):
        found += _windows(entry, [s for s in find_whole(entry.context, entry.name) if s not in entry.spans])
    if not found:
        return entry.spans[0], None
    _, span, window = min(found, key=lambda f: f[0])
    return span, window


def _add_facts(tails: dict[tuple[str, str, str], _Tail], result: BuildResult,
               labels: dict[str, str] | None) -> dict[tuple[str, str, str], int]:
    """Infer every fact's window, end open windows at the next start of the same (page, relation),
    append the facts; returns (page, pid, tail) -> fact index."""
    chosen = {key: _best_window(entry) for key, entry in tails.items()}
    groups: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for key in tails:
        groups.setdefault(key[:2], []).append(key)
    windows: dict[tuple[str, str, str], tuple[str | None, str | None, str]] = {}
    for keys in groups.values():
        inferred = [k for k in keys if chosen[k][1] is not None]
        closed = close_open_ends([chosen[k][1][:2] for k in inferred])
        for k, (start, end, here) in zip(inferred, closed):
            windows[k] = (start, end, chosen[k][1][2] + ("+next_start" if here else ""))
    index = {}
    for key, entry in tails.items():
        (lo, hi), (start, end, rule) = chosen[key][0], windows.get(key, (None, None, "none"))
        result.notes[f"fact windows by rule: {rule}"] += 1
        page = entry.page
        index[key] = result.add_fact(make_fact(
            head=(f"enwiki:{page}", page_name(page), None), relation=(entry.pid, property_label(entry.pid, labels)),
            tail=(None, entry.name, None), source="timeqa", page_title=page_name(page),
            sentence=evidence_sentence(entry.context, lo, hi), url=f"https://en.wikipedia.org/wiki/{page}",
            start=start, end=end, time_source="text_infer", extra_context={"time_rule": rule}))
    return index


def question_family(constraint: TimeConstraint | None) -> str:
    """DESIGN_QA.md family of a TimeQA question from its parsed constraint (single_hop: no time)."""
    if constraint is None:
        return "single_hop"
    if constraint.kind in ("at", "between"):
        if constraint.start != constraint.end:
            return "between"
        return "on" if constraint.start and len(constraint.start) == 10 else "in"
    if constraint.kind in ("just_before", "right_after") and constraint.anchor:
        return "succession"
    return constraint.kind


def _add_question(q: _Question, index: dict[tuple[str, str, str], int], pairs: set[tuple[str, str]],
                  result: BuildResult, keep_unanswerable: bool) -> None:
    constraint = parse_time_constraint(q.rec["question"])
    window = None if constraint is None else constraint.window()
    if window is None:
        result.notes["questions with no parsable time (open window, question_time null)"] += 1
    qt = None if window is None else {"start": window[0], "end": window[1]}
    base = {"qid": q.qid, "dataset": "timeqa", "question": q.rec["question"].strip()}
    extra = {"relation_id": q.pid, "page": q.page} | ({"level": q.level} if q.level else {})
    if not q.tails:
        result.notes["unanswerable questions (targets [''])" + (" kept" if keep_unanswerable else " skipped")] += 1
        if keep_unanswerable:
            reason = "time_outside" if (q.page, q.pid) in pairs else "relation_missing"
            result.qa.append(base | {"answer": NO_ANSWER, "type": "unanswerable", "supporting_facts": [], "question_time": qt,
                                     "answer_aliases": [], "answerable": False,
                                     "unanswerable_reason": reason, "near_miss_facts": [],
                                     "family": "unans_time" if reason == "time_outside" else "unans_relation"} | extra)
        return
    indices = [index[k] for k in q.tails]
    answers = [k[2] for k in q.tails]
    # the answer's fact goes last in supporting_facts (the project's convention for answer_fact)
    support = [i for i in dict.fromkeys(indices) if i != indices[0]] + indices[:1]
    family = question_family(constraint)
    result.qa.append(base | {"answer": answers[0], "type": "single-hop" if family == "single_hop" else "temporal",
                             "supporting_facts": support, "question_time": qt, "answer_aliases": answers[1:],
                             "answerable": True, "answer_fact": indices[0], "family": family} | extra)
