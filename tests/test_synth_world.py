"""Programmatic world generator: deterministic, disjoint worlds, consistent windows and sentences."""
from __future__ import annotations

import datetime as dt
import runpy
from collections import Counter, defaultdict

import pytest

from kblampp.schema import load_facts
from kblampp.synth.dates import say_day, say_month
from kblampp.synth.jsonl import write_jsonl
from kblampp.synth.world import RELATIONS, WorldSizes, fact_world, generate_worlds

SMALL = WorldSizes(persons=30, organisations=4, cities=6, universities=3, clubs=4, events=3)


@pytest.fixture(scope="module")
def world_facts():
    return generate_worlds(seed=7, num_worlds=3, sizes=SMALL)


def _run_script(repo_root, out, *extra) -> int:
    main = runpy.run_path(str(repo_root / "offline/gen_synth_world.py"))["main"]
    return main(["--out", str(out), "--seed", "3", "--num_worlds", "2", "--persons", "20",
                 "--organisations", "3", *extra])


def test_script_is_byte_identical_for_same_arguments(repo_root, tmp_path, capsys):
    assert _run_script(repo_root, tmp_path / "a.jsonl") == 0
    assert _run_script(repo_root, tmp_path / "b.jsonl") == 0
    a, b = (tmp_path / "a.jsonl").read_bytes(), (tmp_path / "b.jsonl").read_bytes()
    assert a == b and len(a) > 1000
    assert _run_script(repo_root, tmp_path / "c.jsonl", "--events", "5") == 0
    assert "  worlds: 2" in capsys.readouterr().out.splitlines()
    assert (tmp_path / "c.jsonl").read_bytes() != a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]  # no temp files


def test_same_seed_same_facts_other_seed_differs():
    one = generate_worlds(seed=1, num_worlds=2, sizes=SMALL)
    assert one == generate_worlds(seed=1, num_worlds=2, sizes=SMALL)
    assert one != generate_worlds(seed=2, num_worlds=2, sizes=SMALL)


def test_schema_valid_and_world_ids(world_facts, tmp_path):
    path = tmp_path / "w.jsonl"
    assert write_jsonl(path, world_facts) == len(world_facts)
    facts = load_facts(path)
    assert len(facts) == len(world_facts)
    assert [fact_world(f) for f in world_facts].count(None) == 0
    assert Counter(fact_world(f) for f in world_facts).keys() == {"world_00", "world_01", "world_02"}
    assert {f["relation"]["name"] for f in world_facts} == {name for _id, name in RELATIONS.values()}


def test_entities_disjoint_across_worlds(world_facts):
    names, ids = defaultdict(set), defaultdict(set)
    for f in world_facts:
        for part in ("head", "tail"):
            names[fact_world(f)].add(f[part]["name"])
            ids[fact_world(f)].add(f[part]["id"])
    worlds = sorted(names)
    for i, a in enumerate(worlds):
        for b in worlds[i + 1:]:
            assert not names[a] & names[b] and not ids[a] & ids[b]
    # an id always names the same entity
    id_to_name = {}
    for f in world_facts:
        for part in ("head", "tail"):
            assert id_to_name.setdefault(f[part]["id"], f[part]["name"]) == f[part]["name"]


def test_sizes_and_hard_negatives(world_facts):
    w0 = [f for f in world_facts if fact_world(f) == "world_00"]
    persons = {f["head"]["name"] for f in w0 if f["relation"]["name"] == "place of birth"}
    assert len(persons) == SMALL.persons
    assert len({f["head"]["name"] for f in w0 if f["relation"]["name"] == "headquarters location"}) == SMALL.organisations
    surnames = Counter(name.split()[-1] for name in persons)
    assert surnames.most_common(1)[0][1] >= 2  # persons sharing a surname in one world
    cities = Counter(f["tail"]["name"] for f in w0 if f["relation"]["name"] == "place of birth")
    assert cities.most_common(1)[0][1] >= 2  # tails repeat across facts
    with pytest.raises(ValueError, match=r"^sizes.persons: must be >= 1, got 0$"):
        generate_worlds(0, 1, WorldSizes(persons=0))
    with pytest.raises(ValueError, match=r"^num_worlds: must be >= 1, got 0$"):
        generate_worlds(0, 0)


def _windows(facts, relation):
    groups = defaultdict(list)
    for f in facts:
        if f.relation_name == relation:
            groups[f.head_id].append(f)
    return groups


def test_ceos_successive_and_memberships_non_overlapping(world_facts, tmp_path):
    path = tmp_path / "w.jsonl"
    write_jsonl(path, world_facts)
    facts = load_facts(path)
    ceos = _windows(facts, "chief executive officer")
    assert ceos and all(SMALL.min_ceos <= len(g) <= SMALL.max_ceos for g in ceos.values())
    for group in ceos.values():
        group.sort(key=lambda f: f.tau_min)
        for prev, nxt in zip(group, group[1:]):
            assert nxt.tau_min == prev.tau_max + 1  # consecutive, never overlapping
        assert group[-1].end is None and all(f.end is not None for f in group[:-1])
        assert len({f.tail_id for f in group}) == len(group)
    members = _windows(facts, "member of")
    assert any(len(g) >= 2 for g in members.values())
    for group in members.values():
        group.sort(key=lambda f: f.tau_min)
        for prev, nxt in zip(group, group[1:]):
            assert prev.tau_max < nxt.tau_min


def _wordings(iso: str) -> set[str]:
    parts = [int(p) for p in iso.split("-")]
    if len(parts) == 3:
        return {say_day(dt.date(*parts))}
    if len(parts) == 2:
        return {say_month(*parts)}
    return {str(parts[0])}


def test_sentences_name_head_tail_and_state_the_window(world_facts):
    for f in world_facts:
        sent = f["context"]["sent_span"]
        assert f["head"]["name"] in sent and f["tail"]["name"] in sent, sent
        for part in ("start", "end"):
            value = f["time_window"][part]
            if value is not None:
                assert _wordings(value) & {w for w in _wordings(value) if w in sent}, (part, sent)
        if f["time_window"]["start"] is None:
            assert not any(ch.isdigit() for ch in sent), sent
    ceo = next(f for f in world_facts if f["relation"]["name"] == "chief executive officer" and f["time_window"]["end"])
    start = dt.date.fromisoformat(ceo["time_window"]["start"])
    end = dt.date.fromisoformat(ceo["time_window"]["end"])
    assert ceo["context"]["sent_span"] == (f"{ceo['tail']['name']} became the CEO of {ceo['head']['name']} on "
                                           f"{say_day(start)}, and stepped down on {say_day(end)}.")
