"""kblampp.schema and kblampp.timewin: parsing, validation messages, round trips."""
from __future__ import annotations

import json
import math

import pytest

from kblampp.schema import Problem, SchemaError, check_fact, check_qa, iter_jsonl, load_facts, load_qa, scan_qa
from kblampp.timewin import days_to_iso, parse_date, window_days, year_of


def test_partial_dates_expand_to_first_and_last_day():
    assert parse_date("1970", as_end=False) == 0.0
    assert parse_date("1970", as_end=True) == 364.0
    assert parse_date("2000-02", as_end=False) == 10957.0 + 31
    assert parse_date("2000-02", as_end=True) == 11016.0  # 2000-02-29, a leap day
    assert parse_date("2019-03-02", as_end=True) == parse_date("2019-03-02", as_end=False) == 17957.0
    assert days_to_iso(17957.0) == "2019-03-02" and year_of(17957.0) == 2019


def test_open_ends_are_infinite_and_inverted_windows_rejected():
    assert window_days(None, None) == (-math.inf, math.inf)
    assert window_days("2019", None) == (17897.0, math.inf)
    assert days_to_iso(math.inf) is None
    with pytest.raises(ValueError, match=r"^end: window ends \(2018\) before it starts \(2019-03-02\)$"):
        window_days("2019-03-02", "2018")
    with pytest.raises(ValueError, match=r"^start: unparsable date 'March 2019' \(expected YYYY, YYYY-MM or YYYY-MM-DD\)$"):
        window_days("March 2019", None)
    with pytest.raises(ValueError, match=r"^end: unparsable date '2019-02-30' \(day is out of range for month\)$"):
        window_days(None, "2019-02-30")


