"""Programmatic QA: every family's gold answer recomputed from the facts (time windows, anchors and
the reference date included) by the independent checker, each family's own property checked here
against the facts, the checker shown to catch wrong answers, the world split, held-out phrasings,
determinism."""
from __future__ import annotations

import copy
import re
import runpy
from collections import Counter, defaultdict

import pytest

from kblampp import sanity
from kblampp.answer_check import FactLookup, check_record
from kblampp.question_time import parse_time_constraint
from kblampp.schema import load_facts, load_qa
from kblampp.synth.families import FAMILIES, FAMILY_TYPE, NO_ANSWER
from kblampp.synth.jsonl import write_jsonl
from kblampp.synth.qa import generate_qa, split_worlds
from kblampp.synth.templates import TEMPLATES, chain_groups, is_heldout
from kblampp.synth.world import RELATIONS, WorldSizes, generate_worlds
from kblampp.timewin import window_days

SIZES = WorldSizes(persons=40, organisations=6, cities=6, universities=3, clubs=4, events=5)
REF = "2024-12-31"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "world.jsonl"
    write_jsonl(path, generate_worlds(seed=11, num_worlds=4, sizes=SIZES))
    return path, load_facts(path)


@pytest.fixture(scope="module")
def qa(world):
    return generate_qa(world[1], seed=5, dev_worlds=1, test_worlds=1, train_variants=2)


@pytest.fixture(scope="module")
def records(qa):
    return [r for split in qa.values() for r in split]


@pytest.fixture(scope="module")
def lookup(world):
    return FactLookup(world[1])


def _siblings(facts, fact):
    return [f for f in facts if f.head_id == fact.head_id and f.relation_name == fact.relation_name]


def _year_in(question: str) -> int:
    return int(re.search(r"\b(\d{4})\b", question).group(1))


def test_every_family_present_and_every_answer_recomputed(records, lookup, world):
    _path, facts = world
    assert Counter(r["family"] for r in records).keys() == set(FAMILIES)
    for r in records:
        assert check_record(r, lookup, REF) == [], r
        assert FAMILY_TYPE[r["family"]] == r["type"]
        tc = parse_time_constraint(r["question"], REF)
        assert (None if tc is None else tc.to_dict()) == r["time_constraint"], r
        if r["answerable"]:
            assert r["answer_fact"] == r["supporting_facts"][-1]
            assert facts[r["answer_fact"]].tail_name == r["answer"]
            assert r["relation"] == facts[r["answer_fact"]].relation_name
            assert r["world"] == facts[r["answer_fact"]].raw["context"]["disamb"]["world"]


def test_order_families_against_the_facts(records, world):
    _path, facts = world
    by = defaultdict(list)
    for r in records:
        by[r["family"]].append(r)
    for r in by["just_before"]:  # the answer's successor began in the named year, the answer before it
        ans, year = facts[r["answer_fact"]], _year_in(r["question"])
        later = sorted((f for f in _siblings(facts, ans) if f.tau_min > ans.tau_min), key=lambda f: f.tau_min)
        assert later and later[0].start[:4] == str(year) and int(ans.start[:4]) < year, r
    for r in by["right_after"]:  # the answer's predecessor ended in the named year, the answer outlasts it
        ans, year = facts[r["answer_fact"]], _year_in(r["question"])
        earlier = sorted((f for f in _siblings(facts, ans) if f.tau_min < ans.tau_min), key=lambda f: f.tau_min)
        assert earlier and earlier[-1].end[:4] == str(year), r
        assert ans.tau_max >= window_days(str(year + 1), None)[0]
    for r in by["before"] + by["after"]:  # the only sibling whose window overlaps the open window
        lo, hi = window_days(r["question_time"]["start"], r["question_time"]["end"])
        hits = [f for f in _siblings(facts, facts[r["answer_fact"]]) if f.tau_min <= hi and lo <= f.tau_max]
        assert hits == [facts[r["answer_fact"]]], r
    for fam, pick in (("first", min), ("last", max)):
        for r in by[fam]:
            sibs = _siblings(facts, facts[r["answer_fact"]])
            assert len(sibs) >= 2 and pick(sibs, key=lambda f: f.tau_min) == facts[r["answer_fact"]]
    ref = window_days(REF, REF)[0]
    for r in by["current"]:
        assert facts[r["answer_fact"]].tau_min <= ref <= facts[r["answer_fact"]].tau_max
        assert r["question_time"] == {"start": REF, "end": REF}
    for r in by["succession"]:  # anchor and answer are neighbouring tenures of one company
        anchor, ans = facts[r["supporting_facts"][0]], facts[r["answer_fact"]]
        assert anchor.head_id == ans.head_id and anchor.tail_name in r["question"] and ans.head_name in r["question"]
        assert abs(anchor.tau_min - ans.tau_max) == 1 or abs(ans.tau_min - anchor.tau_max) == 1
        assert ("succeeded" in r["template"]) == (ans.tau_min > anchor.tau_min)
    for r in by["relative"]:  # the answer's window overlaps the anchor's
        anchor, ans = facts[r["supporting_facts"][0]], facts[r["answer_fact"]]
        lo, hi = window_days(r["question_time"]["start"], r["question_time"]["end"])
        assert (lo, hi) == (window_days(anchor.start, anchor.start) if anchor.relation_name == "founded by"
                            else (anchor.tau_min, anchor.tau_max))
        assert ans.tau_min <= hi and lo <= ans.tau_max and r["time_constraint"]["kind"] == "relative"
    assert {r["template"].split("#")[0] for r in by["relative"]} == {
        "rel:ceo>ceo", "rel:ceo>member", "rel:ceo>employer", "rel:founded>ceo", "rel:event>ceo", "organiser>ceo@event"}


