"""Fact validation limits (issue 15), one rule set for the server, the builders and the sanity checker:
name / evidence length, control and bidi-override characters, unpaired surrogates, unknown fields,
exact duplicates."""
from __future__ import annotations

import copy
import json

import pytest

from kblampp.builders.common import BuildError, BuildResult, write_outputs
from kblampp.sanity import main as sanity_main
from kblampp.schema import MAX_EVIDENCE_CHARS, MAX_NAME_CHARS, check_fact, scan_facts

GOOD = {"head": {"id": "E1", "name": "Ada Byron", "type": "PERSON"}, "relation": {"id": "R1", "name": "born in"},
        "tail": {"id": None, "name": "London", "type": None},
        "context": {"source": "test", "page_title": "Ada", "sent_span": "Ada Byron was born in London.",
                    "disamb": {"world": 0}, "ver": {"url": None, "rev_id": None}, "doc_id": "d1"},
        "time_window": {"start": "1815", "end": None, "source": "text"}}


def _with(path: str, value) -> dict:
    obj = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    target = obj
    for key in parents:
        target = target[key]
    target[last] = value
    return obj


CASES = [
    ("head.name", "x" * (MAX_NAME_CHARS + 1), f"head.name: too long ({MAX_NAME_CHARS + 1} > {MAX_NAME_CHARS} characters)"),
    ("context.sent_span", "y" * (MAX_EVIDENCE_CHARS + 1),
     f"context.sent_span: too long ({MAX_EVIDENCE_CHARS + 1} > {MAX_EVIDENCE_CHARS} characters)"),
    ("relation.name", "born\x00in", "relation.name: control character U+0000 at position 4"),
    ("tail.name", "Lon\ndon", "tail.name: control character U+000A at position 3"),
    ("tail.name", "\u202enodnoL", "tail.name: bidirectional control character U+202E at position 0"),
    ("head.name", "Ada \ud800", "head.name: unpaired surrogate U+D800 at position 4 (not valid Unicode)"),
    ("head.id", "E\x1b1", "head.id: control character U+001B at position 1"),
    ("context.page_title", "Ada\u2066", "context.page_title: bidirectional control character U+2066 at position 3"),
    ("context.disamb.country", "U\x07S", "context.disamb.country: control character U+0007 at position 1"),
    ("context.disamb", [1], "context.disamb: expected an object, got list"),
    ("context.ver.hash", "x", "context.ver.hash: unknown field (allowed: rev_id, url)"),
    ("comment", "x", "comment: unknown field (allowed: head, relation, tail, context, time_window)"),
    ("head.alias", "x", "head.alias: unknown field (allowed: id, name, type)"),
    ("relation.type", "x", "relation.type: unknown field (allowed: id, name)"),
    ("time_window.confidence", 0.9, "time_window.confidence: unknown field (allowed: end, source, start)"),
    ("context.source", {"a": 1}, "context.source: expected a string, number or null, got dict"),
]


def test_good_fact_passes():
    assert check_fact(GOOD, 1) == []
    assert check_fact(_with("head.name", "x" * MAX_NAME_CHARS), 1) == []
    assert check_fact(_with("tail.name", "Zürich \u200f\u05d0"), 1) == []  # marks and letters are fine


@pytest.mark.parametrize("path,value,message", CASES)
def test_each_limit_names_the_field(path, value, message):
    problems = [f"{p.field}: {p.reason}" for p in check_fact(_with(path, value), 7)]
    assert problems == [message]


def test_file_checker_rejects_the_same_facts_and_duplicates(tmp_path, capsys):
    path = tmp_path / "facts.jsonl"
    bad = _with("head.name", "Ada\x00")
    other = _with("tail.name", "Paris")
    path.write_text("\n".join(json.dumps(o) for o in (GOOD, bad, other, GOOD)) + "\n", encoding="utf-8")
    facts, problems = scan_facts(path)
    assert [p.format(path) for p in problems] == [f"{path}:2: head.name: control character U+0000 at position 3",
                                                  f"{path}:4: <line>: duplicate of the fact on line 1"]
    assert sanity_main([str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{path}:2: head.name: control character U+0000 at position 3",
                   f"{path}:4: <line>: duplicate of the fact on line 1", f"2 problem(s) in {path}"]


def test_builders_refuse_to_write_a_fact_over_the_limits(tmp_path):
    result = BuildResult()
    result.add_fact(copy.deepcopy(GOOD))
    result.add_fact(_with("context.sent_span", "z" * (MAX_EVIDENCE_CHARS + 1)))
    with pytest.raises(BuildError, match=r"facts.jsonl:2: context.sent_span: too long"):
        write_outputs(result, tmp_path / "facts.jsonl", None)
    assert list(tmp_path.iterdir()) == []  # nothing half written


def test_store_checker_reads_facts_with_the_same_rules(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_server import make_world

    world = make_world(tmp_path / "w")
    facts_path = world["store"] / "facts.jsonl"
    lines = facts_path.read_bytes().splitlines(keepends=True)
    obj = json.loads(lines[1])
    obj["head"]["name"] = "Ada\u202e"
    lines[1] = (json.dumps(obj, sort_keys=True) + "\n").encode("utf-8")
    lines[2] = lines[0]  # a live duplicate
    facts_path.write_bytes(b"".join(lines))
    assert sanity_main([str(world["store"])]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"{world['store']}:0: facts.jsonl:2: head.name: bidirectional control character U+202E at position 3",
                       f"{world['store']}:0: facts.jsonl:3: <line>: duplicate of the live fact on line 1"]
