"""5-tuple and QA record schemas (SPEC section 4): validation with file/line/field messages.

Every check returns `Problem`s instead of raising, so the sanity checker can list all of them;
`load_facts` / `load_qa` raise one `SchemaError` carrying every problem for code that needs clean data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from kblampp.question_time import TIME_KINDS
from kblampp.synth.families import FAMILIES, FAMILY_TYPE, UNANSWERABLE_REASONS
from kblampp.timewin import window_days

QA_TYPES = ("single-hop", "multi-hop", "temporal", "unanswerable")


@dataclass(frozen=True)
class Problem:
    line: int
    field: str
    reason: str

    def format(self, path: str | Path) -> str:
        return f"{path}:{self.line}: {self.field}: {self.reason}"


class SchemaError(ValueError):
    """Bad input file; the message lists every problem as `PATH:LINE: FIELD: reason`."""

    def __init__(self, path: str | Path, problems: list[Problem], limit: int = 20):
        self.path, self.problems = str(path), problems
        shown = [p.format(path) for p in problems[:limit]]
        more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__("\n".join(shown) + more)


@dataclass(frozen=True)
class Fact:
    """One 5-tuple; `raw` keeps the original object so writers can round-trip it."""

    head_id: str | None
    head_name: str
    relation_id: str | None
    relation_name: str
    tail_id: str | None
    tail_name: str
    sentence: str
    start: str | None
    end: str | None
    tau_min: float
    tau_max: float
    raw: dict = field(repr=False, compare=False, hash=False)


@dataclass(frozen=True)
class QARecord:
    qid: str
    dataset: str
    question: str
    answer: str
    type: str
    supporting_facts: tuple[int, ...]
    question_time: tuple[str | None, str | None] | None
    tau: tuple[float, float] | None
    raw: dict = field(repr=False, compare=False, hash=False)

    @property
    def answerable(self) -> bool:
        """False for questions the KB cannot answer (docs/DESIGN_QA.md); absent means answerable."""
        return self.raw.get("answerable", True) is not False

    @property
    def family(self) -> str | None:
        return self.raw.get("family")

    @property
    def aliases(self) -> list[str]:
        """The answer plus any `answer_aliases` / `aliases` listed in the record."""
        extra = self.raw.get("answer_aliases") or self.raw.get("aliases") or []
        return [self.answer] + [a for a in extra if isinstance(a, str) and a != self.answer]


def iter_jsonl(path: str | Path, allow_blank: bool = True) -> Iterator[tuple[int, Any, Problem | None]]:
    """Yield (line_no, object, problem) per line; bad bytes or JSON become a Problem.

    Blank lines are skipped, or reported when `allow_blank` is False (a fact's index is its line)."""
    with open(path, "rb") as handle:
        for line_no, raw_line in enumerate(handle, start=1):
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no, None, Problem(line_no, "<line>", f"not valid UTF-8 (byte {err.start})")
                continue
            if not text.strip():
                if not allow_blank:
                    yield line_no, None, Problem(line_no, "<line>", "blank line (a fact's index is its line number)")
                continue
            text = text.rstrip("\r\n")  # so error columns count within the line
            try:
                yield line_no, json.loads(text), None
            except json.JSONDecodeError as err:
                at_end = err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string")
                kind = "truncated JSON" if at_end else "invalid JSON"
                at = "" if err.msg.endswith(" at") else " at"  # 'Unterminated string starting at'
                yield line_no, None, Problem(line_no, "<line>", f"{kind} ({err.msg}{at} column {err.colno})")


def _name(obj: dict, key: str, line: int, problems: list[Problem], required_id: bool) -> None:
    """Check an entity/relation object: {"id": str|null, "name": non-blank str, ...}."""
    if key not in obj:
        problems.append(Problem(line, key, "missing field"))
        return
    value = obj[key]
    if not isinstance(value, dict):
        problems.append(Problem(line, key, f"expected an object, got {type(value).__name__}"))
        return
    if "name" not in value:
        problems.append(Problem(line, f"{key}.name", "missing field"))
    elif not isinstance(value["name"], str):
        problems.append(Problem(line, f"{key}.name", f"expected a string, got {type(value['name']).__name__}"))
    elif not value["name"].strip():
        problems.append(Problem(line, f"{key}.name", "empty name"))
    if "id" not in value:
        if required_id:
            problems.append(Problem(line, f"{key}.id", "missing field"))
    elif value["id"] is not None and not isinstance(value["id"], str):
        problems.append(Problem(line, f"{key}.id", f"expected a string or null, got {type(value['id']).__name__}"))


def _window(obj: Any, key: str, line: int, problems: list[Problem]) -> tuple[float, float] | None:
    """Check a {start, end} object of ISO dates or nulls; returns the window in days if valid."""
    if not isinstance(obj, dict):
        problems.append(Problem(line, key, f"expected an object, got {type(obj).__name__}"))
        return None
    for part in ("start", "end"):
        if part not in obj:
            problems.append(Problem(line, f"{key}.{part}", "missing field"))
            return None
        if obj[part] is not None and not isinstance(obj[part], str):
            problems.append(Problem(line, f"{key}.{part}", f"expected a date string or null, got {type(obj[part]).__name__}"))
            return None
    try:
        return window_days(obj["start"], obj["end"])
    except ValueError as err:
        part, _, reason = str(err).partition(": ")
        problems.append(Problem(line, f"{key}.{part}", reason))
        return None


def check_fact(obj: Any, line: int) -> list[Problem]:
    """Every schema problem of one 5-tuple object."""
    if not isinstance(obj, dict):
        return [Problem(line, "<line>", f"expected a JSON object, got {type(obj).__name__}")]
    problems: list[Problem] = []
    _name(obj, "head", line, problems, required_id=True)
    _name(obj, "relation", line, problems, required_id=True)
    _name(obj, "tail", line, problems, required_id=False)
    ctx = obj.get("context")
    if "context" not in obj:
        problems.append(Problem(line, "context", "missing field"))
    elif not isinstance(ctx, dict):
        problems.append(Problem(line, "context", f"expected an object, got {type(ctx).__name__}"))
    elif "sent_span" not in ctx:
        problems.append(Problem(line, "context.sent_span", "missing field"))
    elif not isinstance(ctx["sent_span"], str):
        problems.append(Problem(line, "context.sent_span", f"expected a string, got {type(ctx['sent_span']).__name__}"))
    elif not ctx["sent_span"].strip():
        problems.append(Problem(line, "context.sent_span", "empty evidence sentence"))
    if "time_window" not in obj:
        problems.append(Problem(line, "time_window", "missing field"))
    else:
        _window(obj["time_window"], "time_window", line, problems)
    return problems


def fact_from_dict(obj: dict) -> Fact:
    """Build a Fact from an object that passed `check_fact`."""
    tw = obj["time_window"]
    lo, hi = window_days(tw["start"], tw["end"])
    return Fact(
        head_id=obj["head"].get("id"), head_name=obj["head"]["name"].strip(),
        relation_id=obj["relation"].get("id"), relation_name=obj["relation"]["name"].strip(),
        tail_id=obj["tail"].get("id"), tail_name=obj["tail"]["name"].strip(),
        sentence=obj["context"]["sent_span"].strip(), start=tw["start"], end=tw["end"],
        tau_min=lo, tau_max=hi, raw=obj,
    )


def check_qa(obj: Any, line: int, num_facts: int | None = None) -> list[Problem]:
    """Every schema problem of one QA object; supporting_facts checked against `num_facts` if given."""
    if not isinstance(obj, dict):
        return [Problem(line, "<line>", f"expected a JSON object, got {type(obj).__name__}")]
    problems: list[Problem] = []
    for key in ("qid", "dataset", "question", "answer"):
        if key not in obj:
            problems.append(Problem(line, key, "missing field"))
        elif not isinstance(obj[key], str):
            problems.append(Problem(line, key, f"expected a string, got {type(obj[key]).__name__}"))
        elif key != "dataset" and not obj[key].strip():
            problems.append(Problem(line, key, "empty string"))
    if "type" not in obj:
        problems.append(Problem(line, "type", "missing field"))
    elif obj["type"] not in QA_TYPES:
        problems.append(Problem(line, "type", f"{obj['type']!r} is not one of {', '.join(QA_TYPES)}"))
    if "supporting_facts" not in obj:
        problems.append(Problem(line, "supporting_facts", "missing field"))
    else:
        _fact_indices(obj["supporting_facts"], "supporting_facts", line, num_facts, problems)
    if "question_time" not in obj:
        problems.append(Problem(line, "question_time", "missing field"))
    elif obj["question_time"] is not None:
        _window(obj["question_time"], "question_time", line, problems)
    _check_family_fields(obj, line, num_facts, problems)
    return problems


def _check_family_fields(obj: dict, line: int, num_facts: int | None, problems: list[Problem]) -> None:
    """The optional fields of docs/DESIGN_QA.md: family, answerable, time_constraint, unanswerable_*."""
    family = obj.get("family")
    if "family" in obj:
        if family not in FAMILIES:
            problems.append(Problem(line, "family", f"{family!r} is not a known family"))
        elif obj.get("type") in QA_TYPES and FAMILY_TYPE[family] != obj["type"]:
            problems.append(Problem(line, "family", f"{family!r} is a {FAMILY_TYPE[family]} family, "
                                                    f"but type is {obj['type']!r}"))
    answerable = obj.get("answerable", True)
    if not isinstance(answerable, bool):
        problems.append(Problem(line, "answerable", f"expected true or false, got {type(answerable).__name__}"))
        return
    if (obj.get("type") == "unanswerable") == answerable:
        problems.append(Problem(line, "answerable", f"{answerable} does not fit type {obj.get('type')!r}"))
    tc = obj.get("time_constraint")
    if tc is not None:
        if not isinstance(tc, dict):
            problems.append(Problem(line, "time_constraint", f"expected an object or null, got {type(tc).__name__}"))
        elif tc.get("kind") not in TIME_KINDS[1:]:
            problems.append(Problem(line, "time_constraint.kind", f"{tc.get('kind')!r} is not one of "
                                                                  f"{', '.join(TIME_KINDS[1:])}"))
        elif tc.get("anchor") is not None and not isinstance(tc["anchor"], str):
            problems.append(Problem(line, "time_constraint.anchor", "expected a string or null"))
        elif tc.get("start") is not None or tc.get("end") is not None:
            _window(tc, "time_constraint", line, problems)
        elif "start" not in tc or "end" not in tc:
            problems.append(Problem(line, "time_constraint", "missing start/end"))
    if answerable:
        for key in ("unanswerable_reason", "near_miss_facts"):
            if key in obj:
                problems.append(Problem(line, key, "only unanswerable records carry it"))
        return
    reason = obj.get("unanswerable_reason")
    expected = UNANSWERABLE_REASONS.get(family) if family in UNANSWERABLE_REASONS else None
    if reason not in UNANSWERABLE_REASONS.values():
        problems.append(Problem(line, "unanswerable_reason", f"{reason!r} is not one of "
                                                             f"{', '.join(UNANSWERABLE_REASONS.values())}"))
    elif expected is not None and reason != expected:
        problems.append(Problem(line, "unanswerable_reason", f"{reason!r} does not fit family {family!r}"))
    if obj.get("supporting_facts"):
        problems.append(Problem(line, "supporting_facts", "must be empty on an unanswerable record"))
    if obj.get("answer_fact") is not None:
        problems.append(Problem(line, "answer_fact", "must be null on an unanswerable record"))
    _fact_indices(obj.get("near_miss_facts", []), "near_miss_facts", line, num_facts, problems)


def _fact_indices(values: Any, key: str, line: int, num_facts: int | None, problems: list[Problem]) -> None:
    """A list of fact indices, each within the fact file when its size is known."""
    if not isinstance(values, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
        problems.append(Problem(line, key, "expected a list of integers"))
        return
    for i in values:
        if i < 0 or (num_facts is not None and i >= num_facts):
            bound = f"0..{num_facts - 1}" if num_facts is not None else ">= 0"
            problems.append(Problem(line, key, f"index {i} out of range ({bound})"))


def qa_from_dict(obj: dict) -> QARecord:
    """Build a QARecord from an object that passed `check_qa`."""
    qt = obj["question_time"]
    window = None if qt is None else (qt["start"], qt["end"])
    tau = None if qt is None else window_days(qt["start"], qt["end"])
    return QARecord(
        qid=obj["qid"], dataset=obj["dataset"], question=obj["question"], answer=obj["answer"],
        type=obj["type"], supporting_facts=tuple(obj["supporting_facts"]), question_time=window,
        tau=tau, raw=obj,
    )


def scan_facts(path: str | Path) -> tuple[list[Fact], list[Problem]]:
    """All valid facts and all problems of a 5-tuple JSONL file (line order kept)."""
    facts: list[Fact] = []
    problems: list[Problem] = []
    for line, obj, problem in iter_jsonl(path, allow_blank=False):
        found = [problem] if problem else check_fact(obj, line)
        if found:
            problems.extend(found)
        else:
            facts.append(fact_from_dict(obj))
    return facts, problems


def scan_qa(path: str | Path, num_facts: int | None = None) -> tuple[list[QARecord], list[Problem]]:
    """All valid QA records and all problems (including duplicate qids) of a QA JSONL file."""
    records: list[QARecord] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for line, obj, problem in iter_jsonl(path):
        found = [problem] if problem else check_qa(obj, line, num_facts)
        if not found and obj["qid"] in first_line:
            found = [Problem(line, "qid", f"duplicate qid {obj['qid']!r} (first on line {first_line[obj['qid']]})")]
        if found:
            problems.extend(found)
            continue
        first_line[obj["qid"]] = line
        records.append(qa_from_dict(obj))
    return records, problems


def load_facts(path: str | Path) -> list[Fact]:
    """Facts of a clean file; a file with any problem raises SchemaError (nothing half-loaded).

    A fact's index is its 0-based line number (blank lines are reported as problems, so it is
    also its position in the returned list)."""
    facts, problems = scan_facts(path)
    if problems:
        raise SchemaError(path, problems)
    return facts


def load_qa(path: str | Path, num_facts: int | None = None) -> list[QARecord]:
    """QA records of a clean file; any problem raises SchemaError."""
    records, problems = scan_qa(path, num_facts)
    if problems:
        raise SchemaError(path, problems)
    return records

