"""TimeQA builder: own fixture in the real shape (plain and gzipped), the real sample, the CLI."""
from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

from kblampp.builders.timeqa import (build_timeqa, evidence_sentence, load_timeqa_relations, page_name,
                                     sentence_ends)
from kblampp.builders.common import finish
from kblampp.question_time import parse_question_time
from kblampp.sanity import check_5tuple_file, check_qa_file
from kblampp.schema import load_facts, load_qa

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "real_shapes" / "timeqa_sample.jsonl"
REAL = ROOT.parent / "shared" / "data" / "real"


def test_page_name_and_sentences() -> None:
    assert page_name("Alan_Bar%C3%B3") == "Alan Baró"
    assert page_name("Newton_D._Baker_House") == "Newton D. Baker House"
    text = "Built in 1794 by Maj . George Peter . He sold it . Then John F . Kennedy , Jr . lived there ."
    assert [text[:e] for e in sentence_ends(text)][:2] == [
        "Built in 1794 by Maj . George Peter .", "Built in 1794 by Maj . George Peter . He sold it ."]
    lo = text.index("George")
    assert evidence_sentence(text, lo, lo + 11) == "Built in 1794 by Maj . George Peter ."
    lo = text.index("John")
    assert evidence_sentence(text, lo, lo + len("John F . Kennedy , Jr .")) == "Then John F . Kennedy , Jr . lived there ."
    long = "x " * 300 + "Anna Berg" + " y" * 300
    lo = long.index("Anna")
    window = evidence_sentence(long, lo, lo + 9, max_chars=41)
    assert window == "x x x x x x x Anna Berg y y y y y y y" and len(window) <= 41


def _check_fixture(result, path: Path) -> None:
    assert [(f["tail"]["name"], f["context"]["sent_span"], f["time_window"]) for f in result.facts] == [
        ("Tom Reed", "Maj . Tom Reed , a former sailor , coached the club until 1990 , when Anna Berg took over .",
         {"start": "1980", "end": "1990", "source": "question_time"}),
        ("Anna Berg", "Maj . Tom Reed , a former sailor , coached the club until 1990 , when Anna Berg took over .",
         {"start": "1992-03", "end": "1992-03", "source": "question_time"}),
        ("Lee Park", "In 1995 , Lee Park and Sam Ode shared the role .", {"start": "1995", "end": "1996", "source": "question_time"}),
        ("Sam Ode", "In 1995 , Lee Park and Sam Ode shared the role .", {"start": "1995", "end": "1996", "source": "question_time"}),
        ("Tom Reed", "Coaches . - 1980-1990 - Tom Reed , - 1990-1995 - Anna Berg", {"start": "1987", "end": "1989", "source": "question_time"}),
        ("Anna Berg", "Coaches . - 1980-1990 - Tom Reed , - 1990-1995 - Anna Berg", {"start": None, "end": None, "source": "none"}),
    ]
    fact = result.facts[0]
    assert fact["head"] == {"id": "enwiki:Larkspur_Rovers", "name": "Larkspur Rovers", "type": None}
    assert fact["relation"] == {"id": "P286", "name": "head coach"}
    assert fact["context"]["source"] == "timeqa" and fact["context"]["page_title"] == "Larkspur Rovers"
    assert [(q["qid"][-1], q["answer"], q["answer_aliases"], q["supporting_facts"], q["answer_fact"], q["question_time"])
            for q in result.qa] == [
        ("0", "Tom Reed", [], [0], 0, {"start": "1980", "end": "1990"}),
        ("1", "Anna Berg", [], [1], 1, {"start": "1992-03", "end": "1992-03"}),
        ("2", "Lee Park", ["Sam Ode"], [3, 2], 2, {"start": "1995", "end": "1996"}),
        ("4", "Tom Reed", [], [4], 4, {"start": "1987", "end": "1989"}),
        ("5", "Anna Berg", [], [5], 5, None),
    ]
    assert all(q["type"] == "temporal" and q["dataset"] == "timeqa" for q in result.qa)
    assert [p.format() for p in result.problems] == [
        f"{path}:4: from[0]/end[0]: context there is 'pur Rove', not the target 'Tom Reed'",
        f"{path}:6: idx: 'Larkspur_Rovers-P286-7' is not /wiki/<page>#<PID>#<k>",
        f"{path}:8: from/end: lengths differ: targets 1, from 2, end 1",
        f"{path}:10: idx: duplicate idx '/wiki/Larkspur_Rovers#P286#0' (first at line 1)",
        f"{path}:11: <line>: truncated JSON (Invalid control character at at column 45)",
    ]
    assert (result.records_read, result.bad_records) == (11, 5)
    assert result.notes["unanswerable questions (targets ['']) skipped"] == 1


