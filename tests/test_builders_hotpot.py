"""HotpotQA builder: answer-blind facts, the extraction rules, QA reachability, both record shapes,
bad records, the CLI."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kblampp.builders.common import finish
from kblampp.builders.hotpot import build_hotpot, reachability
from kblampp.builders.hotpot_text import statements, title_base, unescape_title, words
from kblampp.sanity import check_qa_file
from kblampp.schema import load_facts, load_qa

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "real_shapes"
LIST, DICTS = FIX / "hotpot_list.json", FIX / "hotpot_dict_of_lists.jsonl"
DISTRACTOR = FIX / "hotpot_distractor.json"


def _said(title: str, sentence: str, titles: list[str]) -> list[tuple[str, str, str]]:
    return [(st.relation, st.tail.text, st.tail.kind) for st in statements(sentence, title, [title] + titles)]


@pytest.mark.parametrize("title,sentence,titles,expected", [
    # parenthesised title: the head is found without "(1945 film)"; linked titles and dates are tails
    ("Kiss and Tell (1945 film)", "Kiss and Tell is a 1945 American comedy film starring then 17-year-old "
     "Shirley Temple as Corliss Archer.", ["Shirley Temple", "Corliss Archer"],
     [("is", "1945", "date"), ("is", "American", "name"), ("starring", "Shirley Temple", "title"),
      ("starring as", "Corliss Archer", "title")]),
    # HTML entity in the title; the predicate nearest each tail ("published ... by")
    ("Tunnels &amp; Trolls", "Tunnels & Trolls is a fantasy role-playing game designed by Ken St. Andre and first "
     "published in 1975 by Flying Buffalo.", ["Flying Buffalo"],
     [("designed by", "Ken St. Andre", "name"), ("published in", "1975", "date"),
      ("published by", "Flying Buffalo", "title")]),
    # decades, and a common-noun title mentioned in lower case
    ("Poison (American band)", "Poison is an American glam metal band that achieved commercial success in the "
     "mid-1980s to the mid-1990s.", ["Glam metal"],
     [("is", "American", "name"), ("is", "glam metal", "title"), ("achieved commercial success in", "1980s", "date"),
      ("achieved to", "1990s", "date")]),
    # combining marks (Russian stress accents) kept inside the words; a life's full dates
    ("Fyodor Dostoevsky", "Fyodor Mikhailovich Dostoevsky (Russian: Фёдор Миха́йлович Достое́вский; 11 November "
     "1821 – 9 February 1881) was a Russian novelist.", [],
     [("Russian name", "Фёдор Миха́йлович Достое́вский", "native"), ("born", "11 November 1821", "date"),
      ("died", "9 February 1881", "date"), ("was", "Russian", "name")]),
    # Bengali vowel signs and virama stay in their words
    ("Gitanjali", "Gitanjali (Bengali: গীতাঞ্জলি, lit. 'song offering') is a collection of poems by the Bengali "
     "poet Rabindranath Tagore.", ["Rabindranath Tagore"],
     [("Bengali name", "গীতাঞ্জলি", "native"), ("is collection of poems by", "Bengali", "name"),
      ("is collection of poems by", "Rabindranath Tagore", "title")]),
    # self-name: "Peter Schmeichel" inside the head's own mention is no tail
    ("Kasper Schmeichel", "Kasper Peter Schmeichel (born 5 November 1986) is a Danish professional footballer.",
     ["Peter Schmeichel"], [("born", "5 November 1986", "date"), ("is", "Danish", "name")]),
    # ... but the same page named later, after a pronoun head, is one
    ("Kasper Schmeichel", "He is the son of former Manchester United and Danish international goalkeeper Peter "
     "Schmeichel.", ["Peter Schmeichel"],
     [("is son of former", "Manchester United", "name"), ("is son of former", "Danish", "name"),
      ("is son of former", "Peter Schmeichel", "title")]),
    # self-name: "Collie" (another page) inside "Scotch Collie" is no tail
    ("Scotch Collie", "The Scotch Collie is a landrace breed of dog which originated from the highland regions of "
     "Scotland.", ["Collie"], [("originated from highland regions of", "Scotland", "name")]),
    # year spans are not a life; a tail before the head is an inverse relation; a fronted date
    ("Arthur's Magazine", "Arthur's Magazine (1844–1846) was an American literary periodical.", [],
     [("from", "1844", "date"), ("until", "1846", "date"), ("was", "American", "name")]),
    ("Racine, Wisconsin", "The Root River flows through Racine.", [], [("flows through (inverse)", "Root River", "name")]),
    ("Helen Marsh", "In 1990, she retired.", [], [("retired in", "1990", "date")]),
    ("Helen Marsh", "In March 1931, she moved to Paris.", [], [("moved in", "March 1931", "date"), ("moved to", "Paris", "name")]),
    # numbers; an abbreviation-suffixed title mentioned without it
    ("Leicester City F.C.", "Leicester City Football Club had 32,312 seats in 2011.", [],
     [("had", "32,312", "number"), ("had in", "2011", "date")]),
    ("Kasper Schmeichel", "He plays for Leicester City.", ["Leicester City F.C."],
     [("plays for", "Leicester City", "title")]),
])
def test_statements(title: str, sentence: str, titles: list[str], expected: list[tuple[str, str, str]]) -> None:
    assert _said(title, sentence, titles) == expected


def test_titles_words_and_dates() -> None:
    assert unescape_title("Tunnels &amp; Trolls") == "Tunnels & Trolls"
    assert title_base("Winner (band)") == "Winner" and title_base("Big Bang (South Korean band)") == "Big Bang"
    assert title_base("(band)") == "(band)"
    assert words("Преступле́ние и наказа́ние") == ["Преступле́ние", "и", "наказа́ние"]
    assert words("রবীন্দ্রনাথ ঠাকুর") == ["রবীন্দ্রনাথ", "ঠাকুর"]
    dates = {st.tail.text: st.tail.date for st in statements(
        "Glam metal peaked in the 1980s, on March 3, 1987, in May 1988 and on 3 June 1989.", "Glam metal", [])}
    assert dates == {"1980s": ("1980", "1989"), "March 3, 1987": ("1987-03-03", "1987-03-03"),
                     "May 1988": ("1988-05", "1988-05"), "3 June 1989": ("1989-06-03", "1989-06-03")}
    # an impossible day is no date (the year alone still is)
    assert [(st.tail.text, st.tail.kind) for st in statements("It opened on February 30, 1990.", "X", [])] == [
        ("30", "number"), ("1990", "date")]


def _facts_bytes(records: list[dict], tmp_path: Path) -> bytes:
    path = tmp_path / "in.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return "\n".join(json.dumps(f, ensure_ascii=False) for f in build_hotpot([path]).facts).encode()


def test_facts_never_read_the_answer(tmp_path: Path) -> None:
    records = json.loads(DISTRACTOR.read_text(encoding="utf-8"))
    original = _facts_bytes(records, tmp_path)
    for blank in ("", "Scotland", None):  # blanked, another tail of the KB, removed (the test split's shape)
        changed = copy.deepcopy(records)
        for rec in changed:
            if blank is None:
                rec.pop("answer", None)
            else:
                rec["answer"] = blank
        assert _facts_bytes(changed, tmp_path) == original
    assert len(build_hotpot([DISTRACTOR]).facts) == 87


def test_distractor_fixture_qa_records() -> None:
    result = build_hotpot([DISTRACTOR])
    assert result.problems == []
    rows = {q["qid"]: (q["family"], q["answerable"], None if "answer_fact" not in q else
                       (result.facts[q["answer_fact"]]["head"]["name"], result.facts[q["answer_fact"]]["tail"]["name"]),
                       q.get("bridge_linked")) for q in result.qa}
    assert rows == {
        "5a8b57f25542995d1e6f1371": ("hotpot_yesno", False, None, None),
        "5a8c7595554299585d9e36b7": ("hotpot_bridge", True, ("Woodson, Arkansas", "403"), None),
        "5a8c7595554299585d9e36b6": ("hotpot_unstated", False, None, True),  # "Chief of Protocol of the United States"
        "5ab3b0bf5542992ade7c6e39": ("hotpot_bridge", True, ("Flying Buffalo", "Rick Loomis"), True),
        "5a7a06935542990198eaf050": ("hotpot_bridge", True, ("YG Entertainment", "1996"), True),
        "5a7b4073554299042af8f733": ("hotpot_yesno", False, None, None),
        "5ae0d4d55542993d6555eb9a": ("hotpot_bridge", True, ("Glam metal", "1980s"), True),  # last hop, not Poison's
        "5a8f44ab5542992414482a25": ("hotpot_bridge", True, ("Peter Schmeichel", "Manchester United"), True),
        "5a8f44ab5542992414482a26": ("hotpot_bridge", True, ("Leicester City F.C.", "King Power Stadium"), True),
        "5ab56e32554299637185c594": ("hotpot_comparison", False, None, None),
        "5a85ea095542994775f606a8": ("hotpot_bridge", True, ("Rabindranath Tagore", "7 August 1941"), True),
        "5a7e25a75542991319bc9428": ("hotpot_bridge", True, ("Fyodor Dostoevsky", "11 November 1821"), True),
        "5a7e25a75542991319bc9429": ("hotpot_comparison", False, None, None),
        "5a7a06935542990198eaf051": ("hotpot_comparison", False, None, None),
    }
    assert all(q["type"] == ("multi-hop" if q["answerable"] else "unanswerable") and q["question_time"] is None
               for q in result.qa)
    for q in result.qa:  # answer fact last; first hop's facts before the last hop's
        if q["answerable"]:
            assert q["supporting_facts"][-1] == q["answer_fact"]
    poison = next(q for q in result.qa if q["qid"] == "5ae0d4d55542993d6555eb9a")
    assert [result.facts[i]["head"]["name"] for i in poison["supporting_facts"]] == ["Poison"] * 4 + ["Glam metal"]
    assert result.notes["records without an answer (facts only, no QA)"] == 1
    tt = next(f for f in result.facts if f["head"]["name"] == "Tunnels & Trolls")
    assert tt["head"]["id"] == "enwiki:Tunnels_&_Trolls" and tt["context"]["page_title"] == "Tunnels & Trolls"
    assert tt["context"]["ver"]["url"] == "https://en.wikipedia.org/wiki/Tunnels_&_Trolls"
    winner = next(f for f in result.facts if f["head"]["name"] == "Winner")
    assert winner["head"]["id"] == "enwiki:Winner_(band)" and winner["context"]["disamb"] == {"wikipedia_title": "Winner (band)"}
    decade = next(f for f in result.facts if f["head"]["name"] == "Glam metal")
    assert decade["context"]["tail_date"] == {"start": "1980", "end": "1989"}
    assert decade["time_window"] == {"start": None, "end": None, "source": "none"}


def test_reachability_report() -> None:
    assert reachability(build_hotpot([DISTRACTOR])) == {
        "questions": 14, "supporting sentences": 30, "facts": 87, "facts per supporting sentence": 2.9,
        "sentences without a fact": 0, "relation vocabulary": 46, "relations used once": 30,
        "families": {"hotpot_bridge": 8, "hotpot_comparison": 3, "hotpot_yesno": 2, "hotpot_unstated": 1},
        "answerable": 8, "answerable share": 0.571, "bridge answers reachable": 0.889, "bridge chains linked": 1.0}


def test_list_and_dict_of_lists_shapes() -> None:
    result = build_hotpot([LIST, DICTS])
    rows = [(f["head"]["name"], f["relation"]["name"], f["tail"]["name"], f["tail"]["id"], f["context"]["tail_kind"])
            for f in result.facts]
    assert rows == [
        ("Larkspur Tower", "designed by", "Helen Marsh", "enwiki:Helen_Marsh", "title"),
        ("Larkspur Tower", "completed in", "1974", None, "date"),
        ("Helen Marsh", "born", "March 3, 1931", None, "date"),
        ("Helen Marsh", "was", "American", None, "name"),
        ("Helen Marsh", "born in", "Duluth", None, "name"),
        ("Helen Marsh", "born in", "Minnesota", None, "name"),
        ("Oskar Lind", "was", "Swedish", None, "name"),
        ("Brandt House", "completed in", "1902", None, "date"),
        # first met where the Racine page was not in the context; linked when a later context has it
        ("Brandt House", "completed in", "Racine", "enwiki:Racine", "title"),
        ("Racine", "flows through (inverse)", "Root River", None, "name"),
    ]
    assert result.notes["facts linked by another question's context"] == 1
    first = result.facts[0]
    assert first["head"]["id"] == "enwiki:Larkspur_Tower"
    assert first["context"]["sent_span"] == "It was designed by Helen Marsh and completed in 1974."
    assert first["context"]["source"] == "hotpot" and first["time_window"] == {"start": None, "end": None, "source": "none"}
    # not answerable from the KB: type unanswerable, the dataset's answer kept aside, the supporting
    # sentences' facts as near misses (docs/DESIGN_QA.md)
    assert [(q["qid"], q.get("source_answer", q["answer"]), q["supporting_facts"] or q["near_miss_facts"],
             q.get("answer_fact"), q["answerable"], q["family"]) for q in result.qa] == [
        ("hp-bridge-1", "Duluth", [0, 1, 2, 3, 5, 4], 4, True, "hotpot_bridge"),
        ("hp-comparison-1", "no", [2, 3, 4, 5, 6], None, False, "hotpot_yesno"),
        ("hp-comparison-2", "Brandt House", [0, 1, 7, 8], None, False, "hotpot_comparison"),
        ("hf-1", "Root River", [7, 8, 9], 9, True, "hotpot_bridge"),
    ]
    assert [p.format() for p in result.problems] == [
        f"{LIST}:record 3: supporting_facts[0]: sentence 3 out of range (paragraph 'Brandt House' has 1)",
        f"{LIST}:record 4: supporting_facts[0]: title 'Brandt Hall' is not in the context",
        f"{LIST}:record 6: _id/id: duplicate id 'hp-bridge-1' (first at record 0)",
        f"{DICTS}:2: supporting_facts: 'title' and 'sent_id' differ in length",
        f"{DICTS}:3: <line>: truncated JSON (Invalid control character at at column 38)",
    ]
    assert (result.records_read, result.bad_records) == (10, 5)


def test_outputs_validate_and_supporting_facts_point_at_the_sentences(tmp_path: Path) -> None:
    result = build_hotpot([LIST, DICTS, DISTRACTOR])
    facts_path, qa_path = tmp_path / "f.jsonl", tmp_path / "q.jsonl"
    assert finish(result, facts_path, qa_path, strict=False, stream=open(tmp_path / "log", "w")) == 0
    assert check_qa_file(qa_path, {"facts": facts_path}).problems == []
    facts = load_facts(facts_path)
    qa = {r.qid: r for r in load_qa(qa_path, num_facts=len(facts))}
    assert [facts[i].sentence for i in qa["hf-1"].supporting_facts] == [
        "Brandt House was completed in 1902 in Racine."] * 2 + ["The Root River flows through Racine."]
    assert facts[qa["hf-1"].supporting_facts[1]].tail_id == "enwiki:Racine"
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
                   '[1, 2]\n{"_id": "b", "question": "q", "answer": 3, "supporting_facts": [], "context": []}\n',
                   encoding="utf-8")
    assert [p.format() for p in build_hotpot([odd]).problems] == [
        f"{odd}:1: context: expected a list of [title, sentences] pairs or a dict of lists",
        f"{odd}:2: <record>: expected a JSON object, got list",
        f"{odd}:3: answer: expected str, got int",
    ]


def test_cli_help_documents_the_rule_and_strict_fails(tmp_path: Path) -> None:
    script = str(ROOT / "offline" / "build_5tuple_from_hotpot.py")
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "the answer is never read when writing facts" in proc.stdout
    proc = subprocess.run([sys.executable, script, str(LIST), "--strict", "--out_facts", "/nonexistent/f.jsonl",
                           "--out_qa", "/nonexistent/q.jsonl"], capture_output=True, text=True)
    assert proc.returncode == 1 and "--strict: 3 bad record(s); nothing written" in proc.stderr
    proc = subprocess.run([sys.executable, script, str(DISTRACTOR), "--out_facts", str(tmp_path / "f.jsonl"),
                           "--out_qa", str(tmp_path / "q.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "kb: answerable share: 0.571" in proc.stderr and "kb: bridge chains linked: 1.0" in proc.stderr


def test_hotpot_job_builds_splits_and_checks(tmp_path: Path) -> None:
    """configs/hotpot.yaml through scripts/hotpot_job.py up to the sanity checks (no model needed):
    train/dev hold answerable questions only, test holds every question, split in two by answerable."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import hotpot_job

    out = tmp_path / "qa"
    assert hotpot_job.main([str(DISTRACTOR), "--until", "check", "--set", f"tuples_path={tmp_path / 'facts.jsonl'}",
                            "--set", f"train_dataset={out / 'hp_train.jsonl'}"]) == 0
    split = {name: load_qa(out / f"hp_{name}.jsonl") for name in
             ("all", "train", "dev", "test", "test_answerable", "test_not_answerable")}
    assert len(split["all"]) == 14 and len(load_facts(tmp_path / "facts.jsonl")) == 87
    assert all(r.raw["answerable"] for name in ("train", "dev", "test_answerable") for r in split[name])
    assert not any(r.raw["answerable"] for r in split["test_not_answerable"])
    test_ids = {r.qid for r in split["test"]}
    assert test_ids == {r.qid for r in split["test_answerable"] + split["test_not_answerable"]}
    assert len(test_ids) == round(0.3 * 14) and not test_ids & {r.qid for r in split["train"] + split["dev"]}
    assert {r.qid for r in split["all"] if r.raw["answerable"]} - test_ids == {r.qid for r in split["train"] + split["dev"]}
