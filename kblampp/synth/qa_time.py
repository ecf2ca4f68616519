"""Temporal families: in / on / between / before / after / just before / right after / first / last /
current / succession over successive CEOs and club memberships, and relative-time questions.

Each form's answer is fixed by construction (e.g. "just before Y" with Y the year the next tenure
began) and kept only when the form's rule (docs/DESIGN_QA.md) selects exactly that fact.
"""
from __future__ import annotations

import datetime as dt
import math

from kblampp.synth.dates import say_day
from kblampp.synth.qa import LAST_DAY, WorldQA, day_of, days_of
from kblampp.timewin import window_days

# at most this many questions per world of each membership form and relative form (test split size)
MEMBER_CAP = 40
RELATIVE_CAP = 18
_FORMS = ("in", "on", "between", "before", "after", "just_before", "right_after", "first", "last", "current")


def _year(days: float) -> int:
    return day_of(days).year


def _forms(wq: WorldQA, key: str, group: list[int]) -> list[tuple]:
    """(group name, family, chain, question_time, kind, values) of every time form of one (head, key)."""
    rng, facts, n = wq.rng, wq.facts, len(group)
    out = []

    def keep(form: str, idx: int, qtime, kind: str, **values: str) -> None:
        lo, hi = window_days(*qtime) if qtime is not None else (-math.inf, math.inf)
        if kind in ("at", "between", "before", "after") and wq.overlapping(group, lo, hi) != [idx]:
            return
        out.append((f"{key}@{form}", form, [idx], qtime, kind, values))

    for k, idx in enumerate(group):
        f = facts[idx]
        years = wq.full_years(idx)
        if years:
            y = rng.choice(years)
            keep("in", idx, (str(y), str(y)), "at", year=str(y))
        day = day_of(rng.randint(int(f.tau_min), int(min(f.tau_max, days_of(LAST_DAY)))))
        keep("on", idx, (day.isoformat(), day.isoformat()), "at", date=say_day(day))
        if len(years) >= 2:
            y1 = rng.choice(years[:-1])
            y2 = rng.choice([y for y in years if y > y1])
            keep("between", idx, (str(y1), str(y2)), "between", y1=str(y1), y2=str(y2))
        if n < 2:
            continue  # time selects nothing among one fact
        if k == 0:
            y = rng.randint(_year(f.tau_min) + 1, max(_year(f.tau_min) + 1, _year(facts[group[1]].tau_min)))
            keep("before", idx, (None, str(y - 1)), "before", year=str(y))
            out.append((f"{key}@first", "first", [idx], None, "first", {}))
        if k == n - 1:
            prev_end = _year(facts[group[k - 1]].tau_max)
            if prev_end < 2024:
                y = rng.randint(prev_end, min(prev_end + 4, 2023))
                keep("after", idx, (str(y + 1), None), "after", year=str(y))
            out.append((f"{key}@last", "last", [idx], None, "last", {}))
        if k + 1 < n:
            y = _year(facts[group[k + 1]].tau_min)
            if _year(f.tau_min) < y:  # started before the year the next one began
                out.append((f"{key}@just_before", "just_before", [idx], (None, str(y - 1)), "just_before",
                            {"year": str(y)}))
        if k > 0:
            y = _year(facts[group[k - 1]].tau_max)
            if y < 2024 and f.tau_max >= days_of(dt.date(y + 1, 1, 1)):  # still valid once the year is over
                out.append((f"{key}@right_after", "right_after", [idx], (str(y + 1), None), "right_after",
                            {"year": str(y)}))
        if f.tau_min <= wq.ref_days <= f.tau_max:
            out.append((f"{key}@current", "current", [idx], None, "current", {}))
    return out


def timed(wq: WorldQA) -> None:
    """Every time form of every CEO succession; a capped sample per form of the club memberships."""
    member_forms: dict[str, list[tuple]] = {form: [] for form in _FORMS}
    for key in ("ceo", "member"):
        for head in wq.heads(key):
            group = wq.by_hr[(head, key)]
            for group_name, family, chain, qtime, kind, values in _forms(wq, key, group):
                if key == "member":
                    member_forms[family].append((group_name, family, chain, qtime, kind, values))
                else:
                    wq.add(group_name, family, "temporal", chain, qtime, kind, **values)
            if key == "ceo":
                _succession(wq, group)
                _ceo_born(wq, group)
    for form in _FORMS:
        for group_name, family, chain, qtime, kind, values in wq.sample(member_forms[form], MEMBER_CAP):
            wq.add(group_name, family, "temporal", chain, qtime, kind, **values)


