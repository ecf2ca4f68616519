"""TimeQA builder: own fixtures in the real shape (plain and gzipped, easy and hard), windows inferred
from the page text, the split by page, the window report, the table's official EM, the real sample, the CLI."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kblampp.builders.common import finish
from kblampp.builders.text_windows import close_open_ends, find_page_times, infer_window
from kblampp.builders.timeqa import (build_timeqa, evidence_sentence, load_timeqa_relations, page_name,
                                     sentence_ends)
from kblampp.builders.timeqa_split import (merge_unanswerable, page_split, report_lines, window_report,
                                          write_split_files)
from kblampp.builders.timeqa_table import abstention_table, timeqa_table
from kblampp.question_time import parse_question_time
from kblampp.sanity import check_5tuple_file, check_qa_file, run_check
from kblampp.schema import load_facts, load_qa

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "real_shapes" / "timeqa_sample.jsonl"
EASY = ROOT / "tests" / "fixtures" / "real_shapes" / "timeqa_pages.easy.jsonl"
HARD = ROOT / "tests" / "fixtures" / "real_shapes" / "timeqa_pages.hard.jsonl"
# ../shared beside the checkout (CI), or beside the folder that holds a worktree
REAL = next((b / "shared" / "data" / "real" for b in (ROOT.parent, ROOT.parent.parent)
             if (b / "shared" / "data" / "real").is_dir()), ROOT.parent / "shared" / "data" / "real")


def test_page_name_and_sentences() -> None:
    assert page_name("Alan_Bar%C3%B3") == "Alan Baró"
    assert page_name("Newton_D._Baker_House") == "Newton D. Baker House"
    text = "Built in 1794 by Maj . George Peter . He sold it . Then John F . Kennedy , Jr . lived there ."
    assert [text[:e] for e in sentence_ends(text)][:2] == [
        "Built in 1794 by Maj . George Peter .", "Built in 1794 by Maj . George Peter . He sold it ."]
    boats = "Commanders . - 1940 – 1941 : Kptlt . Wolfgang Heyda - 1941 : Oblt . Karl Bauer . He sank it ."
    assert [boats[:e] for e in sentence_ends(boats)] == [boats[:boats.index(" He sank")], boats]  # ranks end no sentence
    lo = text.index("George")
    assert evidence_sentence(text, lo, lo + 11) == "Built in 1794 by Maj . George Peter ."
    lo = text.index("John")
    assert evidence_sentence(text, lo, lo + len("John F . Kennedy , Jr .")) == "Then John F . Kennedy , Jr . lived there ."
    long = "x " * 300 + "Anna Berg" + " y" * 300
    lo = long.index("Anna")
    window = evidence_sentence(long, lo, lo + 9, max_chars=41)
    assert window == "x x x x x x x Anna Berg y y y y y y y" and len(window) <= 41


def _check_fixture(result, path: Path) -> None:
    # one fact per (page, relation, tail); "Tom Reed" is asked about in prose and in the list: the list
    # row's range wins over the prose "until 1990"; "Anna Berg" likewise (1990-1995)
    coaches = "Coaches . - 1980-1990 - Tom Reed , - 1990-1995 - Anna Berg"
    shared = "In 1995 , Lee Park and Sam Ode shared the role ."
    assert [(f["tail"]["name"], f["context"]["sent_span"], f["time_window"], f["context"]["time_rule"])
            for f in result.facts] == [
        ("Tom Reed", coaches, {"start": "1980", "end": "1990", "source": "text_infer"}, "range"),
        ("Anna Berg", coaches, {"start": "1990", "end": "1995", "source": "text_infer"}, "range"),
        ("Lee Park", shared, {"start": "1995", "end": None, "source": "text_infer"}, "point"),
        ("Sam Ode", shared, {"start": "1995", "end": None, "source": "text_infer"}, "point"),
    ]
    fact = result.facts[0]
    assert fact["head"] == {"id": "enwiki:Larkspur_Rovers", "name": "Larkspur Rovers", "type": None}
    assert fact["relation"] == {"id": "P286", "name": "head coach"}
    assert fact["context"]["source"] == "timeqa" and fact["context"]["page_title"] == "Larkspur Rovers"
    assert [(q["qid"][-1], q["answer"], q["answer_aliases"], q["supporting_facts"], q["answer_fact"], q["question_time"],
             q["family"]) for q in result.qa] == [
        ("0", "Tom Reed", [], [0], 0, {"start": "1980", "end": "1990"}, "between"),
        ("1", "Anna Berg", [], [1], 1, {"start": "1992-03", "end": "1992-03"}, "in"),
        ("2", "Lee Park", ["Sam Ode"], [3, 2], 2, {"start": "1995", "end": "1996"}, "between"),
        ("4", "Tom Reed", [], [0], 0, {"start": "1987", "end": "1989"}, "between"),
        ("5", "Anna Berg", [], [1], 1, None, "single_hop"),
    ]
    assert all(q["type"] == ("temporal" if q["question_time"] else "single-hop") and q["dataset"] == "timeqa"
               for q in result.qa)
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
    assert [(q["qid"], q["answer"], q["supporting_facts"], q["question_time"], q["unanswerable_reason"], q["family"])
            for q in kept] == [("/wiki/Larkspur_Rovers#P286#3", "no answer", [], {"start": "2011", "end": None},
                                "time_outside", "unans_time")]
    assert "answer_fact" not in kept[0] and kept[0]["near_miss_facts"] == []
    result = build_timeqa([FIX], max_samples=2)
    assert result.records_read == 2 and [q["answer"] for q in result.qa] == ["Tom Reed", "Anna Berg"]


def test_page_times_forms() -> None:
    text = ("In 1916-1920 he lived there ; from 1935 to 1941 ; between 1990 and 1995 ; 1999–present ; 1916–20 ; "
            "February 4 , 2005 – September 8 , 2005 ; since 12 June 2014 ; until Oct 2001 ; in 1834 ; "
            "1200 people ; $1900 ; 3017 N Street ; 1974 to 1975")
    got = [(t.start, t.end, t.kind, text[t.span[0]:t.span[1]]) for t in find_page_times(text)]
    assert got == [
        ("1916", "1920", "range", "1916-1920"), ("1935", "1941", "range", "from 1935 to 1941"),
        ("1990", "1995", "range", "between 1990 and 1995"), ("1999", None, "range", "1999–present"),
        ("1916", "1920", "range", "1916–20"),
        ("2005-02-04", "2005-09-08", "range", "February 4 , 2005 – September 8 , 2005"),
        ("2014-06-12", None, "since", "since 12 June 2014"), (None, "2001-10", "until", "until Oct 2001"),
        ("1834", "1834", "point", "1834"), ("1974", "1975", "range", "1974 to 1975")]


def _window(text: str, answer: str):
    lo = text.index(answer)
    w = infer_window(text, lo, lo + len(answer), sentence_ends(text))
    return None if w is None else (w.start, w.end, w.rule)


def test_infer_window_rules() -> None:
    listing = "Directors . - 1950–1962 : Paul Dorn - 1962–1975 : Ruth Ilse - Marta Quell , May 1975 – 1980 - Ivo Brandt"
    assert _window(listing, "Ruth Ilse") == ("1962", "1975", "range")  # its own row, not the nearer next one
    assert _window(listing, "Marta Quell") == ("1975-05", "1980", "range")
    assert _window(listing, "Ivo Brandt") == ("1975-05", "1980", "range")  # no row of its own: nearest range
    prose = "It opened in 1902 . In 1921 , Clara Voss bought it , and she resigned in 1934 after a fire in 1933 ."
    assert _window(prose, "Clara Voss") == ("1921", "1934", "point")  # the end needs an ending word before it
    assert _window("She joined Goldman Sachs in October 2001 and then resigned in December 2002 .", "Goldman Sachs") == (
        "2001-10", "2002-12", "point")
    assert _window("X ran it until 1990 , when Anna Berg took over .", "Anna Berg") == ("1990", None, "point")
    assert _window("X ran it until 1990 .", "X") == (None, "1990", "point")
    assert _window("The show ran from 2000 to 2004 on Kanal 5 , and 2015 on Kanal 11 .", "Kanal 11") == (
        "2015", None, "point")  # a nearer point beats a farther range
    assert _window("In 1945 she moved to Yerevan . She joined the Union of Architects .", "Union of Architects") == (
        "1945", None, "neighbour-point")
    assert _window("She joined the Union of Architects . That was from 1950 to 1960 .", "Union of Architects") == (
        "1950", "1960", "neighbour-range")
    assert _window("She joined the Union of Architects .", "Union of Architects") is None
    # rule 4: the page's last date before the span (a narrative), as an open start
    story = "In March 1943 he was posted to the front . Later he flew more . He was promoted to Junior Lieutenant ."
    assert _window(story, "Junior Lieutenant") == ("1943-03", None, "preceding")
    assert _window("It ran from 1950 to 1960 . It was loved . It was sold . Then came Delta .", "Delta") == ("1960", None, "preceding")
    # a long range in parentheses right after the name is the tail's life, not the fact's window
    rector = "On 19 October 1954 the mathematician Herbert Dallmann ( 1909–1996 ) was appointed rector ."
    assert _window(rector, "Herbert Dallmann") == ("1954-10-19", None, "point")
    assert _window("Ralph Lauren ( 1967–2015 ) was its chief .", "Ralph Lauren") == ("1967", "2015", "range")
    # a date after born / died in parentheses right after the name is life data too: the row's range wins
    rectors = "- Hans Emons ( born 1930 ) , chemist , 1968 - 1975 - Gert Naue ( died 2011 ) , engineer , 1975 - 1981"
    assert _window(rectors, "Hans Emons") == ("1968", "1975", "range")
    assert _window(rectors, "Gert Naue") == ("1975", "1981", "range")
    assert _window("Born in 1930 , Hans Emons led it .", "Hans Emons") == ("1930", None, "point")  # not after the name
    # a date in the span's own clause beats a nearer one across a clause boundary (" , ", " and ", ...)
    career = "She was an assistant in 1881 , an instructor in 1882 , and a professor in 1886 ."
    assert _window(career, "instructor") == ("1882", None, "point")
    assert _window(career, "assistant") == ("1881", None, "point")
    coach = "He coached Pistoiese of Serie C1 in 2002–03 and Livorno of Serie B in 2003–04 , then Reggina ."
    assert _window(coach, "Livorno") == ("2003", "2004", "range")
    assert _window(coach, "Pistoiese") == ("2002", "2003", "range")


def test_other_mentions_date_a_tail_its_own_sentence_does_not(tmp_path: Path) -> None:
    context = ("Acme Acme is a firm . Its chairman Heinrich Pierer was fired in a scandal . It makes tools . "
               "Chairmen . - Karl Kaske ( 1981 to 1992 ) - Heinrich Pierer ( 1992 to 2005 ) - Peter Loescher ( 2007 to 2013 )")
    def record(k: int, name: str, at: int) -> dict:
        lo = context.index(name, at)
        return {"idx": f"/wiki/Acme#P488#{k}", "question": f"Who chaired Acme in {1985 + 10 * k}?", "context": context,
                "targets": [name], "from": [lo], "end": [lo + len(name)], "paragraphs": []}
    path = tmp_path / "acme.jsonl"
    # Pierer's record points at the undated prose mention; Kaske's at its dated row
    path.write_text("\n".join(json.dumps(r) for r in (record(0, "Karl Kaske", 0), record(1, "Heinrich Pierer", 0))) + "\n")
    facts = build_timeqa([path]).facts
    assert [(f["tail"]["name"], f["time_window"]["start"], f["time_window"]["end"], f["context"]["time_rule"],
             f["context"]["sent_span"]) for f in facts] == [
        ("Karl Kaske", "1981", "1992", "range", facts[0]["context"]["sent_span"]),
        ("Heinrich Pierer", "1992", "2005", "range", facts[0]["context"]["sent_span"])]
    assert "( 1992 to 2005 )" in facts[1]["context"]["sent_span"]  # the evidence is the dated mention's


def test_close_open_ends() -> None:
    assert close_open_ends([("1921", None), ("1934-05-03", None), ("1950", "1962"), (None, "1900")]) == [
        ("1921", "1934-05-03", True), ("1934-05-03", "1950", True), ("1950", "1962", False), (None, "1900", False)]
    assert close_open_ends([("1995", None), ("1995", None)]) == [("1995", None, False), ("1995", None, False)]


def test_easy_and_hard_share_facts_and_windows_ignore_questions(tmp_path: Path) -> None:
    result = build_timeqa([EASY, HARD], keep_unanswerable=True)
    assert [(f["tail"]["name"], f["relation"]["id"], f["time_window"]["start"], f["time_window"]["end"],
             f["context"]["time_rule"]) for f in result.facts] == [
        ("Clara Voss", "P127", "1921", "1934", "point"),
        ("city of Port Ellis", "P127", "1934-05-03", None, "point"),
        ("Paul Dorn", "P1037", "1950", "1962", "range"),
        ("Marta Quell", "P1037", "1975-02-04", "1980-09-08", "range")]
    assert [(q["qid"].split("#", 1)[1], q["level"], q["answer"], q.get("answer_fact"), q.get("unanswerable_reason"))
            for q in result.qa] == [
        ("P127#0#easy", "easy", "Clara Voss", 0, None), ("P127#1#easy", "easy", "city of Port Ellis", 1, None),
        ("P1037#0#easy", "easy", "Paul Dorn", 2, None), ("P1037#1#easy", "easy", "Marta Quell", 3, None),
        ("P1037#2#easy", "easy", "no answer", None, "time_outside"),
        ("P466#0#easy", "easy", "no answer", None, "relation_missing"),
        ("P127#0#hard", "hard", "Clara Voss", 0, None), ("P127#1#hard", "hard", "city of Port Ellis", 1, None),
        ("P1037#0#hard", "hard", "Paul Dorn", 2, None), ("P1037#1#hard", "hard", "Marta Quell", 3, None),
        ("P1037#2#hard", "hard", "no answer", None, "time_outside"),
        ("P466#0#hard", "hard", "no answer", None, "relation_missing")]
    # the KB is the same whichever questions (easy, hard, or rewritten ones) point into the pages
    assert build_timeqa([HARD]).facts == build_timeqa([EASY]).facts == result.facts
    blank = tmp_path / "blank.easy.jsonl"
    blank.write_text("".join(json.dumps(dict(json.loads(line), question="Who?")) + "\n"
                             for line in EASY.read_text(encoding="utf-8").splitlines()), encoding="utf-8")
    assert build_timeqa([blank]).facts == result.facts
    assert finish(result, tmp_path / "f.jsonl", tmp_path / "q.jsonl", strict=True, stream=open(tmp_path / "log", "w")) == 0
    assert check_qa_file(tmp_path / "q.jsonl", {"facts": tmp_path / "f.jsonl"}).problems == []


def test_window_report() -> None:
    result = build_timeqa([EASY, HARD])
    report = window_report(result.facts, result.qa)
    assert (report["facts"], report["with_window"], report["closed_window"]) == (4, 4, 3)
    assert report["rules"] == {"point": 2, "range": 2}
    # easy: 1921-1934 = fact (both years), May 1934-2001 vs open 1934-05-03 (start year, overlap, not inside),
    # 1950-1962 exact, Feb 1975-Sep 1980 vs 1975-02-04..1980-09-08 (same years, overlap, not inside)
    assert report["levels"]["easy"] == {"questions": 4, "fact_has_window": 4, "start_year": 4, "end_year": 3,
                                        "both_years": 3, "overlap": 4, "inside": 2}
    # hard: Jun 1925 inside 1921-1934; after Jan 1990 overlaps the open window (both ends open: same end);
    # Mar 1955-Apr 1956 and Mar 1977 inside
    assert report["levels"]["hard"] == {"questions": 4, "fact_has_window": 4, "start_year": 0, "end_year": 1,
                                        "both_years": 0, "overlap": 4, "inside": 4}
    lines = report_lines(report)
    assert lines[0] == "facts: 4; with an inferred window: 4 (100.0%); both ends: 3 (75.0%)"
    assert "| easy | 4 | 100.0 | 100.0 | 75.0 | 75.0 | 100.0 | 50.0 |" in lines


def test_split_by_page(tmp_path: Path) -> None:
    assert page_split("Harbor_Lights_Theatre", (0.0, 0.0, 1.0)) == "test"
    assert page_split("Larkspur_Rovers", (1.0, 0.0, 0.0)) == "train"
    with pytest.raises(ValueError, match="must be >= 0 and sum to 1"):
        page_split("A", (0.5, 0.5, 0.5))
    shares = [page_split(f"page_{i}", (0.7, 0.1, 0.2), seed=3) for i in range(2000)]
    assert shares == [page_split(f"page_{i}", (0.7, 0.1, 0.2), seed=3) for i in range(2000)]
    assert abs(shares.count("train") / 2000 - 0.7) < 0.05 and abs(shares.count("test") / 2000 - 0.2) < 0.05
    pages = build_timeqa([EASY, HARD], keep_unanswerable=True)
    rovers = build_timeqa([FIX])
    finish(pages, tmp_path / "p.jsonl", tmp_path / "pq.jsonl", strict=True, stream=open(tmp_path / "log", "w"))
    finish(rovers, tmp_path / "base.jsonl", tmp_path / "base_qa.jsonl", strict=False, stream=open(tmp_path / "log", "w"))
    # seed 0 with these shares puts the theatre on test and keeps nothing on train or dev
    fractions = (0.0, 0.0, 1.0)
    written = write_split_files(tmp_path / "p.jsonl", tmp_path / "pq.jsonl", tmp_path / "kb.jsonl", tmp_path / "qa",
                                base_facts=tmp_path / "base.jsonl", base_train=tmp_path / "base_qa.jsonl",
                                fractions=fractions)
    assert {k: v for k, v in written.counts.items() if not k.startswith("pages")} == {
        "facts": 8, "test_easy": 4, "test_hard": 4, "test_unanswerable": 4, "train": 5}
    facts = load_facts(tmp_path / "kb.jsonl")
    easy = load_qa(tmp_path / "qa" / "timeqa_test_easy.jsonl", num_facts=len(facts))
    assert [facts[r.raw["answer_fact"]].tail_name for r in easy] == [r.answer for r in easy]
    assert [r.supporting_facts for r in easy] == [(4,), (5,), (6,), (7,)]
    assert {r.raw["world"] for r in easy} == {"timeqa-test"}
    assert [f.raw["context"]["disamb"].get("world") for f in facts] == [None] * 4 + ["timeqa-test"] * 4
    train = load_qa(tmp_path / "qa" / "timeqa_train.jsonl", num_facts=len(facts))
    assert [r.qid for r in train] == [r["qid"] for r in rovers.qa]  # the base training QA, untouched
    # the job checks every written file; TimeQA answers are the dataset's own (a page tagged with a
    # `world` is not a generated record whose answer would be recomputed from the facts)
    for name, path in written.paths.items():
        kind = "5tuple" if name == "facts" else "qa"
        result = run_check(path, kind, **({} if kind == "5tuple" else {"facts": str(written.paths["facts"])}))
        assert result.problems == [], (name, result.lines()[:3])
    # the abstention files: a level's questions, then that level's unanswerable ones
    unans = load_qa(tmp_path / "qa" / "timeqa_test_unanswerable.jsonl", num_facts=len(facts))
    out = tmp_path / "qa" / "easy_with_unanswerable.jsonl"
    n = merge_unanswerable([tmp_path / "qa" / "timeqa_test_easy.jsonl"], tmp_path / "qa" / "timeqa_test_unanswerable.jsonl",
                           out, level="easy")
    merged = load_qa(out, num_facts=len(facts))
    assert [r.qid for r in merged] == [r.qid for r in easy] + [r.qid for r in unans if r.raw["level"] == "easy"]
    assert n == len(merged) == 4 + 2 and [r.answerable for r in merged] == [True] * 4 + [False] * 2


def test_table_from_results(tmp_path: Path) -> None:
    def write(name: str, rows: dict) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"meta": {}, "rows": rows}), encoding="utf-8")

    write("lookup_easy", {"lookup": {"n": 4, "em": 0.5, "em_ci_low": 0.0, "em_ci_high": 1.0, "contained": 0.75}})
    write("run_easy", {"kblampp": {"n": 4, "em": 0.75, "em_ci_low": 0.25, "em_ci_high": 1.0, "contained": 0.75}})
    write("run_hard", {"kblampp": {"n": 4, "em": 0.25, "em_ci_low": None, "em_ci_high": None, "contained": 0.5}})
    assert timeqa_table(tmp_path, ["easy", "hard"], [("lookup", "–"), ("run", "synthetic + TimeQA")]).splitlines() == [
        "| training | row | EM easy [95% CI] | contained easy | EM hard [95% CI] | contained hard |",
        "| --- | --- | --- | --- | --- | --- |",
        "| – | `lookup` (no LLM) | 50.0 [0.0, 100.0] | 75.0 | – | – |",
        "| synthetic + TimeQA | KBLaM++ (answer head) | 75.0 [25.0, 100.0] | 75.0 | 25.0 [–, –] | 50.0 |",
        "", "Questions per level (held-out pages, answerable): easy 4, hard 4."]
    ab = {"n": 6, "n_unanswerable": 2, "em": 0.5, "em_ci_low": 0.25, "em_ci_high": 0.75, "em_answerable": 0.25,
          "abstain_precision": 1.0, "abstain_recall": 0.5, "abstain_f1": 2 / 3}
    write("ab_easy", {"kblampp": ab, "lookup": dict(ab, abstain_precision=None)})
    assert abstention_table(tmp_path, ["easy", "hard"], "ab").splitlines()[2:] == [
        "| easy | KBLaM++ (answer head) | 6 (2) | 50.0 [25.0, 75.0] | 25.0 | 100.0 | 50.0 | 66.7 |",
        "| easy | `lookup` (no LLM) | 6 (2) | 50.0 [25.0, 75.0] | 25.0 | – | 50.0 | 66.7 |"]


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
    easy, hard = REAL / "timeqa_human_train.easy.jsonl.gz", REAL / "timeqa_human_train.hard.jsonl.gz"
    result = build_timeqa([easy, hard], relation_labels=labels)
    assert (result.records_read, result.bad_records) == (2342, 0)
    assert len(result.qa) == 2 * 982 and len(result.facts) == 970  # one fact per (page, relation, tail)
    assert result.notes["unanswerable questions (targets ['']) skipped"] == 2 * 189
    assert build_timeqa([hard], relation_labels=labels).facts == build_timeqa([easy], relation_labels=labels).facts
    facts_path, qa_path = tmp_path / "f.jsonl", tmp_path / "q.jsonl"
    assert finish(result, facts_path, qa_path, strict=True, stream=open(tmp_path / "log", "w")) == 0
    facts = load_facts(facts_path)
    qa = load_qa(qa_path, num_facts=len(facts))
    assert check_qa_file(qa_path, {"facts": facts_path}).problems == []
    assert check_5tuple_file(facts_path, {}).problems == []
    first = qa[0]
    assert (first.qid, first.answer, first.question_time) == (
        "/wiki/Newton_D._Baker_House#P466#0#easy", "George Peter", ("1811", "1827"))
    keys = {(f.head_id, f.relation_id, f.tail_name) for f in facts}
    assert len(keys) == len(facts)
    for record in qa:
        assert record.supporting_facts[-1] == record.raw["answer_fact"]
        fact = facts[record.raw["answer_fact"]]
        assert fact.tail_name == record.answer and fact.tail_name in fact.sentence
        assert fact.relation_id == record.raw["relation_id"] and fact.relation_name == labels[fact.relation_id]
        assert record.question_time == parse_question_time(record.question)
    assert all(f.raw["time_window"]["source"] == ("text_infer" if f.start or f.end else "none") for f in facts)
    report = window_report(result.facts, result.qa)
    assert report["with_window"] / report["facts"] > 0.9
    assert report["levels"]["easy"]["overlap"] / report["levels"]["easy"]["questions"] > 0.8


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


def test_time_rules_nearest_start_picks_the_holder_of_open_windows() -> None:
    """Two open-ended windows of one page and relation both cover "from 2001 to 2003"; only the nearest
    start picks the one that began in 2001. Questions of other pages are not counted."""
    sys.path.insert(0, str(ROOT / "offline"))
    from timeqa_time_rules import rule_counts

    def fact(tail: str, start: str) -> dict:
        return {"head": {"name": "Zeta"}, "relation": {"id": "P54"}, "tail": {"name": tail},
                "time_window": {"start": start, "end": None}}

    facts = [fact("Old Club", "1990"), fact("New Club", "2001")]
    qa = [{"answerable": True, "page": "Zeta", "level": "easy", "answer_fact": 1,
           "question": "Which club did Zeta play for from 2001 to 2003?"},
          {"answerable": True, "page": "Other", "level": "easy", "answer_fact": 0,
           "question": "Which club did Zeta play for from 1990 to 1995?"}]
    got = rule_counts(facts, qa, {"Zeta"})
    assert got["easy"] == {"questions": 1, "largest overlap": 0, "nearest start, then largest overlap": 1}
    assert got["all"] == got["easy"]


def _sibling_fixture():
    from kblampp.schema import fact_from_dict, qa_from_dict

    def fact(tail: str, start: str, end: str | None) -> dict:
        return {"head": {"name": "Zeta"}, "relation": {"id": "P54", "name": "member of sports team"},
                "tail": {"name": tail}, "context": {"sent_span": f"Zeta joined {tail} in {start}."},
                "time_window": {"start": start, "end": end}}

    def question(text: str, answer: int, **extra) -> dict:
        return {"qid": text, "dataset": "timeqa", "question": text, "answer": "x", "type": "temporal",
                "supporting_facts": [answer], "question_time": None, "answer_fact": answer, **extra}

    facts = [fact_from_dict(fact("Old Club", "1990", "2000")), fact_from_dict(fact("New Club", "2001", None)),
             fact_from_dict({**fact("Alone", "1990", None), "head": {"name": "Solo"}})]
    records = [qa_from_dict(question("Which club did Zeta play for from 2001 to 2003?", 1)),
               qa_from_dict(question("Which club did Zeta play for in 1995?", 0)),
               qa_from_dict(question("Which club did Zeta play for?", 0)),  # no time: left out
               qa_from_dict(question("Which club did Solo play for in 1995?", 2)),  # no sibling: left out
               qa_from_dict(question("Which club did Zeta play for in 1996?", 0, answerable=False))]
    return facts, records


def test_sibling_terms_keep_timed_questions_with_siblings_and_time_picks_the_holder() -> None:
    """The probe keeps timed, answerable TimeQA questions whose answer has siblings; with phi off, the
    run's prior time rows pick the fact valid at the question's time; refitting phi alone on the
    siblings' cross-entropy moves its pick toward the answer's evidence sentence."""
    import torch

    sys.path.insert(0, str(ROOT / "offline"))
    from timeqa_sibling_terms import accuracy, refit, sibling_questions, sibling_scores

    from kblampp.scorers import ContextScorer, TimeScorer
    from kblampp.training.facts import FactTable

    facts, records = _sibling_fixture()
    table = FactTable.from_facts(facts, lambda texts: [[0.0, 0.0]] * len(texts))
    rows = sibling_questions(records, table.sibling_index())
    assert [(r.question, r.siblings, r.target) for r in rows] == [
        (records[0].question, [0, 1], 1), (records[1].question, [0, 1], 0)]
    tables = (table.tau_min.float(), table.tau_max.float(), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    e_q = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # both questions "look like" New Club's sentence
    time, context = TimeScorer(), ContextScorer(2)
    assert accuracy(sibling_scores(rows, e_q, time, context, *tables, 0.0, 1.0), rows) == 1.0
    assert accuracy(sibling_scores(rows, e_q, time, context, *tables, 1.0, 0.0), rows) == 0.5  # phi alone: New Club twice
    time.weight.data.zero_()
    refit(rows[1:], e_q[1:], time, context, tables, 1.0, 0.0, epochs=40, with_phi=True, lr=0.2)
    assert accuracy(sibling_scores(rows[1:], e_q[1:], time, context, *tables, 1.0, 0.0), rows[1:]) == 1.0
    try:
        accuracy([], [])
    except ValueError as err:
        assert "no sibling question to score" in str(err)
    else:
        raise AssertionError("an empty question list must be refused")
