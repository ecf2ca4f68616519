"""Shared plumbing of the real-dataset builders: reading JSON / JSON Lines (gzipped or not) with record
positions, the 5-tuple and QA shapes of SPEC section 4, problem reports, and atomic, validated writes.

Why one module: every builder must report bad records the same way (`FILE:WHERE: FIELD: reason`) and
must never leave a half-written or schema-invalid output behind.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from kblampp.schema import scan_facts, scan_qa


@dataclass(frozen=True)
class BuildProblem:
    """A bad input record: file, position ("12" = line 12, "record 3" = 4th item of a JSON list), field."""

    path: str
    where: str
    field: str
    reason: str

    def format(self) -> str:
        return f"{self.path}:{self.where}: {self.field}: {self.reason}"


class BuildError(ValueError):
    """Raised in strict mode, or when input cannot be read at all; message lists the problems."""


@dataclass
class BuildResult:
    """What a builder produced: facts (5-tuple dicts, index = position), QA dicts, and the tallies."""

    facts: list[dict] = field(default_factory=list)
    qa: list[dict] = field(default_factory=list)
    records_read: int = 0
    problems: list[BuildProblem] = field(default_factory=list)
    bad_records: int = 0
    notes: Counter = field(default_factory=Counter)  # counted, not errors (duplicates merged, ...)
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def bad(self, path: str | Path, where: str, fld: str, reason: str) -> None:
        """Record one bad input record (each call counts one record)."""
        self.problems.append(BuildProblem(str(path), where, fld, reason))
        self.bad_records += 1

    def add_fact(self, fact: dict) -> int:
        """Append a fact unless the same 5-tuple is already there; returns its index either way."""
        key = json.dumps([fact["head"], fact["relation"], fact["tail"], fact["context"]["sent_span"],
                          fact["time_window"]], sort_keys=True, ensure_ascii=False)
        if key in self._index:
            self.notes["duplicate facts merged"] += 1
            return self._index[key]
        self._index[key] = len(self.facts)
        self.facts.append(fact)
        return self._index[key]

    def summary(self) -> str:
        reasons = Counter(p.reason.split(" (")[0] for p in self.problems)
        lines = [f"records read: {self.records_read}", f"bad records: {self.bad_records}",
                 f"facts written: {len(self.facts)}", f"qa written: {len(self.qa)}"]
        lines += [f"{name}: {count}" for name, count in sorted(self.notes.items())]
        lines += [f"rejected ({count}): {reason}" for reason, count in reasons.most_common()]
        return "\n".join(lines)


def make_fact(*, head: tuple[str | None, str, str | None], relation: tuple[str | None, str],
              tail: tuple[str | None, str, str | None], source: str, page_title: str, sentence: str,
              url: str | None = None, start: str | None = None, end: str | None = None,
              time_source: str = "none", extra_context: dict | None = None) -> dict:
    """One 5-tuple in the exact SPEC section 4 shape; (id, name, type) for entities, (id, name) relation."""
    context = {"source": source, "page_title": page_title, "sent_span": sentence, "disamb": {},
               "ver": {"url": url, "rev_id": None}}
    context.update(extra_context or {})
    return {"head": {"id": head[0], "name": head[1], "type": head[2]},
            "relation": {"id": relation[0], "name": relation[1]},
            "tail": {"id": tail[0], "name": tail[1], "type": tail[2]},
            "context": context,
            "time_window": {"start": start, "end": end, "source": time_source if (start or end) else "none"}}


def _open_bytes(path: Path):
    """Binary handle of a plain or gzipped file (decided by the gzip magic bytes, not the name)."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _first_char(path: Path) -> str:
    with _open_bytes(path) as handle:
        while chunk := handle.read(4096):
            text = chunk.lstrip()
            if text:
                return chr(text[0])
    return ""