def _succession(wq: WorldQA, group: list[int]) -> None:
    """"Who succeeded / preceded X as CEO of Y": the anchor tenure first, the answer last."""
    facts = wq.facts
    for k, idx in enumerate(group):
        if k > 0:
            wq.add("ceo@succeeded", "succession", "temporal", [group[k - 1], idx], None, "right_after",
                   x=facts[group[k - 1]].tail_name)
        if k + 1 < len(group):
            wq.add("ceo@preceded", "succession", "temporal", [group[k + 1], idx], None, "just_before",
                   x=facts[group[k + 1]].tail_name)


def _ceo_born(wq: WorldQA, group: list[int]) -> None:
    """Two hops through time: the CEO in a year, then where that person was born."""
    for idx in group:
        years = wq.full_years(idx)
        born = wq.only(wq.facts[idx].tail_id, "born")
        if years and born is not None:
            y = wq.rng.choice(years)
            lo, hi = window_days(str(y), str(y))
            if wq.overlapping(group, lo, hi) == [idx]:
                wq.add("ceo@in>born", "multi_hop_2", "multi-hop", [idx, born], (str(y), str(y)), "at", year=str(y))


def anchor_window(wq: WorldQA, idx: int) -> tuple[str | None, str | None]:
    """The time an anchor fact stands for: its window, or its first day's period for a beginning."""
    f = wq.facts[idx]
    if f.relation_name in ("founded by", "place of birth", "spouse"):
        return (f.start, f.start)
    return (f.start, f.end)


def _unique_overlap(wq: WorldQA, group: list[int], window) -> int | None:
    lo, hi = window_days(*window)
    hits = wq.overlapping(group, lo, hi)
    return hits[0] if len(hits) == 1 else None


def relative(wq: WorldQA) -> None:
    """Questions whose time is another fact's: "when X was CEO of Y", "in the year Y was founded", events."""
    facts, rng = wq.facts, wq.rng
    orgs = wq.heads("ceo")
    found: dict[str, list[tuple]] = {g: [] for g in ("rel:ceo>ceo", "rel:ceo>member", "rel:ceo>employer",
                                                     "rel:founded>ceo", "rel:event>ceo")}
    for org in orgs:
        for a in wq.by_hr[(org, "ceo")]:
            window, x, y = anchor_window(wq, a), facts[a].tail_name, facts[a].head_name
            for other in orgs:
                b = _unique_overlap(wq, wq.by_hr[(other, "ceo")], window) if other != org else None
                if b is not None:
                    found["rel:ceo>ceo"].append((a, b, window, {"x": x, "y": y}))
            clubs = wq.by_hr.get((facts[a].tail_id, "member"), [])
            b = _unique_overlap(wq, clubs, window) if len(clubs) >= 2 else None
            if b is not None:
                found["rel:ceo>member"].append((a, b, window, {"x": x, "y": y}))
            persons = [p for p in wq.heads("employer") if p != facts[a].tail_id]
            b = _unique_overlap(wq, wq.by_hr[(rng.choice(persons), "employer")], window) if persons else None
            if b is not None:
                found["rel:ceo>employer"].append((a, b, window, {"x": x, "y": y}))
        founded = wq.only(org, "founder")
        if founded is not None:
            window = anchor_window(wq, founded)
            for other in orgs:
                b = _unique_overlap(wq, wq.by_hr[(other, "ceo")], window) if other != org else None
                if b is not None:
                    found["rel:founded>ceo"].append((founded, b, window, {"y": facts[founded].head_name}))
    for event in wq.heads("venue"):
        a = wq.only(event, "venue")
        organiser = wq.only(event, "organiser")
        for other in orgs:
            if a is None or (organiser is not None and facts[organiser].tail_id == other):
                continue  # the organiser's own CEO is the organiser>ceo@event question
            b = _unique_overlap(wq, wq.by_hr[(other, "ceo")], anchor_window(wq, a))
            if b is not None:
                found["rel:event>ceo"].append((a, b, anchor_window(wq, a), {"e": facts[a].head_name}))
        if organiser is not None:
            b = _unique_overlap(wq, wq.by_hr.get((facts[organiser].tail_id, "ceo"), []), anchor_window(wq, organiser))
            if b is not None:
                wq.add("organiser>ceo@event", "relative", "temporal", [organiser, b], anchor_window(wq, organiser),
                       "relative", dates=(None, None))
    for group, cands in found.items():
        for a, b, window, values in wq.sample(cands, RELATIVE_CAP):
            wq.add(group, "relative", "temporal", [a, b], window, "relative", dates=(None, None),
                   h=facts[b].head_name, **values)
