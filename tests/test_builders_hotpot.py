"""HotpotQA builder: the extraction rule, both record shapes, bad records, the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kblampp.builders.common import finish
from kblampp.builders.hotpot import build_hotpot, extract
from kblampp.sanity import check_qa_file
from kblampp.schema import load_facts, load_qa

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "real_shapes"
LIST, DICTS = FIX / "hotpot_list.json", FIX / "hotpot_dict_of_lists.jsonl"


@pytest.mark.parametrize("title,sentence,answer,titles,expected", [
    ("Helen Marsh", "Helen Marsh (born March 3, 1931) was an American architect born in Duluth, Minnesota.", "Duluth",
     ["Larkspur Tower", "Helen Marsh"], ("was an American architect born in", "Duluth", None, "answer")),
    ("Larkspur Tower", "It was designed by Helen Marsh and completed in 1974.", "Duluth",
     ["Larkspur Tower", "Helen Marsh"], ("was designed by", "Helen Marsh", "Helen Marsh", "bridge")),
    ("Helen Marsh", "Helen Marsh (born March 3, 1931) was an American architect.", "no",
     ["Helen Marsh", "Oskar Lind"], ("born", "March 3, 1931", None, "date")),
    ("Oskar Lind", "Oskar Lind was a Swedish painter of coastal landscapes.", "no", ["Oskar Lind"],
     ("description", "was a Swedish painter of coastal landscapes", None, "description")),
    ("Brandt House", "Brandt House was completed in 1902.", "Brandt House", ["Brandt House"],
     ("was completed in", "1902", None, "date")),  # the answer is the head itself: not a tail
    ("Racine", "The Root River flows through Racine.", "root river", ["Racine"],
     ("mentions", "Root River", None, "answer")),  # tail before the head: no relation words
])
def test_extraction_rule(title, sentence, answer, titles, expected) -> None:
    assert extract(title, sentence, answer, titles) == expected


def test_list_and_dict_of_lists_shapes() -> None:
    result = build_hotpot([LIST, DICTS])
    rows = [(f["head"]["name"], f["relation"]["name"], f["tail"]["name"], f["tail"]["id"], f["context"]["extraction_rule"])
            for f in result.facts]
    assert rows == [
        ("Larkspur Tower", "was designed by", "Helen Marsh", "enwiki:Helen_Marsh", "bridge"),
        ("Helen Marsh", "was an American architect born in", "Duluth", None, "answer"),
        ("Helen Marsh", "born", "March 3, 1931", None, "date"),
        ("Oskar Lind", "description", "was a Swedish painter of coastal landscapes", None, "description"),
        ("Larkspur Tower", "was designed by Helen Marsh and completed in", "1974", None, "date"),
        ("Brandt House", "was completed in", "1902", None, "date"),
        ("Brandt House", "was completed in 1902 in", "Racine", "enwiki:Racine", "bridge"),
        ("Racine", "mentions", "Root River", None, "answer"),
    ]
    first = result.facts[0]
    assert first["head"]["id"] == "enwiki:Larkspur_Tower"
    assert first["context"]["sent_span"] == "It was designed by Helen Marsh and completed in 1974."
    assert first["context"]["source"] == "hotpot" and first["time_window"] == {"start": None, "end": None, "source": "none"}
    assert [(q["qid"], q["answer"], q["supporting_facts"], q.get("answer_fact"), q["hotpot_type"]) for q in result.qa] == [
        ("hp-bridge-1", "Duluth", [0, 1], 1, "bridge"),
        ("hp-comparison-1", "no", [2, 3], None, "comparison"),
        ("hp-comparison-2", "Brandt House", [4, 5], None, "comparison"),
        ("hf-1", "Root River", [6, 7], 7, "bridge"),
    ]
    assert all(q["type"] == "multi-hop" and q["question_time"] is None for q in result.qa)
    assert [p.format() for p in result.problems] == [
        f"{LIST}:record 3: supporting_facts[0]: sentence 3 out of range (paragraph 'Brandt House' has 1)",
        f"{LIST}:record 4: supporting_facts[0]: title 'Brandt Hall' is not in the context",
        f"{LIST}:record 5: answer: missing field",
        f"{LIST}:record 6: _id/id: duplicate id 'hp-bridge-1' (first at record 0)",
        f"{DICTS}:2: supporting_facts: 'title' and 'sent_id' differ in length",
        f"{DICTS}:3: <line>: truncated JSON (Invalid control character at at column 38)",
    ]
    assert (result.records_read, result.bad_records) == (10, 6)


def test_outputs_validate_and_supporting_facts_point_at_the_sentences(tmp_path: Path) -> None:
    result = build_hotpot([LIST, DICTS])
    facts_path, qa_path = tmp_path / "f.jsonl", tmp_path / "q.jsonl"
    assert finish(result, facts_path, qa_path, strict=False, stream=open(tmp_path / "log", "w")) == 0
    assert check_qa_file(qa_path, {"facts": facts_path}).problems == []
    facts = load_facts(facts_path)
    qa = {r.qid: r for r in load_qa(qa_path, num_facts=len(facts))}
    assert [facts[i].sentence for i in qa["hf-1"].supporting_facts] == [
        "Brandt House was completed in 1902 in Racine.", "The Root River flows through Racine."]
    assert facts[qa["hp-bridge-1"].raw["answer_fact"]].tail_name == "Duluth"


def test_bad_top_level_and_max_samples(tmp_path: Path) -> None:
    assert build_hotpot([LIST], max_samples=2).records_read == 2
    assert [q["qid"] for q in build_hotpot([LIST], max_samples=2).qa] == ["hp-bridge-1", "hp-comparison-1"]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"_id": "a",\n "question": }]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.json:2: <file>: invalid JSON list \(Expecting value at column 14\)"):
        build_hotpot([broken])
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"_id": "a", "question": "q", "answer": "x", "supporting_facts": [["T", 0]], "context": "oops"}\n'
                   '[1, 2]\n', encoding="utf-8")
    assert [p.format() for p in build_hotpot([odd]).problems] == [
        f"{odd}:1: context: expected a list of [title, sentences] pairs or a dict of lists",
        f"{odd}:2: <record>: expected a JSON object, got list",
    ]


def test_cli_help_documents_the_rule_and_strict_fails() -> None:
    script = str(ROOT / "offline" / "build_5tuple_from_hotpot.py")
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "extraction rule, one fact per supporting sentence" in proc.stdout
    proc = subprocess.run([sys.executable, script, str(LIST), "--strict", "--out_facts", "/nonexistent/f.jsonl",
                           "--out_qa", "/nonexistent/q.jsonl"], capture_output=True, text=True)
    assert proc.returncode == 1 and "--strict: 4 bad record(s); nothing written" in proc.stderr