def iter_records(path: str | Path, result: BuildResult, limit: int | None = None) -> Iterator[tuple[str, Any]]:
    """(position, object) per record of a JSON list or JSON Lines file (gz or not).

    The caller counts each yielded record in `result.records_read`; reading stops once that count
    (bad lines included) reaches `limit`, across files when the same result is passed again.
    Unreadable lines are recorded in `result` as bad records and skipped; a JSON list that does not
    parse at all raises BuildError (there is no record to skip to)."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"{path}: input file not found")
    if _first_char(path) == "[":
        try:
            with _open_bytes(path) as handle:
                data = json.loads(handle.read().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise BuildError(f"{path}: not valid UTF-8 (byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise BuildError(f"{path}:{err.lineno}: <file>: invalid JSON list ({err.msg} at column {err.colno})") from None
        except (EOFError, OSError, zlib.error) as err:
            raise BuildError(f"{path}: unreadable ({err})") from None
        for i, obj in enumerate(data):
            if limit is not None and result.records_read >= limit:
                return
            yield f"record {i}", obj
        return
    line_no = 0
    try:
        with _open_bytes(path) as handle:
            for line_no, raw in enumerate(handle, start=1):
                if limit is not None and result.records_read >= limit:
                    return
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    result.records_read += 1
                    result.bad(path, str(line_no), "<line>", f"not valid UTF-8 (byte {err.start})")
                    continue
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    kind = "truncated JSON" if err.pos >= len(text.rstrip()) else "invalid JSON"
                    result.records_read += 1
                    result.bad(path, str(line_no), "<line>", f"{kind} ({err.msg} at column {err.colno})")
                    continue
                yield str(line_no), obj
    except (EOFError, OSError, zlib.error) as err:
        result.bad(path, str(line_no + 1), "<file>", f"truncated or corrupt compressed stream ({err})")


def position(where: str) -> str:
    """Human form of a record position: "12" -> "line 12", "record 3" stays."""
    return f"line {where}" if where.isdigit() else where


def require(obj: Any, key: str, kind: type | tuple[type, ...], nonempty: bool = False) -> str | None:
    """Reason `obj[key]` is unusable (missing / wrong type / empty), or None when it is fine."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if key not in obj:
        return "missing field"
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        return f"expected {names}, got {type(value).__name__}"
    if nonempty and not (value.strip() if isinstance(value, str) else value):
        return f"empty {'string' if isinstance(value, str) else type(value).__name__}"
    return None


def _write_lines(target: Path, rows: list[dict]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the output is an ordinary data file
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(tmp)


def write_outputs(result: BuildResult, facts_path: str | Path, qa_path: str | Path | None) -> None:
    """Write facts (and QA) to temp files, check them with kblampp.schema, then rename into place.

    A schema problem here is a builder bug: nothing is renamed and the error names the temp line."""
    temps: list[tuple[Path, Path]] = []
    try:
        tmp_facts = _write_lines(Path(facts_path), result.facts)
        temps.append((tmp_facts, Path(facts_path)))
        _, problems = scan_facts(tmp_facts)
        if problems:
            raise BuildError("builder produced invalid facts:\n" + "\n".join(p.format(facts_path) for p in problems[:20]))
        if qa_path is not None:
            tmp_qa = _write_lines(Path(qa_path), result.qa)
            temps.append((tmp_qa, Path(qa_path)))
            _, problems = scan_qa(tmp_qa, num_facts=len(result.facts))
            if problems:
                raise BuildError("builder produced invalid QA:\n" + "\n".join(p.format(qa_path) for p in problems[:20]))
        for tmp, final in temps:
            os.replace(tmp, final)
        temps.clear()
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def finish(result: BuildResult, facts_path: str | Path, qa_path: str | Path | None, strict: bool,
           stream=None) -> int:
    """Report problems and tallies on stderr; strict + any bad record -> write nothing, return 1."""
    stream = stream or sys.stderr
    for problem in result.problems:
        print(problem.format(), file=stream)
    if strict and result.problems:
        print(f"--strict: {result.bad_records} bad record(s); nothing written", file=stream)
        return 1
    write_outputs(result, facts_path, qa_path)
    print(result.summary(), file=stream)
    print(f"wrote {facts_path}" + (f" and {qa_path}" if qa_path else ""), file=stream)
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def run_builder(build, args, qa: bool = True) -> int:
    """The body every builder script shares: `build()` -> BuildResult, then report and write it;
    a bad input file (BuildError, ValueError, OSError) is one clear error line and exit 2 (kblampp.cli)."""
    from kblampp.cli import report_error

    try:
        return finish(build(), args.out_facts, args.out_qa if qa else None, args.strict)
    except (BuildError, ValueError, OSError) as err:
        return report_error(err)


def add_common_args(parser, default_facts: str, default_qa: str | None) -> None:
    """--out_facts/--out_qa/--max_samples/--strict, the same in every builder script."""
    parser.add_argument("--out_facts", default=default_facts, help=f"5-tuple JSONL to write (default {default_facts})")
    if default_qa is not None:
        parser.add_argument("--out_qa", default=default_qa, help=f"QA JSONL to write (default {default_qa})")
    parser.add_argument("--max_samples", type=positive_int, default=None,
                        help="read at most this many input records (documents / questions)")
    parser.add_argument("--strict", action="store_true",
                        help="any bad record is an error: print them all, write nothing, exit 1")
