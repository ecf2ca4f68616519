"""T-REx builder: own fixtures in the real shapes, the real sample, the CLI contract."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kblampp.builders.common import BuildError, BuildResult, finish, write_outputs
from kblampp.builders.trex import build_trex, entity_id, load_lama_relations, wikidata_date
from kblampp.builders.wikidata_labels import property_id, property_label
from kblampp.sanity import check_5tuple_file
from kblampp.schema import load_facts, scan_facts

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "real_shapes"
REAL = next((p / "shared" / "data" / "real" for p in (ROOT.parent, ROOT.parents[1]) if (p / "shared").is_dir()),
            ROOT.parent / "shared" / "data" / "real")  # beside the checkout, or beside its worktree folder
DT = "^^http://www.w3.org/2001/XMLSchema#dateTime"


@pytest.mark.parametrize("literal,iso", [
    ("1993-00-00T00:00:00Z" + DT, "1993"), ("1993-05-00T00:00:00Z" + DT, "1993-05"),
    ("1993-05-17T00:00:00Z" + DT, "1993-05-17"), ("+1993-05-17T00:00:00Z", "1993-05-17"),
    ("0988-00-00T00:00:00Z" + DT, "0988"), ("0000-00-00T00:00:00Z" + DT, None),
    ("1993-02-30T00:00:00Z" + DT, None), ("1993-13-00T00:00:00Z" + DT, None), ("199x-00-00" + DT, None),
])
def test_wikidata_date(literal: str, iso: str | None) -> None:
    assert wikidata_date(literal) == iso


def test_ids_and_labels() -> None:
    assert entity_id("http://www.wikidata.org/entity/Q228") == "Q228"
    assert entity_id("1970-01-22T00:00:00Z" + DT) is None
    assert property_id("http://www.wikidata.org/prop/direct/P19") == "P19"
    assert property_label("P19") == "place of birth"
    assert property_label("P2341") == "indigenous to"
    assert property_label("P99999") == "P99999"
    assert property_label("P19", {"P19": "born in"}) == "born in"


def _rows(result: BuildResult) -> list[tuple]:
    return [(f["head"]["id"], f["head"]["name"], f["relation"]["id"], f["relation"]["name"], f["tail"]["id"],
             f["tail"]["name"], f["context"]["sent_span"], f["time_window"]["start"], f["time_window"]["end"])
            for f in result.facts]


def test_fixture_documents_and_lama() -> None:
    labels = load_lama_relations(FIX / "lama_relations.jsonl")
    result = build_trex([FIX / "trex_docs.json", FIX / "lama_trex.jsonl"], relation_labels=labels)
    s0 = "Marta Vell (born 1961) is a Ruritanian chemist."
    assert _rows(result) == [
        ("Q900001", "Marta Vell", "P569", "date of birth", None, "1961", s0, "1961", None),
        ("Q900001", "Marta Vell", "P19", "place of birth", "Q900002", "Ostrava", "She was born in Ostrava.", None, None),
        ("Q900001", "Marta Vell", "P729", "service entry", None, "1993-05", "Vell entered service at 1993.", "1993-05", None),
        ("Q900001", "Marta Vell", "P99999", "P99999", "Q900003", "Ruritanian", s0, None, None),
        ("Q900001", "Marta Vell", "P19", "place of birth", "Q900002", "Ostrava", "Marta Vell was born in Ostrava in 1961.", None, None),
        ("Q900001", "Marta Vell", "P27", "citizenship (LAMA label)", "Q900003", "Ruritania", "Marta Vell is a Ruritanian chemist.", None, None),
    ]
    assert result.facts[0]["time_window"]["source"] == "wikidata_date"
    assert result.facts[1]["time_window"]["source"] == "none"
    assert result.facts[0]["context"]["source"] == "trex"
    assert result.facts[0]["context"]["ver"]["url"] == "http://www.wikidata.org/entity/Q900001"
    assert result.notes["duplicate facts merged"] == 1
    assert result.notes["triples read"] == 8
    docs, lama = FIX / "trex_docs.json", FIX / "lama_trex.jsonl"
    assert [p.format() for p in result.problems] == [
        f"{docs}:record 0: triples[5].sentence_id: 7 is not an index into sentences_boundaries (0..2)",
        f"{docs}:record 0: triples[6].object.boundaries: text there is 'Marta', not surfaceform 'chemist'",
        f"{docs}:record 0: triples[7].object.uri: unparsable Wikidata date '199x-00-00T00:00:00Z'",
        f"{docs}:record 1: text: missing field",
        f"{lama}:3: evidences: empty list",
        f"{lama}:4: sub_label: empty string",
        f"{lama}:5: <line>: invalid JSON (Expecting value at column 1)",
    ]
    assert (result.records_read, result.bad_records) == (7, 7)


def test_documents_as_json_lines_give_the_same_facts(tmp_path: Path) -> None:
    docs = json.loads((FIX / "trex_docs.json").read_text(encoding="utf-8"))
    lines = tmp_path / "docs.jsonl"
    lines.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    from_list, from_lines = build_trex([FIX / "trex_docs.json"]), build_trex([lines])
    assert from_lines.facts == from_list.facts
    assert [p.where for p in from_lines.problems] == ["1", "1", "1", "2"]


def test_max_samples_counts_documents() -> None:
    result = build_trex([FIX / "trex_docs.json", FIX / "lama_trex.jsonl"], max_samples=1)
    assert result.records_read == 1
    assert {f["context"]["page_title"] for f in result.facts} == {"Marta Vell"}
    assert len(result.facts) == 4


def test_real_sample_builds_valid_facts(tmp_path: Path) -> None:
    result = build_trex([REAL / "trex_sample-output.json"])
    assert (result.records_read, result.bad_records) == (2, 0)
    assert result.notes["triples read"] == 112
    assert len(result.facts) == 46 and result.notes["duplicate facts merged"] == 66
    out = tmp_path / "trex.jsonl"
    assert finish(result, out, None, strict=True, stream=open(tmp_path / "log", "w")) == 0
    facts, problems = scan_facts(out)
    assert problems == [] and len(facts) == 46
    assert check_5tuple_file(out, {}).summary.endswith("OK, 46 facts (1 with a time window)")
    docs = {d["uri"]: d for d in json.loads((REAL / "trex_sample-output.json").read_text(encoding="utf-8"))}
    for fact in result.facts:
        doc = docs[fact["context"]["doc_id"]]
        lo, hi = doc["sentences_boundaries"][fact["context"]["sentence_id"]]
        assert fact["context"]["sent_span"] == doc["text"][lo:hi].strip()
    dated = [f for f in facts if f.relation_id == "P729"]
    assert [(f.head_name, f.tail_name, f.start, f.end) for f in dated] == [("Andorra", "1970-01-22", "1970-01-22", None)]
    assert {f.relation_name for f in facts} >= {"official language", "shares border with", "indigenous to", "capital"}


def test_write_outputs_refuses_invalid_facts_and_writes_nothing(tmp_path: Path) -> None:
    result = build_trex([FIX / "trex_docs.json"])
    result.facts[0]["time_window"]["end"] = "1900"  # ends before it starts: a builder bug
    out = tmp_path / "out.jsonl"
    with pytest.raises(BuildError, match=r"out.jsonl:1: time_window.end: window ends \(1900\) before it starts \(1961\)"):
        write_outputs(result, out, None)
    assert list(tmp_path.iterdir()) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "offline" / "build_5tuple_from_trex.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_default_reports_and_writes(tmp_path: Path) -> None:
    out = tmp_path / "facts.jsonl"
    proc = _cli(str(FIX / "trex_docs.json"), "--out_facts", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "triples[5].sentence_id: 7 is not an index" in proc.stderr
    assert "bad records: 4" in proc.stderr and "facts written: 4" in proc.stderr
    assert len(load_facts(out)) == 4


def test_cli_strict_writes_nothing_and_keeps_old_output(tmp_path: Path) -> None:
    out = tmp_path / "facts.jsonl"
    out.write_text("old\n", encoding="utf-8")
    proc = _cli(str(FIX / "trex_docs.json"), "--out_facts", str(out), "--strict")
    assert proc.returncode == 1
    assert "--strict: 4 bad record(s); nothing written" in proc.stderr
    assert out.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["facts.jsonl"]


def test_cli_help_and_bad_arguments(tmp_path: Path) -> None:
    assert _cli("--help").returncode == 0
    proc = _cli(str(FIX / "trex_docs.json"), "--max_samples", "0")
    assert proc.returncode == 2 and "expected a positive integer, got 0" in proc.stderr
    proc = _cli(str(tmp_path / "missing.json"), "--out_facts", str(tmp_path / "f.jsonl"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert "missing.json: input file not found" in proc.stderr


def test_tails_come_from_the_alignment_never_from_a_text_search(tmp_path: Path) -> None:
    """No answer is read or searched for: a T-REx tail is the aligned object at its offsets (the same
    string earlier in the text is not taken), and LAMA probe-only fields change nothing."""
    text = "Ostrava is a city. Marta Vell moved to Ostrava."
    triple = {"sentence_id": 1, "predicate": {"uri": "http://www.wikidata.org/prop/direct/P551"},
              "subject": {"boundaries": [19, 29], "surfaceform": "Marta Vell", "uri": "http://www.wikidata.org/entity/Q1"},
              "object": {"boundaries": [39, 46], "surfaceform": "Ostrava", "uri": "http://www.wikidata.org/entity/Q2"}}
    doc = {"docid": "d", "title": "Marta Vell", "uri": "http://www.wikidata.org/entity/Q1", "text": text,
           "sentences_boundaries": [[0, 18], [19, 47]], "triples": [triple]}
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([doc]), encoding="utf-8")
    assert _rows(build_trex([path])) == [("Q1", "Marta Vell", "P551", "residence", "Q2", "Ostrava",
                                          "Marta Vell moved to Ostrava.", None, None)]
    lama = [json.loads(line) for line in (FIX / "lama_trex.jsonl").read_text(encoding="utf-8").splitlines()[:2]]
    plain, probed = tmp_path / "plain.jsonl", tmp_path / "probed.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in lama), encoding="utf-8")
    probed.write_text("".join(json.dumps({**r, "masked_sentences": ["[MASK] is the answer."], "template": "[X] [Y]"})
                              + "\n" for r in lama), encoding="utf-8")
    assert build_trex([probed]).facts == build_trex([plain]).facts
