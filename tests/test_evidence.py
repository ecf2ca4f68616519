"""Evidence JSON (plan 7.2): entry fields, ordering by alpha, round trip, validation errors."""
from __future__ import annotations

import json

import pytest

from kblampp.evaluation.evidence import EvidenceError, evidence_entry, read_evidence, write_evidence
from kblampp.evaluation.kbqa import LastTokenRecord
from kblampp.schema import fact_from_dict, qa_from_dict
from kblampp.training.toy import toy_facts, toy_qa


@pytest.fixture
def world():
    raw = toy_facts(3)
    return [fact_from_dict(f) for f in raw], [qa_from_dict(q) for q in toy_qa(raw, range(3), "q")]


def test_entry_has_plan_fields_sorted_by_alpha(world):
    facts, records = world
    rec = records[1]  # temporal: Who employed Ann P00 in 2005? -> fact 1
    last = LastTokenRecord(cand_ids=[2, 1, -1, 4], alpha=[0.2, 0.7, 0.0, 0.1], beta=0.25, layer=8, copy_gate=0.9)
    e = evidence_entry(rec, "Acme", last, facts, output="Acme")
    assert list(e)[:6] == ["qid", "dataset", "question", "answer", "pred_answer", "top_k_facts"]
    assert [f["index"] for f in e["top_k_facts"]] == [1, 2, 4]
    assert e["top_k_facts"][0] == {"index": 1, "head": "Ann P00", "relation": "employer", "tail": "Acme",
                                   "context": "Ann P00 worked for Acme.", "time_window": ["2001", "2010"],
                                   "alpha": 0.7}
    assert e["top_k_facts"][1]["time_window"] == ["2011", None]
    assert (e["answer"], e["pred_answer"], e["beta"], e["layer"], e["copy_gate"]) == ("Acme", "Acme", 0.25, 8, 0.9)
    assert e["question_time"] == ["2005", "2005"] and e["supporting_facts"] == [1] and e["answer_fact"] == 1


def test_entry_rejects_unknown_fact(world):
    facts, records = world
    with pytest.raises(IndexError, match="candidate fact 99 out of range"):
        evidence_entry(records[0], "x", LastTokenRecord([99], [1.0], 0.0, 1), facts)


def test_write_read_round_trip(tmp_path, world):
    facts, records = world
    entries = [evidence_entry(r, "x", LastTokenRecord([0, 3], [0.6, 0.4], 0.1, 1), facts) for r in records[:2]]
    path = write_evidence(tmp_path / "sub" / "evidence.json", entries)
    assert read_evidence(path) == json.loads(json.dumps(entries))
    assert not [p for p in path.parent.iterdir() if p.name != "evidence.json"]  # no temp files left


@pytest.mark.parametrize("content, message", [
    ("{}", "expected a JSON list"),
    ("[1]", "entry 0: expected an object"),
    ('[{"qid": "a"}]', "entry 0: dataset: missing field"),
    ('[{"qid":"a","dataset":"d","question":"q","answer":"a","pred_answer":"p","top_k_facts":[{"index":1}]}]',
     r"entry 0: top_k_facts\[0\].head: missing field"),
    ('[{"qid":"a","dataset":"d","question":"q","answer":"a","pred_answer":"p","top_k_facts":[{"index":1,'
     '"head":"h","relation":"r","tail":"t","context":"c","time_window":[null,null],"alpha":"high"}]}]',
     r"top_k_facts\[0\].alpha: expected a finite number"),
    ("[", "not valid JSON"),
])
def test_read_evidence_errors(tmp_path, content, message):
    path = tmp_path / "evidence.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EvidenceError, match=message):
        read_evidence(path)


def test_read_evidence_missing_file(tmp_path):
    with pytest.raises(EvidenceError, match="evidence file not found"):
        read_evidence(tmp_path / "nope.json")


def test_collect_evidence_on_built_world(tmp_path):
    from eval_world import build_world
    from kblampp.evaluation.runner import collect_evidence

    ec = build_world(tmp_path)
    from kblampp.schema import load_qa

    records = load_qa(tmp_path / "test.jsonl")
    entries = collect_evidence(ec, records, "kblampp", batch_size=2, progress=False)
    assert [e["qid"] for e in entries] == [r.qid for r in records]
    for e, r in zip(entries, records):
        assert e["pred_answer"] == r.answer and e["top_k_facts"][0]["index"] == r.supporting_facts[-1]
        alphas = [f["alpha"] for f in e["top_k_facts"]]
        assert alphas == sorted(alphas, reverse=True) and abs(sum(alphas) - 1.0) < 1e-4
        assert e["copy_gate"] > 0.99 and e["layer"] == 1
    path = write_evidence(tmp_path / "evidence.json", entries)
    assert read_evidence(path) == json.loads(json.dumps(entries))
    with pytest.raises(ValueError, match="row: 'backbone' is not a KBLaM"):
        collect_evidence(ec, records, "backbone")


def test_entry_shows_the_parsed_constraint_and_whether_each_window_satisfies_it(world):
    from kblampp.time_query import question_times

    facts, records = world
    rec = records[1]  # Who employed Ann P00 in 2005? facts 1 (2001-2010) and 2 (2011-) are her employers
    times = question_times([rec.question])
    last = LastTokenRecord(cand_ids=[2, 1, 0], alpha=[0.2, 0.7, 0.1], beta=0.25, layer=8)
    e = evidence_entry(rec, "Acme", last, facts, time=times.row(0))
    assert e["time_constraint"] == {"parsed": {"kind": "at", "start": "2005", "end": "2005", "anchor": None},
                                    "anchor_fact": None,
                                    "used": {"kind": "at", "start": "2005", "end": "2005", "anchor": None}}
    sat = {f["index"]: f["satisfies_time"] for f in e["top_k_facts"]}
    assert (sat[1], sat[2], sat[0]) == (True, False, False)  # 2001-2010 yes; 2011- and born 1980 no
    assert "satisfies_time" not in evidence_entry(rec, "Acme", last, facts)["top_k_facts"][0]