def test_load_facts_round_trip(fixtures_dir):
    facts = load_facts(fixtures_dir / "good_5tuple.jsonl")
    assert [f.tail_name for f in facts] == ["Alice Zhang", "Bob Li", "Lakeport"]
    first = facts[0]
    assert (first.head_id, first.head_name, first.relation_name) == ("E001", "BrightSky Robotics", "chief executive officer")
    assert (first.start, first.end, first.tau_min, first.tau_max) == ("2019-03-02", None, 17957.0, math.inf)
    assert facts[1].tau_max == parse_date("2019-02", as_end=True)
    assert facts[2].tau_min == -math.inf
    raw_lines = (fixtures_dir / "good_5tuple.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.dumps(f.raw, ensure_ascii=False) for f in facts] == raw_lines


def test_load_qa_and_aliases(fixtures_dir):
    records = load_qa(fixtures_dir / "good_qa.jsonl", num_facts=3)
    assert [r.qid for r in records] == ["Q0001", "Q0002", "Q0003"]
    assert records[0].question_time == ("2015", "2015")
    assert records[0].tau == (parse_date("2015", as_end=False), parse_date("2015", as_end=True))
    assert records[1].supporting_facts == (0, 2)
    assert records[2].question_time is None and records[2].tau is None
    assert records[2].aliases == ["Lakeport", "Lakeport town"]


def _fact(**changes):
    obj = {"head": {"id": "E1", "name": "A"}, "relation": {"id": "R1", "name": "r"}, "tail": {"id": None, "name": "B"},
           "context": {"sent_span": "A r B."}, "time_window": {"start": None, "end": None}}
    obj.update(changes)
    return obj


@pytest.mark.parametrize("changes, expected", [
    ({"head": "A"}, [Problem(4, "head", "expected an object, got str")]),
    ({"tail": {"id": None, "name": "   "}}, [Problem(4, "tail.name", "empty name")]),
    ({"relation": {"id": 7, "name": "r"}}, [Problem(4, "relation.id", "expected a string or null, got int")]),
    ({"head": {"id": "E1"}}, [Problem(4, "head.name", "missing field")]),
    ({"context": {"sent_span": " "}}, [Problem(4, "context.sent_span", "empty evidence sentence")]),
    ({"time_window": {"start": 2019, "end": None}},
     [Problem(4, "time_window.start", "expected a date string or null, got int")]),
    ({"time_window": {"start": "2020"}}, [Problem(4, "time_window.end", "missing field")]),
])
def test_check_fact_problems(changes, expected):
    assert check_fact(_fact(**changes), 4) == expected


def test_check_fact_missing_fields_and_valid():
    assert check_fact(_fact(), 1) == []
    obj = _fact()
    del obj["relation"], obj["time_window"]
    assert check_fact(obj, 2) == [Problem(2, "relation", "missing field"), Problem(2, "time_window", "missing field")]
    assert check_fact([1], 3) == [Problem(3, "<line>", "expected a JSON object, got list")]


def test_check_qa_problems():
    good = {"qid": "q", "dataset": "d", "question": "Q?", "answer": "A", "type": "temporal",
            "supporting_facts": [0, 2], "question_time": {"start": "2019", "end": "2018"}}
    assert check_qa(good, 5, num_facts=2) == [
        Problem(5, "supporting_facts", "index 2 out of range (0..1)"),
        Problem(5, "question_time.end", "window ends (2018) before it starts (2019)"),
    ]
    bad = {"qid": 3, "dataset": "d", "question": " ", "type": "open", "supporting_facts": ["0"], "question_time": None}
    assert check_qa(bad, 1) == [
        Problem(1, "qid", "expected a string, got int"), Problem(1, "question", "empty string"),
        Problem(1, "answer", "missing field"), Problem(1, "type", "'open' is not one of single-hop, multi-hop, temporal, unanswerable"),
        Problem(1, "supporting_facts", "expected a list of integers"),
    ]
    assert check_qa({**good, "supporting_facts": [-1], "question_time": None}, 1) == [
        Problem(1, "supporting_facts", "index -1 out of range (>= 0)")]


def test_iter_jsonl_bad_lines(write_lines):
    path = write_lines("x.jsonl", ['{"a": 1}', '{"a": ', b'{"a": "\xff"}', "", "{'a': 1}"])
    got = [(line, obj, problem) for line, obj, problem in iter_jsonl(path)]
    assert got == [
        (1, {"a": 1}, None),
        (2, None, Problem(2, "<line>", "truncated JSON (Expecting value at column 7)")),
        (3, None, Problem(3, "<line>", "not valid UTF-8 (byte 7)")),
        (5, None, Problem(5, "<line>", "invalid JSON (Expecting property name enclosed in double quotes at column 2)")),
    ]
    assert list(iter_jsonl(path, allow_blank=False))[3] == (
        4, None, Problem(4, "<line>", "blank line (a fact's index is its line number)"))


def test_load_errors_list_every_problem(write_lines, fixtures_dir):
    good = (fixtures_dir / "good_5tuple.jsonl").read_text(encoding="utf-8").splitlines()
    path = write_lines("f.jsonl", [good[0], "", json.dumps(_fact(head={"id": "E1", "name": ""}))])
    with pytest.raises(SchemaError) as info:
        load_facts(path)
    assert str(info.value) == (f"{path}:2: <line>: blank line (a fact's index is its line number)\n"
                               f"{path}:3: head.name: empty name")
    assert len(info.value.problems) == 2


def test_duplicate_qid(write_lines, fixtures_dir):
    lines = (fixtures_dir / "good_qa.jsonl").read_text(encoding="utf-8").splitlines()
    path = write_lines("qa.jsonl", [lines[0], lines[1], lines[0]])
    records, problems = scan_qa(path, num_facts=3)
    assert [r.qid for r in records] == ["Q0001", "Q0002"]
    assert problems == [Problem(3, "qid", "duplicate qid 'Q0001' (first on line 1)")]


UNANS = {"qid": "u", "dataset": "d", "question": "Where was Nobody Here born?", "answer": "no answer",
         "type": "unanswerable", "supporting_facts": [], "question_time": None, "answer_fact": None,
         "family": "unans_entity", "answerable": False, "time_constraint": None,
         "unanswerable_reason": "entity_missing", "near_miss_facts": [1]}


def test_family_fields_of_an_unanswerable_record_pass():
    assert check_qa(UNANS, 3, num_facts=2) == []
    timed = {**UNANS, "family": "unans_time", "unanswerable_reason": "time_outside",
             "time_constraint": {"kind": "at", "start": "1990", "end": "1990", "anchor": None}}
    assert check_qa(timed, 3, num_facts=2) == []


@pytest.mark.parametrize("change,expected", [
    ({"family": "sideways"}, [("family", "'sideways' is not a known family")]),
    ({"family": "single_hop"}, [("family", "'single_hop' is a single-hop family, but type is 'unanswerable'")]),
    ({"answerable": "no"}, [("answerable", "expected true or false, got str")]),
    ({"answerable": True}, [("answerable", "True does not fit type 'unanswerable'"),
                            ("unanswerable_reason", "only unanswerable records carry it"),
                            ("near_miss_facts", "only unanswerable records carry it")]),
    ({"unanswerable_reason": "shy"}, [("unanswerable_reason",
                                       "'shy' is not one of entity_missing, relation_missing, time_outside")]),
    ({"unanswerable_reason": "time_outside"}, [("unanswerable_reason",
                                                "'time_outside' does not fit family 'unans_entity'")]),
    ({"supporting_facts": [0]}, [("supporting_facts", "must be empty on an unanswerable record")]),
    ({"answer_fact": 0}, [("answer_fact", "must be null on an unanswerable record")]),
    ({"near_miss_facts": [0, 9]}, [("near_miss_facts", "index 9 out of range (0..1)")]),
    ({"near_miss_facts": "1"}, [("near_miss_facts", "expected a list of integers")]),
    ({"time_constraint": {"kind": "soon", "start": None, "end": None}},
     [("time_constraint.kind", "'soon' is not one of at, between, before, after, just_before, right_after, "
                               "first, last, current, relative")]),
    ({"time_constraint": {"kind": "at", "start": "1999", "end": "1990", "anchor": None}},
     [("time_constraint.end", "window ends (1990) before it starts (1999)")]),
    ({"time_constraint": {"kind": "relative", "start": None, "end": None, "anchor": 5}},
     [("time_constraint.anchor", "expected a string or null")]),
    ({"time_constraint": "1990"}, [("time_constraint", "expected an object or null, got str")]),
])
def test_family_field_problems_name_the_field(change: dict, expected: list) -> None:
    got = check_qa({**UNANS, **change}, 7, num_facts=2)
    assert [(p.field, p.reason) for p in got] == expected
    assert all(p.line == 7 for p in got)


def test_family_problems_print_path_line_field(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(UNANS) + "\n" + json.dumps({**UNANS, "qid": "v", "family": "nope"}) + "\n",
                    encoding="utf-8")
    with pytest.raises(SchemaError) as err:
        load_qa(path, num_facts=2)
    assert str(err.value) == f"{path}:2: family: 'nope' is not a known family"
    records = scan_qa(path, num_facts=2)[0]
    assert records[0].answerable is False and records[0].family == "unans_entity"
