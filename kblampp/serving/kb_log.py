"""Write-ahead log of live KB changes: one fsynced JSON line per acknowledged change.

Why: the store's own persistence rewrites whole arrays atomically, too slow per request; the log makes
each change durable in one small append before the HTTP reply. On start the server (the one holding
the store's writer lock; a read-only server never opens the log) replays the log into memory
(entries with seq <= the store's applied seq are skipped, so replay is idempotent), folds it into the
store in one atomic commit, then truncates the log atomically (temp file + os.replace).

Line format: `{"seq": int, "op": "add"|"replace"|"delete", "index": int, "facts": [..] | "fact": {..},
"crc": int}` where crc is the CRC32 of the line's JSON without the crc field. A torn last line (crash in
the middle of a write, never acknowledged) is dropped; a bad line anywhere else is an error.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

OPS = ("add", "replace", "delete")


class KBLogError(ValueError):
    """A corrupt write-ahead log; the message names file, line and field."""


@dataclass(frozen=True)
class LogEntry:
    """One acknowledged change. `add` carries `facts` (placed at index, index+1, ...); `replace` one fact."""

    seq: int
    op: str
    index: int
    facts: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        body: dict = {"seq": self.seq, "op": self.op, "index": self.index}
        if self.op == "add":
            body["facts"] = self.facts
        elif self.op == "replace":
            body["fact"] = self.facts[0]
        return body


def _canonical(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_line(entry: LogEntry) -> bytes:
    """The entry's log line (with CRC and trailing newline)."""
    body = entry.to_json()
    body["crc"] = zlib.crc32(_canonical(body))
    return _canonical(body) + b"\n"


def _parse(obj: object, where: str) -> LogEntry:
    """Check one decoded line; raise KBLogError naming `where` and the field."""
    if not isinstance(obj, dict):
        raise KBLogError(f"{where}: <line>: expected a JSON object")
    crc = obj.pop("crc", None)
    if not isinstance(crc, int) or zlib.crc32(_canonical(obj)) != crc:
        raise KBLogError(f"{where}: crc: checksum mismatch (corrupt entry)")
    for key in ("seq", "index"):
        if not isinstance(obj.get(key), int) or isinstance(obj.get(key), bool) or obj[key] < 0:
            raise KBLogError(f"{where}: {key}: expected a non-negative integer")
    op = obj.get("op")
    if op not in OPS:
        raise KBLogError(f"{where}: op: expected one of {', '.join(OPS)}, got {op!r}")
    if op == "add":
        facts = obj.get("facts")
        if not isinstance(facts, list) or not facts or not all(isinstance(f, dict) for f in facts):
            raise KBLogError(f"{where}: facts: expected a non-empty list of objects")
    elif op == "replace":
        if not isinstance(obj.get("fact"), dict):
            raise KBLogError(f"{where}: fact: expected an object")
        facts = [obj["fact"]]
    else:
        facts = []
    return LogEntry(seq=obj["seq"], op=op, index=obj["index"], facts=facts)


def read_log(path: str | Path) -> tuple[list[LogEntry], bool]:
    """Entries of a log file in order, and whether a torn last line was dropped.

    Sequence numbers must increase by one from line to line; any other defect is a KBLogError."""
    path = Path(path)
    if not path.exists():
        return [], False
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = False
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:  # no newline at the end: the last write was cut off (never acknowledged)
        lines.pop()
        torn = True
    entries: list[LogEntry] = []
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise KBLogError(f"{where}: <line>: not a valid JSON line ({err})") from None
        entry = _parse(obj, where)
        if entries and entry.seq != entries[-1].seq + 1:
            raise KBLogError(f"{where}: seq: expected {entries[-1].seq + 1}, got {entry.seq}")
        entries.append(entry)
    return entries, torn


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KBLog:
    """Append-only log file; `append` returns only after the line is on disk (fsync)."""

    def __init__(self, path: str | Path, next_seq: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.next_seq = next_seq
        self._fh = open(self.path, "ab")
        _fsync_dir(self.path.parent)

    def append(self, op: str, index: int, facts: Iterable[dict] = ()) -> LogEntry:
        """Write one entry durably and return it (with its sequence number)."""
        entry = LogEntry(seq=self.next_seq, op=op, index=index, facts=list(facts))
        if op not in OPS:
            raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
        self._fh.write(encode_line(entry))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.next_seq += 1
        return entry

    def reset(self) -> None:
        """Atomically replace the log with an empty file (after the store holds every entry)."""
        self._fh.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._fh = open(self.path, "ab")

    def close(self) -> None:
        self._fh.close()


def replay(entries: list[LogEntry], applied_seq: int, apply: Callable[[LogEntry], None]) -> int:
    """Apply entries with seq > applied_seq in order; return the last seq now reflected in the state."""
    last = applied_seq
    for entry in entries:
        if entry.seq <= applied_seq:
            continue
        if entry.seq != last + 1:
            raise KBLogError(f"seq: log resumes at {entry.seq} but the store has applied up to {last} "
                             "(a change is missing)")
        apply(entry)
        last = entry.seq
    return last


def default_audit_path(wal_path: str | Path) -> Path:
    """`<store>.audit.jsonl` beside `<store>.wal.jsonl` (or `<wal name>.audit.jsonl`)."""
    wal_path = Path(wal_path)
    name = wal_path.name
    stem = name[:-len(".wal.jsonl")] if name.endswith(".wal.jsonl") else name
    return wal_path.with_name(f"{stem}.audit.jsonl")


class AuditLog:
    """Append-only audit trail, one JSON line per acknowledged change:
    `{"time": ISO-8601 UTC, "seq": int, "op": str, "indices": [int], "client": "host:port" | null}`.

    Why separate from the WAL: the WAL is truncated at every compaction, the audit trail never is.
    It never holds the token, the request body or the fact text (only which fact indices changed)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")

    def write(self, seq: int, op: str, indices: list[int], client: str | None) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        line = {"time": stamp, "seq": seq, "op": op, "indices": [int(i) for i in indices], "client": client}
        self._fh.write((json.dumps(line, sort_keys=True) + "\n").encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
