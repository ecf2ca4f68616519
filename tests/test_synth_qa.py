"""Programmatic QA: every gold answer recomputed from its supporting facts (time windows included),
world split with no held-out entity in training, held-out phrasings, determinism."""
from __future__ import annotations

import math
import re
import runpy
from collections import Counter, defaultdict

import pytest

from kblampp import sanity
from kblampp.schema import load_facts, load_qa
from kblampp.synth.jsonl import write_jsonl
from kblampp.synth.qa import generate_qa, split_worlds
from kblampp.synth.templates import TEMPLATES, is_heldout
from kblampp.synth.world import WorldSizes, generate_worlds
from kblampp.timewin import window_days

SIZES = WorldSizes(persons=30, organisations=4, cities=6, universities=3, clubs=4, events=4)
TIMED = {"chief executive officer", "member of"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "world.jsonl"
    write_jsonl(path, generate_worlds(seed=11, num_worlds=4, sizes=SIZES))
    return path, load_facts(path)


@pytest.fixture(scope="module")
def qa(world):
    return generate_qa(world[1], seed=5, dev_worlds=1, test_worlds=1, train_variants=2)


def _select(candidates, question_time):
    """Reference time rule: in/on = window covering the question window; before = valid at its end;
    after = valid at its start."""
    lo, hi = window_days(question_time["start"], question_time["end"])
    if math.isinf(lo):
        lo = hi
    elif math.isinf(hi):
        hi = lo
    return [f for f in candidates if f.tau_min <= lo and hi <= f.tau_max]


def recompute(record, facts, by_hr):
    """Follow the supporting facts from the question's subject, resolving each hop among all facts
    with the same head and relation (through time where the relation is time-dependent)."""
    support = [facts[i] for i in record["supporting_facts"]]
    node = support[0].head_id
    for fact in support:
        siblings = by_hr[(node, fact.relation_name)]
        if fact.relation_name in TIMED and record["question_time"] is not None:
            siblings = _select(siblings, record["question_time"])
        assert len(siblings) == 1, (record["qid"], [f.tail_name for f in siblings])
        node = siblings[0].tail_id
        chosen = siblings[0]
    return chosen.tail_name


def test_every_answer_recomputed_from_supporting_facts(world, qa):
    path, facts = world
    by_hr = defaultdict(list)
    for f in facts:
        by_hr[(f.head_id, f.relation_name)].append(f)
    records = [r for split in qa.values() for r in split]
    assert len(records) > 500
    for r in records:
        assert recompute(r, facts, by_hr) == r["answer"], r
        assert r["answer_fact"] == r["supporting_facts"][-1]
        assert facts[r["answer_fact"]].tail_name == r["answer"]
        assert r["relation"] == facts[r["answer_fact"]].relation_name
        n = len(r["supporting_facts"])
        assert (r["type"], n) in {("single-hop", 1), ("temporal", 1), ("multi-hop", 2), ("multi-hop", 3)}
        assert (r["question_time"] is not None) == (r["type"] == "temporal" or "@" in r["template"])
        assert r["world"] == facts[r["answer_fact"]].raw["context"]["disamb"]["world"]
        assert r["question"].count(facts[r["supporting_facts"][0]].head_name) == 1
    types = Counter((r["type"], len(r["supporting_facts"])) for r in records)
    assert types[("single-hop", 1)] and types[("temporal", 1)] and types[("multi-hop", 2)] and types[("multi-hop", 3)]
    groups = {r["template"].split("#")[0] for r in records}
    assert {"ceo@in", "ceo@on", "ceo@before", "ceo@after", "member@in", "member@on", "ceo@in>born",
            "organiser>ceo@event"} <= groups


def test_before_and_after_pick_the_neighbouring_tenure(world, qa):
    _path, facts = world
    records = [r for split in qa.values() for r in split]
    before = next(r for r in records if r["template"].startswith("ceo@before"))
    after = next(r for r in records if r["template"].startswith("ceo@after"))
    year = int(re.search(r"\b(\d{4})\b", before["question"]).group(1))
    assert before["question_time"] == {"start": None, "end": str(year - 1)}
    ceo = facts[before["answer_fact"]]
    successor = next(f for f in facts if f.head_id == ceo.head_id and f.relation_name == ceo.relation_name
                     and f.tau_min == ceo.tau_max + 1)
    assert successor.start.startswith(str(year)) and not ceo.start.startswith(str(year))
    year = int(re.search(r"\b(\d{4})\b", after["question"]).group(1))
    assert after["question_time"] == {"start": str(year + 1), "end": None}
    ceo = facts[after["answer_fact"]]
    predecessor = next(f for f in facts if f.head_id == ceo.head_id and f.relation_name == ceo.relation_name
                       and f.tau_max == ceo.tau_min - 1)
    assert predecessor.end.startswith(str(year))


def test_world_split_keeps_heldout_entities_out_of_training(world, qa):
    _path, facts = world
    worlds = {s: {r["world"] for r in recs} for s, recs in qa.items()}
    assert worlds == {"train": {"world_00", "world_01"}, "dev": {"world_02"}, "test": {"world_03"}}
    heldout_names = {n for f in facts if f.raw["context"]["disamb"]["world"] in ("world_02", "world_03")
                     for n in (f.head_name, f.tail_name)}
    train_text = "\n".join(r["question"] + " " + r["answer"] for r in qa["train"])
    assert not [n for n in heldout_names if n in train_text]
    train_facts = {i for r in qa["train"] for i in r["supporting_facts"]}
    assert all(facts[i].raw["context"]["disamb"]["world"] in ("world_00", "world_01") for i in train_facts)
    with pytest.raises(ValueError, match=r"^4 world\(s\) cannot give 2 dev \+ 2 test worlds and at least one training world$"):
        split_worlds(["a", "b", "c", "d"], 2, 2)


def test_heldout_phrasings_only_in_evaluation(qa):
    assert all(len(p) >= 3 for p in TEMPLATES.values())
    assert not any(r["heldout_phrasing"] or is_heldout(r["template"]) for r in qa["train"])
    evaluation = qa["dev"] + qa["test"]
    assert any(r["heldout_phrasing"] for r in evaluation) and not all(r["heldout_phrasing"] for r in evaluation)
    # train_variants=2: the same question slot appears with two different training phrasings
    by_slot = defaultdict(set)
    for r in qa["train"]:
        by_slot[(tuple(r["supporting_facts"]), r["template"].split("#")[0], str(r["question_time"]))].add(r["template"])
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
        assert len(load_qa(a, num_facts=len(facts))) == len(a.read_text(encoding="utf-8").splitlines())
    assert "train:" in capsys.readouterr().out
