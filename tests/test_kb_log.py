"""Write-ahead log: round trip, torn tails, corruption with file/line/field, idempotent replay."""
from __future__ import annotations

import json

import pytest

from kblampp.serving.kb_log import KBLog, KBLogError, LogEntry, encode_line, read_log, replay

FACT = {"head": {"id": "E1", "name": "Ada"}, "relation": {"id": "R1", "name": "born in"},
        "tail": {"id": None, "name": "Zürich"}, "context": {"sent_span": "Ada was born in Zürich."},
        "time_window": {"start": "1990", "end": None}}


def test_append_read_round_trip(tmp_path):
    log = KBLog(tmp_path / "wal.jsonl", next_seq=5)
    a = log.append("add", 10, [FACT, FACT])
    b = log.append("replace", 3, [FACT])
    c = log.append("delete", 4)
    log.close()
    entries, torn = read_log(tmp_path / "wal.jsonl")
    assert torn is False
    assert entries == [a, b, c]
    assert [e.seq for e in entries] == [5, 6, 7]
    assert entries[0].facts == [FACT, FACT] and entries[1].facts == [FACT] and entries[2].facts == []
    assert entries[0].facts[0]["tail"]["name"] == "Zürich"


def test_missing_log_is_empty(tmp_path):
    assert read_log(tmp_path / "none.jsonl") == ([], False)


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "wal.jsonl"
    good = encode_line(LogEntry(1, "delete", 2))
    torn = encode_line(LogEntry(2, "add", 7, [FACT]))[:-9]
    path.write_bytes(good + torn)
    entries, dropped = read_log(path)
    assert dropped is True
    assert entries == [LogEntry(1, "delete", 2)]


def test_corrupt_middle_line_names_file_line_field(tmp_path):
    path = tmp_path / "wal.jsonl"
    line = json.loads(encode_line(LogEntry(2, "delete", 9)))
    line["index"] = 8  # payload changed, crc not
    path.write_bytes(encode_line(LogEntry(1, "delete", 1)) + json.dumps(line).encode() + b"\n")
    with pytest.raises(KBLogError, match=r"wal\.jsonl:2: crc: checksum mismatch"):
        read_log(path)
    path.write_bytes(b"{not json\n" + encode_line(LogEntry(2, "delete", 1)))
    with pytest.raises(KBLogError, match=r"wal\.jsonl:1: <line>: not a valid JSON line"):
        read_log(path)


def test_sequence_gap_is_an_error(tmp_path):
    path = tmp_path / "wal.jsonl"
    path.write_bytes(encode_line(LogEntry(1, "delete", 1)) + encode_line(LogEntry(3, "delete", 2)))
    with pytest.raises(KBLogError, match=r"wal\.jsonl:2: seq: expected 2, got 3"):
        read_log(path)


def test_bad_op_and_fields(tmp_path):
    path = tmp_path / "wal.jsonl"
    with pytest.raises(ValueError, match="op: expected one of add, replace, delete, got 'upsert'"):
        KBLog(path, 1).append("upsert", 0)
    body = {"seq": 1, "op": "add", "index": 0, "facts": []}
    import zlib

    from kblampp.serving.kb_log import _canonical
    body["crc"] = zlib.crc32(_canonical(body))
    path.write_bytes(json.dumps(body).encode() + b"\n")
    with pytest.raises(KBLogError, match=r"wal\.jsonl:1: facts: expected a non-empty list of objects"):
        read_log(path)


def test_reset_truncates_and_keeps_appending(tmp_path):
    path = tmp_path / "wal.jsonl"
    log = KBLog(path, next_seq=1)
    log.append("delete", 1)
    log.reset()
    assert path.read_bytes() == b""
    log.append("delete", 2)
    log.close()
    entries, _ = read_log(path)
    assert entries == [LogEntry(2, "delete", 2)]
    assert not (tmp_path / "wal.jsonl.tmp").exists()


def test_replay_is_idempotent_by_sequence_number():
    entries = [LogEntry(s, "delete", s) for s in range(1, 6)]
    applied: list[int] = []
    last = replay(entries, 3, lambda e: applied.append(e.seq))
    assert last == 5 and applied == [4, 5]
    applied.clear()
    assert replay(entries, 5, lambda e: applied.append(e.seq)) == 5
    assert applied == []


def test_replay_refuses_a_gap_between_store_and_log():
    with pytest.raises(KBLogError, match="log resumes at 7 but the store has applied up to 4"):
        replay([LogEntry(7, "delete", 1)], 4, lambda e: None)