def test_chains_cover_many_relation_sequences(records, world):
    _path, facts = world
    groups = {2: set(), 3: set()}
    for r in records:
        if r["type"] == "multi-hop":
            hops = [facts[i] for i in r["supporting_facts"]]
            assert all(a.tail_id == b.head_id for a, b in zip(hops, hops[1:]))
            assert len({h.head_id for h in hops} | {hops[-1].tail_id}) == len(hops) + 1  # no entity revisited
            groups[len(hops)].add(r["template"].split("#")[0])
    assert len(groups[2]) >= 20 and len(groups[3]) >= 25
    assert groups[2] - {"ceo@in>born"} <= set(chain_groups(2)) and groups[3] <= set(chain_groups(3))


def test_surface_variation(records, world):
    _path, facts = world
    persons = Counter(f.raw[p]["name"] for f in facts for p in ("head", "tail") if f.raw[p]["type"] == "PERSON")
    initials = Counter(f"{n.split()[0][0]}. {n.split()[1]}" for n in persons)
    by = defaultdict(list)
    for r in records:
        by[r["family"]].append(r)
    for r in by["paraphrase"]:
        words = set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", "", TEMPLATES[r["template"].split("#")[0]][0].lower())))
        relation = set(re.findall(r"[a-z]+", r["relation"].lower()))
        assert not words & relation, r["template"]
    for group in [g for g in TEMPLATES if g.endswith("~p")]:
        key = group[:-2]
        for text in TEMPLATES[group]:
            words = set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", "", text.lower())))
            assert not words & set(RELATIONS[key][1].split()), text
    for r in by["lowercase"]:
        head = facts[r["answer_fact"]].head_name
        assert head.lower() in r["question"] and head not in r["question"] or head == head.lower()
    for r in by["initials"]:
        head = facts[r["answer_fact"]].head_name
        short = f"{head.split()[0][0]}. {head.split()[1]}"
        assert short in r["question"] and head not in r["question"] and initials[short] == 1


def test_unanswerable_share_reasons_and_gold(qa, world):
    _path, facts = world
    names = {f.raw[p]["name"].casefold() for f in facts for p in ("head", "tail")}
    for split, recs in qa.items():
        unans = [r for r in recs if not r["answerable"]]
        assert 0.08 <= len(unans) / len(recs) <= 0.12, split
        assert {r["unanswerable_reason"] for r in unans} == {"entity_missing", "relation_missing", "time_outside"}
        for r in unans:
            assert (r["type"], r["answer"], r["supporting_facts"], r["answer_fact"]) == ("unanswerable", NO_ANSWER, [], None)
            assert r["subject"] in r["question"]
            if r["unanswerable_reason"] == "entity_missing":
                assert r["subject"].casefold() not in names
            else:
                own = [f for f in facts if f.head_name == r["subject"]]
                same = [f for f in own if f.relation_name == r["relation"]]
                assert own and (not same if r["unanswerable_reason"] == "relation_missing" else same)
            assert all(0 <= i < len(facts) for i in r["near_miss_facts"])


def _first(records, family):
    return copy.deepcopy(next(r for r in records if r["family"] == family))


def test_checker_catches_wrong_answers(records, lookup, world):
    _path, facts = world
    r = _first(records, "single_hop")
    r["answer"] = "Somebody Else"
    assert [f for f, _ in check_record(r, lookup, REF)] == ["answer"]
    def earlier(rec):
        ans = facts[rec["answer_fact"]]
        return [i for i, f in enumerate(facts) if f.head_id == ans.head_id and f.relation_name == ans.relation_name
                and f.tau_min < ans.tau_min]

    r = copy.deepcopy(next(r for r in records if r["family"] == "just_before" and earlier(r)))
    r["supporting_facts"] = [earlier(r)[0]]  # the answer replaced by an earlier sibling
    assert check_record(r, lookup, REF)[0] == ("supporting_facts", f"hop 1 ({r['relation']}): the facts select "
                                               f"[{r['answer']!r}], not {facts[earlier(r)[0]].tail_name!r}")
    r = _first(records, "succession")
    r["supporting_facts"] = r["supporting_facts"][::-1]
    assert check_record(r, lookup, REF) != []
    r = _first(records, "in")
    r["time_constraint"] = {**r["time_constraint"], "kind": "between"}
    assert [f for f, _ in check_record(r, lookup, REF)] == ["time_constraint"]
    r = _first(records, "unans_entity")
    real = facts[0].head_name
    r["question"], r["subject"] = r["question"].replace(r["subject"], real), real
    assert check_record(r, lookup, REF)[0][0] == "unanswerable_reason"
    r = copy.deepcopy(next(r for r in records if r["family"] == "unans_time" and r["template"].startswith("ceo@in")))
    same = [f for f in facts if f.head_name == r["subject"] and f.relation_name == r["relation"]]
    inside = str(int(same[0].start[:4]) + 1)  # a year inside a CEO's tenure is not unanswerable
    r["question"] = r["question"].replace(r["time_constraint"]["start"], inside)
    r["time_constraint"].update(start=inside, end=inside)
    assert check_record(r, lookup, REF) == [("unanswerable_reason", f"time_outside: the constraint selects "
                                                                    f"[{same[0].tail_name!r}]")]
    r = _first(records, "current")
    assert check_record(r, lookup, "1950-01-01") != []  # "now" means the reference date


