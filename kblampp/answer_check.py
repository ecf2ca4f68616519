"""Recompute a QA record's answer from the facts alone, for every question family.

Independent of the generator: it reads only the fact file, the record's question text, its
supporting facts and its gold `time_constraint`, and applies the kind rules of docs/DESIGN_QA.md.
From the question's subject it follows each supporting fact's relation; a hop whose (head, relation)
has several facts is resolved by the constraint, and must land on that supporting fact. The gold
constraint must also be what `kblampp.question_time` reads from the text. Unanswerable records are
checked for their reason: the subject is in no fact, has no fact of the relation, or has facts of it
whose windows all miss the constraint.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from kblampp.question_time import TimeConstraint, parse_time_constraint
from kblampp.schema import Fact
from kblampp.timewin import window_days

BEGINNINGS = ("founded by", "place of birth", "spouse")  # facts whose window starts at an event


@dataclass
class FactLookup:
    """The fact file indexed by (head id, relation name) and by entity name."""

    facts: list[Fact]
    by_hr: dict[tuple[str | None, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    names: set[str] = field(default_factory=set)
    heads: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    person_initials: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def __post_init__(self) -> None:
        persons = set()
        for i, f in enumerate(self.facts):
            self.by_hr[(f.head_id, f.relation_name)].append(i)
            self.heads[f.head_name.casefold()].append(i)
            self.names.update((f.head_name.casefold(), f.tail_name.casefold()))
            for part in ("head", "tail"):
                if f.raw[part].get("type") == "PERSON":
                    persons.add(f.raw[part]["name"])
        for name in persons:
            parts = name.split()
            if len(parts) == 2:
                self.person_initials[f"{parts[0][0]}. {parts[1]}".casefold()] += 1


def _window(f: Fact) -> tuple[float, float]:
    return f.tau_min, f.tau_max


def anchor_days(f: Fact) -> tuple[float, float]:
    """The time an anchor fact stands for: its window, or its first period for a beginning."""
    if f.relation_name in BEGINNINGS:
        return window_days(f.start, f.start)
    return _window(f)


def resolve(facts: list[Fact], candidates: list[int], tc: TimeConstraint | None, anchor: Fact | None) -> list[int]:
    """The candidates a constraint selects (one expected); the rules of docs/DESIGN_QA.md."""
    def overlap(lo: float, hi: float) -> list[int]:
        return [i for i in candidates if facts[i].tau_min <= hi and lo <= facts[i].tau_max]

    if tc is None:
        return list(candidates)
    kind = tc.kind
    if anchor is not None and kind in ("just_before", "right_after"):  # succession
        if kind == "just_before":
            earlier = [i for i in candidates if facts[i].tau_min < anchor.tau_min]
            return [max(earlier, key=lambda i: facts[i].tau_min)] if earlier else []
        later = [i for i in candidates if facts[i].tau_min > anchor.tau_min]
        return [min(later, key=lambda i: facts[i].tau_min)] if later else []
    if kind == "relative":
        return overlap(*anchor_days(anchor)) if anchor is not None else []
    if kind == "first":
        return [min(candidates, key=lambda i: facts[i].tau_min)] if candidates else []
    if kind == "last":
        return [max(candidates, key=lambda i: facts[i].tau_min)] if candidates else []
    if tc.start is None and tc.end is None:
        return []
    lo, hi = window_days(tc.start, tc.end)
    if kind == "just_before":
        started = [i for i in candidates if facts[i].tau_min <= hi]
        return [max(started, key=lambda i: facts[i].tau_min)] if started else []
    if kind == "right_after":
        alive = [i for i in candidates if facts[i].tau_max >= lo]
        return [min(alive, key=lambda i: facts[i].tau_max)] if alive else []
    return overlap(lo, hi)  # at, between, before, after, current


def _constraint(record: dict) -> TimeConstraint | None:
    gold = record.get("time_constraint")
    return None if gold is None else TimeConstraint(gold["kind"], gold["start"], gold["end"], gold.get("anchor"))


def _named(record: dict, name: str, lookup: FactLookup) -> str | None:
    """None if the question names the entity (in full, in lower case, or by unambiguous initials)."""
    question = record["question"].casefold()
    if name.casefold() in question:
        return None
    parts = name.split()
    if record.get("family") == "initials" and len(parts) == 2:
        initials = f"{parts[0][0]}. {parts[1]}".casefold()
        if initials in question and lookup.person_initials.get(initials) == 1:
            return None
        return f"initials {initials!r} missing from the question or shared by several persons"
    return f"the question does not name {name!r}"


def check_record(record: dict, lookup: FactLookup, reference_date: str) -> list[tuple[str, str]]:
    """(field, reason) for everything wrong with one record's answer; empty when it checks out."""
    problems: list[tuple[str, str]] = []
    parsed = parse_time_constraint(record["question"], reference_date)
    gold = _constraint(record)
    if parsed != gold:
        problems.append(("time_constraint", f"gold {None if gold is None else gold.to_dict()} but the question "
                                            f"reads as {None if parsed is None else parsed.to_dict()}"))
    if record.get("answerable", True) is False:
        return problems + _check_unanswerable(record, lookup, gold)
    facts = lookup.facts
    support = [facts[i] for i in record["supporting_facts"]]
    if not support:
        return problems + [("supporting_facts", "empty on an answerable question")]
    anchor = support[0] if gold is not None and (gold.kind == "relative" or gold.anchor is not None) else None
    hops = record["supporting_facts"][1:] if anchor is not None else record["supporting_facts"]
    if not hops:
        return problems + [("supporting_facts", "an anchored question needs the anchor and an answer fact")]
    if anchor is not None:
        named = [anchor.head_name] + ([anchor.tail_name] if anchor.relation_name == "chief executive officer" else [])
        problems += [("supporting_facts", f"anchor fact: {why}") for n in named if (why := _named(record, n, lookup))]
    first = facts[hops[0]]
    if not (anchor is not None and first.head_id == anchor.tail_id) and (why := _named(record, first.head_name, lookup)):
        problems.append(("supporting_facts", why))
    node = first.head_id
    for pos, idx in enumerate(hops):
        f = facts[idx]
        candidates = lookup.by_hr.get((node, f.relation_name), [])
        chosen = candidates if len(candidates) == 1 else resolve(facts, candidates, gold, anchor)
        if chosen != [idx]:
            names = [facts[i].tail_name for i in chosen]
            return problems + [("supporting_facts", f"hop {pos + 1} ({f.relation_name}): the facts select "
                                                    f"{names or 'nothing'}, not {f.tail_name!r}")]
        node = f.tail_id
    if facts[hops[-1]].tail_name != record["answer"]:
        problems.append(("answer", f"{record['answer']!r} is not the last hop's tail {facts[hops[-1]].tail_name!r}"))
    return problems


