"""The sanity checker behind `offline/sanity_check_5tuple.py`: every problem as `PATH:LINE: FIELD: reason`.

Checkers are looked up in `CHECKERS` by kind, so a later kind (e.g. `store` for built stores) is one
`register_checker("store", fn)` away; each checker takes the path and an options dict and returns a
`CheckResult`. The kind is auto-detected from the first parseable line (or a folder -> `store`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kblampp.config import KBConfig
from kblampp.schema import QA_TYPES, Problem, check_fact, fact_key, iter_jsonl, scan_facts, scan_qa

DEFAULT_REFERENCE_DATE = KBConfig().reference_date


@dataclass
class CheckResult:
    kind: str
    path: str
    problems: list[Problem]
    summary: str  # one line, printed when there are no problems

    def lines(self) -> list[str]:
        return [p.format(self.path) for p in self.problems]


Checker = Callable[[Path, dict[str, Any]], CheckResult]


def count_lines(path: str | Path) -> int:
    """Number of lines of a file (a 5-tuple's index is its 0-based line number)."""
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def check_5tuple_file(path: Path, options: dict[str, Any]) -> CheckResult:
    facts, problems = scan_facts(path)
    worlds = {f.raw.get("context", {}).get("disamb", {}).get("world") for f in facts
              if isinstance(f.raw.get("context", {}).get("disamb"), dict)} - {None}
    timed = sum(1 for f in facts if f.start is not None or f.end is not None)
    extra = f", {len(worlds)} worlds" if worlds else ""
    return CheckResult("5tuple", str(path), problems,
                       f"{path}: OK, {len(facts)} facts ({timed} with a time window{extra})")


def _answer_fact_problems(path: Path, valid_lines: set[int]) -> list[Problem]:
    """The optional `answer_fact` field must be an int listed last in supporting_facts (null when unanswerable)."""
    out = []
    for line, obj, _problem in iter_jsonl(path):
        if line not in valid_lines or "answer_fact" not in obj:
            continue
        value, support = obj["answer_fact"], obj["supporting_facts"]
        if value is None and obj.get("answerable", True) is False:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            out.append(Problem(line, "answer_fact", f"expected an integer, got {type(value).__name__}"))
        elif not support or support[-1] != value:
            out.append(Problem(line, "answer_fact", f"{value} is not the last of supporting_facts"))
    return out


def _recomputed_answer_problems(path: Path, valid_lines: set[int], facts_path: str,
                                reference_date: str) -> tuple[list[Problem], int]:
    """Every generated record (a `family` and a `template`: programmatic or LLM-written) has its answer
    recomputed from the facts (kblampp.answer_check); real-data builders' records (TimeQA tags its pages
    with a `world` too) follow their dataset's own answers."""
    from kblampp.answer_check import FactLookup, check_record
    from kblampp.schema import load_facts

    lookup: FactLookup | None = None
    out, checked = [], 0
    for line, obj, _problem in iter_jsonl(path):
        if line not in valid_lines or "family" not in obj or "template" not in obj:
            continue
        lookup = lookup or FactLookup(load_facts(facts_path))
        out += [Problem(line, f, reason) for f, reason in check_record(obj, lookup, reference_date)]
        checked += 1
    return out, checked


def check_qa_file(path: Path, options: dict[str, Any]) -> CheckResult:
    facts_path = options.get("facts")
    num_facts = count_lines(facts_path) if facts_path else None
    records, problems = scan_qa(path, num_facts)
    bad_lines = {p.line for p in problems}
    all_lines = {line for line, obj, problem in iter_jsonl(path) if problem is None}
    problems += _answer_fact_problems(path, all_lines - bad_lines)
    checked = 0
    if facts_path and not problems:
        found, checked = _recomputed_answer_problems(path, all_lines, facts_path,
                                                     options.get("reference_date") or DEFAULT_REFERENCE_DATE)
        problems += found
    problems.sort(key=lambda p: p.line)
    types = {t: sum(1 for r in records if r.type == t) for t in QA_TYPES}
    if not types["unanswerable"]:
        del types["unanswerable"]
    against = f", indices checked against {facts_path} ({num_facts} facts)" if facts_path else ""
    recomputed = f", {checked} answers recomputed from the facts" if checked else ""
    counts = ", ".join(f"{n} {t}" for t, n in types.items())
    return CheckResult("qa", str(path), problems,
                       f"{path}: OK, {len(records)} questions ({counts}){against}{recomputed}")


def check_store(path: Path, options: dict[str, Any]) -> CheckResult:
    """A built store: manifest vs every array, encoder hash, facts.jsonl, each index_* folder."""
    from kblampp.kb_store import KBValueStore  # heavy imports only for stores
    from kblampp.store_io import StoreError

    def problem(err: Exception) -> Problem:
        where, _, reason = str(err).partition(": ")
        rel = Path(where).relative_to(path) if Path(where).is_relative_to(path) else Path(where).name
        return Problem(0, str(rel) if reason else "<store>", reason or str(err))

    try:
        store = KBValueStore.load(path)
    except (StoreError, OSError, ValueError, KeyError) as err:
        return CheckResult("store", str(path), [problem(err)], "")
    from kblampp.knowledge_index import KnowledgeIndex

    problems, found = [], []
    for folder in sorted(p for p in path.glob("index_*") if p.is_dir()):
        try:
            index = KnowledgeIndex.load(folder, expect_n=store.n, expect_dim=store.d_k, expect_store_id=store.store_id)
            found.append(f"{folder.name[6:]} ({index.n_live} live)")
        except (StoreError, OSError, ValueError, RuntimeError) as err:
            problems.append(problem(err))
    problems += _store_fact_problems(path, store.alive)
    m = store.manifest
    summary = (f"{path}: OK, store of {store.n} facts ({int(store.alive.sum())} live), d_k {store.d_k}, "
               f"d_v {store.d_v}, d_ctx {store.d_ctx}, {m['dtype']}, {m['embedding_model']}, "
               f"indexes: {', '.join(found) or 'none'}")
    return CheckResult("store", str(path), problems, summary)


def _store_fact_problems(path: Path, alive) -> list[Problem]:
    """The store's facts.jsonl under the same 5-tuple rules as a source file (limits, control
    characters, unknown fields); duplicates only among live facts (a deleted fact keeps its record)."""
    problems, first = [], {}
    for line, obj, problem in iter_jsonl(path / "facts.jsonl", allow_blank=False):
        found = [problem] if problem else check_fact(obj, line)
        if not found and alive[line - 1]:
            key = fact_key(obj)
            if key in first:
                found = [Problem(line, "<line>", f"duplicate of the live fact on line {first[key]}")]
            first.setdefault(key, line)
        problems += [Problem(0, f"facts.jsonl:{p.line}: {p.field}", p.reason) for p in found]
    return problems


CHECKERS: dict[str, Checker] = {"5tuple": check_5tuple_file, "qa": check_qa_file, "store": check_store}


def register_checker(kind: str, checker: Checker) -> None:
    """Add a kind (e.g. 'store'); the CLI's --kind choices come from CHECKERS."""
    CHECKERS[kind] = checker


def detect_kind(path: str | Path) -> str:
    """'store' for a folder, else '5tuple' or 'qa' from the first line that parses as an object."""
    p = Path(path)
    if p.is_dir():
        return "store"
    for _line, obj, problem in iter_jsonl(p):
        if problem is None and isinstance(obj, dict):
            if "qid" in obj or "question" in obj:
                return "qa"
            if "head" in obj or "tail" in obj or "time_window" in obj:
                return "5tuple"
    raise ValueError(f"{path}: cannot tell the kind (no line looks like a 5-tuple or a QA record); pass --kind")


def run_check(path: str | Path, kind: str | None = None, **options: Any) -> CheckResult:
    """Run the checker of `kind` (auto-detected when None) on `path`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = kind or detect_kind(p)
    if kind not in CHECKERS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(sorted(CHECKERS))})")
    return CHECKERS[kind](p, options)


def main(argv: list[str] | None = None) -> int:
    """CLI: print every problem (stdout) and exit 1, or print a one-line summary and exit 0."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="sanity_check_5tuple.py",
        description="Check a 5-tuple or QA JSONL file; prints every problem as PATH:LINE: FIELD: reason.")
    parser.add_argument("path", help="the file (or store folder) to check")
    parser.add_argument("--kind", choices=sorted(CHECKERS), default=None,
                        help="what the file is; auto-detected from its first line when omitted")
    parser.add_argument("--facts", default=None,
                        help="5-tuple file the QA supporting_facts index into (checks the index range and recomputes "
                             "the answer of every record with a `family`)")
    parser.add_argument("--reference_date", default=DEFAULT_REFERENCE_DATE,
                        help="what 'now' in a question means when answers are recomputed (ISO date)")
    args = parser.parse_args(argv)
    try:
        result = run_check(args.path, args.kind, facts=args.facts, reference_date=args.reference_date)
    except (OSError, ValueError) as err:
        from kblampp.cli import report_error

        return report_error(err)
    for line in result.lines():
        print(line)
    if result.problems:
        print(f"{len(result.problems)} problem(s) in {args.path}")
        return 1
    print(result.summary)
    return 0
