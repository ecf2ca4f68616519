"""KB-edit check: edits go into a copy of the store (original untouched) and answers follow the new tail."""
from __future__ import annotations

import json

import pytest

from kblampp.evaluation.kb_edit import edited_fact, markdown_kb_edit, plan_edits, run_kb_edit
from kblampp.schema import load_qa
from eval_world import build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kbedit")
    return tmp, build_world(tmp)


def test_plan_edits_same_relation_other_tail(world):
    tmp, ec = world
    records = load_qa(tmp / "test.jsonl")
    edits = plan_edits(records, ec.facts, n=10, seed=0)
    assert len(edits) == 2  # two single-hop questions in the test split
    for e in edits:
        fact = ec.facts[e.fact_index]
        assert e.old_tail == fact.tail_name and e.new_tail != e.old_tail
        assert e.new_tail in {f.tail_name for f in ec.facts if f.relation_name == fact.relation_name}
    assert plan_edits(records, ec.facts, n=10, seed=0) == edits  # seeded
    assert plan_edits(records, ec.facts, n=1, seed=0) == edits[:1]


def test_edited_fact_rewrites_tail_and_sentence(world):
    _, ec = world
    obj = edited_fact(ec.facts[0].raw, "Narnia")
    assert obj["tail"]["name"] == "Narnia" and obj["tail"]["id"] is None
    assert obj["context"]["sent_span"] == "Ann P00 was born in Narnia."
    assert ec.facts[0].raw["tail"]["name"] == "Oslo"  # the original is not mutated


def test_kb_edit_answers_follow_new_tail_and_original_store_untouched(world):
    tmp, ec = world
    before_bytes = {p.name: p.read_bytes() for p in (tmp / "store").rglob("*") if p.is_file()}
    records = load_qa(tmp / "test.jsonl")
    result = run_kb_edit(ec, records, n=5, batch_size=2, seed=0, workdir=tmp, progress=False)
    assert result["row"] == "kblampp" and result["n_edits"] == 2
    assert result["before_em"] == 1.0 and result["follow_new"] == 1.0 and result["still_old"] == 0.0
    for row in result["edits"]:
        assert row["pred_before"] == row["old_tail"] and row["pred_after"] == row["new_tail"]
    after_bytes = {p.name: p.read_bytes() for p in (tmp / "store").rglob("*") if p.is_file()}
    assert after_bytes == before_bytes
    assert not [p for p in tmp.iterdir() if p.name.startswith("tmp")]  # the copy is gone
    text = markdown_kb_edit(result)
    assert "NEW tail 100.0%" in text and "still the old tail 0.0%" in text
    json.dumps(result)  # JSON-serialisable


def test_kb_edit_without_single_hop_questions(world):
    tmp, ec = world
    temporal = [r for r in load_qa(tmp / "test.jsonl") if r.type == "temporal"]
    result = run_kb_edit(ec, temporal, n=5, progress=False)
    assert result["n_edits"] == 0 and "not run" in markdown_kb_edit(result)