def test_fixture_plain_and_gzipped(tmp_path: Path) -> None:
    _check_fixture(build_timeqa([FIX]), FIX)
    gz = tmp_path / "sample.json.gzip"  # TimeQA's own suffix: gzip is found by its magic bytes
    gz.write_bytes(gzip.compress(FIX.read_bytes()))
    _check_fixture(build_timeqa([gz]), gz)


def test_keep_unanswerable_and_max_samples() -> None:
    result = build_timeqa([FIX], keep_unanswerable=True)
    kept = [q for q in result.qa if not q["answerable"]]
    assert [(q["qid"], q["answer"], q["supporting_facts"], q["question_time"]) for q in kept] == [
        ("/wiki/Larkspur_Rovers#P286#3", "unanswerable", [], {"start": "2011", "end": None})]
    assert "answer_fact" not in kept[0]
    result = build_timeqa([FIX], max_samples=2)
    assert result.records_read == 2 and [q["answer"] for q in result.qa] == ["Tom Reed", "Anna Berg"]


def test_truncated_gzip_is_reported(tmp_path: Path) -> None:
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(FIX.read_bytes())[:-30])
    result = build_timeqa([gz])
    assert result.problems[-1].field == "<file>"
    assert result.problems[-1].reason.startswith("truncated or corrupt compressed stream")


def test_non_object_and_missing_fields(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "Who in 1990?"}\n"text"\n{"idx": "/wiki/A#P1#0", "question": " ", "context": "c"}\n',
                    encoding="utf-8")
    assert [p.format() for p in build_timeqa([path]).problems] == [
        f"{path}:1: idx: missing field", f"{path}:2: <record>: expected a JSON object, got str",
        f"{path}:3: question: empty string"]
    good = FIX.read_bytes().splitlines(keepends=True)[0]
    path.write_bytes(b'{"idx": "caf\xe9"}\n' + good)
    result = build_timeqa([path])
    assert [p.format() for p in result.problems] == [f"{path}:1: <line>: not valid UTF-8 (byte 12)"]
    assert [q["answer"] for q in result.qa] == ["Tom Reed"] and result.records_read == 2


def test_real_sample(tmp_path: Path) -> None:
    labels = load_timeqa_relations(REAL / "timeqa_relations.json")
    assert len(labels) == 102 and labels["P54"] == "member of sports team"
    result = build_timeqa([REAL / "timeqa_human_train.easy.jsonl.gz"], relation_labels=labels)
    assert (result.records_read, result.bad_records) == (1171, 0)
    assert len(result.qa) == 982 and len(result.facts) == 1077
    assert result.notes["unanswerable questions (targets ['']) skipped"] == 189
    # "After the season 2018/2019, ..." parses since seasons are periods: 3 -> 2
    assert result.notes["questions with no parsable time (open window, question_time null)"] == 2
    facts_path, qa_path = tmp_path / "f.jsonl", tmp_path / "q.jsonl"
    assert finish(result, facts_path, qa_path, strict=True, stream=open(tmp_path / "log", "w")) == 0
    facts = load_facts(facts_path)
    qa = load_qa(qa_path, num_facts=len(facts))
    assert check_qa_file(qa_path, {"facts": facts_path}).problems == []
    assert check_5tuple_file(facts_path, {}).problems == []
    first = qa[0]
    assert (first.qid, first.answer, first.question_time) == (
        "/wiki/Newton_D._Baker_House#P466#0", "George Peter", ("1811", "1827"))
    for record in qa:
        assert record.supporting_facts[-1] == record.raw["answer_fact"]
        fact = facts[record.raw["answer_fact"]]
        assert fact.tail_name == record.answer and fact.tail_name in fact.sentence
        assert fact.relation_id == record.raw["relation_id"] and fact.relation_name == labels[fact.relation_id]
        assert (fact.start, fact.end) == (record.question_time or (None, None))
        assert record.question_time == parse_question_time(record.question)


def test_cli(tmp_path: Path) -> None:
    facts, qa = tmp_path / "f.jsonl", tmp_path / "q.jsonl"
    script = str(ROOT / "offline" / "build_5tuple_from_timeqa.py")
    proc = subprocess.run([sys.executable, script, str(FIX), "--out_facts", str(facts), "--out_qa", str(qa)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "bad records: 5" in proc.stderr and "qa written: 5" in proc.stderr
    assert len(load_qa(qa, num_facts=len(load_facts(facts)))) == 5
    facts.unlink(), qa.unlink()
    proc = subprocess.run([sys.executable, script, str(FIX), "--out_facts", str(facts), "--out_qa", str(qa), "--strict"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and not facts.exists() and not qa.exists()
    assert f"{FIX}:6: idx: 'Larkspur_Rovers-P286-7' is not /wiki/<page>#<PID>#<k>" in proc.stderr
    assert "--strict: 5 bad record(s); nothing written" in proc.stderr
