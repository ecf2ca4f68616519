"""TimeQA (JSON Lines, gzipped or not: `idx, question, context, targets, from, end, paragraphs`) to
temporal QA and 5-tuples.

Rules: `idx` = `/wiki/<page>#<PID>#<k>`; head = the page (underscores to spaces), relation = PID with
a readable label (TimeQA's relations.json `meaning` when given, else the built-in table), tail = each
non-empty target; evidence = the sentence of `context` that holds the target's span
`context[from:end]` (sentences split at " . ", " ? ", " ! " except after abbreviations such as
"Maj ." or "D ."); the fact's time window = the question's time constraint parsed by
kblampp.question_time (open, source "none", when the question states none). `targets == [""]`
marks an unanswerable question: counted and skipped, or kept with answer "unanswerable".
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

from kblampp.builders.common import BuildResult, iter_records, make_fact, position, require
from kblampp.builders.wikidata_labels import property_label
from kblampp.question_time import parse_question_time

_IDX = re.compile(r"^/wiki/([^#]+)#(P\d+)#(\d+)$")
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "maj", "col", "gen", "lt", "capt", "sgt", "rev", "st", "jr", "sr",
           "no", "co", "inc", "ltd", "mt", "ft", "gov", "sen", "rep", "hon", "adm", "cmdr", "brig", "cpl",
           "pvt", "vs", "vol", "fr", "bros", "corp", "dept", "univ", "est", "approx", "u.s", "d.c", "e.g", "i.e"}
_END = re.compile(r" [.?!](?= |$)")
_NEXT = re.compile(r"\s*(\S)")
UNANSWERABLE = "unanswerable"
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


def build_timeqa(paths: list[str | Path], max_samples: int | None = None,
                 relation_labels: dict[str, str] | None = None, keep_unanswerable: bool = False) -> BuildResult:
    """Temporal QA + 5-tuples from TimeQA files; QA supporting_facts index the facts of this run."""
    result = BuildResult()
    seen: dict[str, str] = {}
    for path in map(Path, paths):
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
            if rec["idx"] in seen:
                result.bad(path, where, "idx", f"duplicate idx {rec['idx']!r} (first at {position(seen[rec['idx']])})")
                continue
            targets = _targets(rec)
            if isinstance(targets, tuple):
                result.bad(path, where, *targets)
                continue
            seen[rec["idx"]] = where
            _add(rec, match, targets, result, relation_labels, keep_unanswerable)
    return result


def _add(rec: dict, match: re.Match, targets: list[tuple[str, int, int]], result: BuildResult,
         labels: dict[str, str] | None, keep_unanswerable: bool) -> None:
    page, pid = match.group(1), match.group(2)
    window = parse_question_time(rec["question"])
    if window is None:
        result.notes["questions with no parsable time (open window, question_time null)"] += 1
    qt = None if window is None else {"start": window[0], "end": window[1]}
    if not targets:
        result.notes["unanswerable questions (targets [''])" + (" kept" if keep_unanswerable else " skipped")] += 1
        if not keep_unanswerable:
            return
    ends = sentence_ends(rec["context"])
    indices = []
    for target, lo, hi in targets:
        indices.append(result.add_fact(make_fact(
            head=(f"enwiki:{page}", page_name(page), None), relation=(pid, property_label(pid, labels)),
            tail=(None, clean_target(target), None), source="timeqa", page_title=page_name(page),
            sentence=evidence_sentence(rec["context"], lo, hi, ends), url=f"https://en.wikipedia.org/wiki/{page}",
            start=qt and qt["start"], end=qt and qt["end"], time_source="question_time",
            extra_context={"qid": rec["idx"]})))
    answers = [clean_target(t) for t, _, _ in targets]
    # the answer's fact goes last in supporting_facts (the project's convention for answer_fact)
    support = [i for i in dict.fromkeys(indices) if i != indices[0]] + indices[:1]
    qa = {"qid": rec["idx"], "dataset": "timeqa", "question": rec["question"].strip(),
          "answer": answers[0] if answers else UNANSWERABLE, "type": "temporal",
          "supporting_facts": support, "question_time": qt, "answer_aliases": answers[1:],
          "answerable": bool(answers), "relation_id": pid}
    if indices:
        qa["answer_fact"] = indices[0]
    result.qa.append(qa)
