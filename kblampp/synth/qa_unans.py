"""Unanswerable questions, in the phrasings of answerable ones: an entity the KB does not hold (a name
that no world of the file uses, built from the world's own first names and surnames), a relation the
entity lacks, or a time outside every window of the asked (head, relation).

`near_miss_facts` lists what a reader would be tempted by: same-relation facts of look-alike names,
the entity's other facts, or the facts whose windows miss the question's time.
"""
from __future__ import annotations

from kblampp.synth.families import UNANSWERABLE_REASONS
from kblampp.synth.names import ORG_SECTORS
from kblampp.synth.qa import WorldQA, day_of
from kblampp.synth.world import RELATIONS
from kblampp.timewin import window_days

PERSON_GROUPS = ("born", "educated", "employer", "residence", "spouse")
ORG_GROUPS = ("founder", "hq", "ceo@in", "ceo@current")
NEAR_MISSES = 3


def _item(group: str, family: str, subject: str, near: list[int], qtime=None, kind=None, **values: str) -> tuple:
    key = group.split("@")[0]
    return (group, family, subject, RELATIONS[key][1], sorted(near)[:NEAR_MISSES], qtime, kind, values)


def _missing_entities(wq: WorldQA) -> list[tuple]:
    rng, facts = wq.rng, wq.facts
    persons = [wq.name[e] for e in sorted(wq.name) if wq.entity_type.get(e) == "PERSON"]
    firsts = sorted({p.split()[0] for p in persons})
    lasts = sorted({p.split()[-1] for p in persons})
    out = []
    for _ in range(len(persons)):
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if name.casefold() in wq.file_names:
            continue
        wq.file_names.add(name.casefold())  # never drawn twice
        group = rng.choice(PERSON_GROUPS)
        near = [i for i in wq.indices if facts[i].relation_name == RELATIONS[group][1]
                and facts[i].head_name.split()[-1] == name.split()[-1]]
        out.append(_item(group, "unans_entity", name, near))
    for _ in range(len(wq.heads("ceo"))):
        last = rng.choice(lasts)
        name = f"{last} {rng.choice(ORG_SECTORS)}"
        if name.casefold() in wq.file_names:
            continue
        wq.file_names.add(name.casefold())
        group = rng.choice(ORG_GROUPS)
        relation = RELATIONS[group.split("@")[0]][1]
        near = [i for i in wq.indices if facts[i].relation_name == relation and facts[i].head_name.split()[0] == last]
        if group == "ceo@in":
            year = str(rng.randint(1975, 2023))
            out.append(_item(group, "unans_entity", name, near, (year, year), "at", year=year))
        else:
            out.append(_item(group, "unans_entity", name, near, None, "current" if group == "ceo@current" else None))
    return out


def _missing_relations(wq: WorldQA) -> list[tuple]:
    out = []
    for entity in sorted(wq.name):
        own = [i for i in wq.indices if wq.facts[i].head_id == entity]
        if not own:
            continue
        etype = wq.entity_type.get(entity)
        if etype == "PERSON":
            for key in ("spouse", "member"):
                if (entity, key) not in wq.by_hr:
                    out.append(_item(key, "unans_relation", wq.name[entity], own))
        elif etype == "ORG" and (entity, "located") in wq.by_hr and (entity, "founder") not in wq.by_hr:
            out.append(_item("founder", "unans_relation", wq.name[entity], own))
    return out


def _outside(wq: WorldQA, group: list[int], window) -> bool:
    lo, hi = window_days(*window)
    return not wq.overlapping(group, lo, hi)


def _missing_times(wq: WorldQA) -> list[tuple]:
    rng, facts, out = wq.rng, wq.facts, []
    for org in wq.heads("ceo"):
        group = wq.by_hr[(org, "ceo")]
        first = day_of(facts[group[0]].tau_min).year
        year = str(rng.randint(max(1950, first - 12), first - 1))
        if _outside(wq, group, (year, year)):
            out.append(_item("ceo@in", "unans_time", facts[group[0]].head_name, group, (year, year), "at", year=year))
    for person in wq.heads("member"):
        group = wq.by_hr[(person, "member")]
        name = facts[group[0]].head_name
        first = day_of(facts[group[0]].tau_min).year
        years = [y for y in range(first - 8, 2025) if _outside(wq, group, (str(y), str(y)))]
        if years:
            year = str(rng.choice(years))
            out.append(_item("member@in", "unans_time", name, group, (year, year), "at", year=year))
        if _outside(wq, group, (wq.reference_date, wq.reference_date)):
            out.append(_item("member@current", "unans_time", name, group, None, "current"))
    return out


def unanswerable(wq: WorldQA, count: int) -> None:
    """Queue `count` unanswerable questions, the three reasons in turn (another when one runs out)."""
    pools = [_missing_entities(wq), _missing_relations(wq), _missing_times(wq)]
    for pool in pools:
        wq.rng.shuffle(pool)
    taken = 0
    turn = 0
    while taken < count and any(pools):
        pool = pools[turn % 3]
        turn += 1
        if not pool:
            continue
        group, family, subject, relation, near, qtime, kind, values = pool.pop()
        item = wq.add(group, family, "unanswerable", [], qtime, kind, h=subject, **values)
        item["unanswerable"] = {"reason": UNANSWERABLE_REASONS[family], "subject": subject, "relation": relation,
                                "near": near}
        taken += 1