def test_world_split_keeps_heldout_entities_out_of_training(world, qa):
    _path, facts = world
    worlds = {s: {r["world"] for r in recs} for s, recs in qa.items()}
    assert worlds == {"train": {"world_00", "world_01"}, "dev": {"world_02"}, "test": {"world_03"}}
    heldout_names = {n for f in facts if f.raw["context"]["disamb"]["world"] in ("world_02", "world_03")
                     for n in (f.head_name, f.tail_name)}
    train_text = "\n".join(r["question"] + " " + r["answer"] for r in qa["train"]).casefold()
    assert not [n for n in heldout_names if n.casefold() in train_text]
    train_facts = {i for r in qa["train"] for i in r["supporting_facts"] + r.get("near_miss_facts", [])}
    assert all(facts[i].raw["context"]["disamb"]["world"] in ("world_00", "world_01") for i in train_facts)
    with pytest.raises(ValueError, match=r"^4 world\(s\) cannot give 2 dev \+ 2 test worlds and at least one training world$"):
        split_worlds(["a", "b", "c", "d"], 2, 2)


def test_heldout_phrasings_only_in_evaluation(qa):
    assert all(len(p) >= 3 for p in TEMPLATES.values())
    assert not any(r["heldout_phrasing"] or is_heldout(r["template"]) for r in qa["train"])
    evaluation = qa["dev"] + qa["test"]
    assert any(r["heldout_phrasing"] for r in evaluation) and not all(r["heldout_phrasing"] for r in evaluation)
    held = Counter(r["family"] for r in evaluation if r["heldout_phrasing"])
    assert held["paraphrase"] and held["succession"] and held["multi_hop_3"] and held["unans_entity"]
    # train_variants=2: the same question slot appears with two different training phrasings
    by_slot = defaultdict(set)
    for r in qa["train"]:
        slot = (tuple(r["supporting_facts"]), r["template"].split("#")[0], str(r["question_time"]), r.get("subject"))
        by_slot[slot].add(r["template"])
    assert max(len(v) for v in by_slot.values()) == 2


def test_deterministic_unique_qids_and_files_pass_sanity(world, qa, tmp_path, repo_root, capsys):
    path, facts = world
    assert generate_qa(facts, seed=5, dev_worlds=1, test_worlds=1, train_variants=2) == qa
    qids = [r["qid"] for recs in qa.values() for r in recs]
    assert len(qids) == len(set(qids))
    main = runpy.run_path(str(repo_root / "offline/gen_synth_qa.py"))["main"]
    for name in ("a", "b"):
        assert main(["--world", str(path), "--out_dir", str(tmp_path / name), "--prefix", "sw", "--seed", "5"]) == 0
    for split in ("train", "dev", "test"):
        a, b = (tmp_path / "a" / f"sw_{split}.jsonl"), (tmp_path / "b" / f"sw_{split}.jsonl")
        assert a.read_bytes() == b.read_bytes()
        result = sanity.run_check(a, None, facts=str(path))
        assert result.kind == "qa" and result.problems == []
        assert "answers recomputed from the facts" in result.summary
        assert len(load_qa(a, num_facts=len(facts))) == len(a.read_text(encoding="utf-8").splitlines())
    out = capsys.readouterr().out
    assert "train:" in out and "test family unans_time:" in out


def test_sanity_cli_reports_a_wrong_answer(world, qa, tmp_path, capsys):
    path, _facts = world
    bad = copy.deepcopy(qa["test"])
    line = next(i for i, r in enumerate(bad) if r["family"] == "multi_hop_3")
    bad[line]["answer"] = "Nowhere"
    write_jsonl(tmp_path / "bad.jsonl", bad)
    assert sanity.main([str(tmp_path / "bad.jsonl"), "--facts", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{tmp_path / 'bad.jsonl'}:{line + 1}: answer: 'Nowhere' is not the last hop's tail")
    assert out[-1] == f"1 problem(s) in {tmp_path / 'bad.jsonl'}"