def _check_unanswerable(record: dict, lookup: FactLookup, gold: TimeConstraint | None) -> list[tuple[str, str]]:
    subject, relation = record.get("subject"), record.get("relation")
    reason = record.get("unanswerable_reason")
    if not isinstance(subject, str) or not isinstance(relation, str):
        return [("subject", "unanswerable records name their `subject` and asked `relation`")]
    if subject.casefold() not in record["question"].casefold():
        return [("subject", f"the question does not name {subject!r}")]
    own = lookup.heads.get(subject.casefold(), [])
    facts = lookup.facts
    if reason == "entity_missing":
        return [] if subject.casefold() not in lookup.names else [("unanswerable_reason", f"{subject!r} is in the KB")]
    if not own and subject.casefold() not in lookup.names:
        return [("unanswerable_reason", f"{reason}: {subject!r} is not in the KB at all")]
    same = [i for i in own if facts[i].relation_name == relation]
    if reason == "relation_missing":
        return [] if not same else [("unanswerable_reason", f"{subject!r} has {len(same)} {relation!r} fact(s)")]
    if not same:
        return [("unanswerable_reason", f"time_outside: {subject!r} has no {relation!r} fact at all")]
    hits = resolve(facts, same, gold, None)
    if gold is None or hits:
        return [("unanswerable_reason", f"time_outside: the constraint selects {[facts[i].tail_name for i in hits]}")]
    return []
