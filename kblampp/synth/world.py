"""Programmatic, deterministic synthetic worlds of 5-tuple facts (SPEC sections 4-5).

A world is person-centric: many persons with functional attributes (birth city, university,
employer, residence, spouse) plus successive club memberships; organisations with a founder, a
headquarters and 3-4 consecutive CEOs; universities and clubs located in cities; events held in a
city and organised by an organisation. Chains such as org -CEO@time-> person -born-> city give 2- and
3-hop questions. Every evidence sentence names head and tail and states exactly the fact's window.
Same seed and sizes give byte-identical output; names are unique across all worlds of a run.
"""
from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from kblampp.synth.dates import random_day, say_day, say_month
from kblampp.synth.names import NamePool

# key -> (relation id, relation name); the QA generator maps relation names back to these keys.
RELATIONS: dict[str, tuple[str, str]] = {
    "born": ("R001", "place of birth"),
    "educated": ("R002", "educated at"),
    "employer": ("R003", "employer"),
    "spouse": ("R004", "spouse"),
    "residence": ("R005", "residence"),
    "member": ("R006", "member of"),
    "ceo": ("R007", "chief executive officer"),
    "founder": ("R008", "founded by"),
    "hq": ("R009", "headquarters location"),
    "located": ("R010", "located in"),
    "venue": ("R011", "event location"),
    "organiser": ("R012", "organised by"),
}
RELATION_KEY = {name: key for key, (_, name) in RELATIONS.items()}
SOURCE = "synth_programmatic"
LAST_DAY = dt.date(2024, 12, 31)


def world_id(index: int) -> str:
    return f"world_{index:02d}"


@dataclass
class WorldSizes:
    """Entity counts per world; facts per world are roughly 6.5 x persons + 6 x organisations."""

    persons: int = 80
    organisations: int = 10
    cities: int = 15
    universities: int = 6
    clubs: int = 8
    events: int = 8
    min_ceos: int = 3
    max_ceos: int = 4
    spouse_rate: float = 0.4
    member_rate: float = 0.7

    def validate(self) -> None:
        for name in ("persons", "organisations", "cities", "universities", "clubs", "events"):
            if getattr(self, name) < 1:
                raise ValueError(f"sizes.{name}: must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.min_ceos <= self.max_ceos <= 6:
            raise ValueError(f"sizes: need 1 <= min_ceos <= max_ceos <= 6, got {self.min_ceos}..{self.max_ceos}")
        if self.persons < 2 * self.max_ceos:
            raise ValueError(f"sizes.persons: need at least {2 * self.max_ceos} persons for the CEOs")
        for name in ("spouse_rate", "member_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"sizes.{name}: must be in [0, 1], got {getattr(self, name)}")


class _WorldBuilder:
    """Builds the facts of one world; entity ids are `W<world>E<n>` so they never clash across worlds."""

    def __init__(self, index: int, seed: int, taken: set[str], sizes: WorldSizes):
        self.index, self.sizes = index, sizes
        self.world = world_id(index)
        self.rng = random.Random(seed * 1_000_003 + index)
        self.names = NamePool(seed * 1_000_003 + index, taken,
                              num_surnames=max(4, sizes.persons // 3))
        self.facts: list[dict] = []
        self._next = 0

    def entity(self, name: str, etype: str) -> dict:
        self._next += 1
        return {"id": f"W{self.index:02d}E{self._next:04d}", "name": name, "type": etype}

    def add(self, head: dict, key: str, tail: dict, sentence: str, start: str | None, end: str | None) -> None:
        rel_id, rel_name = RELATIONS[key]
        self.facts.append({
            "head": dict(head), "relation": {"id": rel_id, "name": rel_name}, "tail": dict(tail),
            "context": {"source": SOURCE, "page_title": head["name"], "sent_span": sentence,
                        "disamb": {"world": self.world}, "ver": {"url": None, "rev_id": None}},
            "time_window": {"start": start, "end": end, "source": "text_infer"},
        })

    def build(self) -> list[dict]:
        s, rng, names = self.sizes, self.rng, self.names
        cities = [self.entity(names.city(), "LOC") for _ in range(s.cities)]
        unis = [self.entity(names.university(), "ORG") for _ in range(s.universities)]
        orgs = [self.entity(names.organisation(), "ORG") for _ in range(s.organisations)]
        clubs = [self.entity(names.club(), "ORG") for _ in range(s.clubs)]
        persons = [self.entity(names.person(), "PERSON") for _ in range(s.persons)]
        births = [random_day(rng, dt.date(1945, 1, 1), dt.date(1990, 12, 31)) for _ in persons]
        for place in unis + clubs:
            city = rng.choice(cities)
            the = "The " if place in clubs else ""
            self.add(place, "located", city, f"{the}{place['name']} is located in {city['name']}.", None, None)
        founded = self._organisations(orgs, cities, persons, births)
        for i, person in enumerate(persons):
            self._person(person, births[i], cities, unis, orgs, clubs, founded)
        self._spouses(persons, births)
        self._events(cities, orgs, founded)
        return self.facts

    def _organisations(self, orgs, cities, persons, births) -> dict[str, int]:
        """Headquarters, founder and consecutive CEO windows; returns each org's founding year."""
        rng, s = self.rng, self.sizes
        founded: dict[str, int] = {}
        used_ceos: set[int] = set()
        for org in orgs:
            city = rng.choice(cities)
            self.add(org, "hq", city, f"{org['name']} is headquartered in {city['name']}.", None, None)
            n_ceos = rng.randint(s.min_ceos, s.max_ceos)
            year = rng.randint(1972, 2024 - 4 * n_ceos)
            founded[org["id"]] = year
            eligible = [i for i, b in enumerate(births) if b.year <= year - 25] or [min(range(len(births)), key=births.__getitem__)]
            founder = persons[rng.choice(eligible)]
            self.add(org, "founder", founder, f"{org['name']} was founded by {founder['name']} in {year}.", str(year), None)
            start = random_day(rng, dt.date(year, 1, 1), dt.date(year, 12, 31))
            span = (dt.date(2024, 6, 30) - start).days
            tenures = [rng.randint(800, 3300) for _ in range(n_ceos - 1)]
            if sum(tenures) > span - 400:  # squeeze so the last CEO still starts before mid-2024
                tenures = [max(760, t * (span - 400) // sum(tenures)) for t in tenures]
            for k in range(n_ceos):
                pool = [i for i, b in enumerate(births) if b.year <= start.year - 28 and i not in used_ceos]
                pick = rng.choice(pool) if pool else rng.randrange(len(persons))
                used_ceos.add(pick)
                ceo = persons[pick]
                if k == n_ceos - 1:
                    self.add(org, "ceo", ceo, f"{ceo['name']} became the CEO of {org['name']} on {say_day(start)}.",
                             start.isoformat(), None)
                else:
                    end = start + dt.timedelta(days=tenures[k])
                    self.add(org, "ceo", ceo, f"{ceo['name']} became the CEO of {org['name']} on {say_day(start)}, "
                             f"and stepped down on {say_day(end)}.", start.isoformat(), end.isoformat())
                    start = end + dt.timedelta(days=1)
        return founded

    def _person(self, person, birth, cities, unis, orgs, clubs, founded) -> None:
        rng, name = self.rng, person["name"]
        city = rng.choice(cities)
        self.add(person, "born", city, f"{name} was born in {city['name']} on {say_day(birth)}.", birth.isoformat(), None)
        uni = rng.choice(unis)
        y1 = birth.year + rng.randint(17, 20)
        y2 = y1 + rng.randint(3, 6)
        self.add(person, "educated", uni, f"{name} studied at {uni['name']} from {y1} to {y2}.", str(y1), str(y2))
        org = rng.choice(orgs)
        jy, jm = min(2024, max(founded[org["id"]], y2 + rng.randint(0, 10))), rng.randint(1, 12)
        self.add(person, "employer", org, f"{name} has worked for {org['name']} since {say_month(jy, jm)}.",
                 f"{jy}-{jm:02d}", None)
        home = rng.choice(cities)
        ry = min(2024, y2 + rng.randint(0, 20))
        self.add(person, "residence", home, f"{name} has lived in {home['name']} since {ry}.", str(ry), None)
        if rng.random() < self.sizes.member_rate:
            self._memberships(person, birth, clubs)

    def _memberships(self, person, birth, clubs) -> None:
        """1-3 successive, non-overlapping memberships in distinct clubs; the last may be open."""
        rng = self.rng
        start = random_day(rng, dt.date(birth.year + 18, 1, 1), dt.date(birth.year + 30, 12, 31))
        for club in rng.sample(clubs, min(len(clubs), rng.randint(1, 3))):
            if start > dt.date(2024, 6, 30):
                return
            end = start + dt.timedelta(days=rng.randint(700, 3000))
            if end > LAST_DAY or rng.random() < 0.2:
                self.add(person, "member", club, f"{person['name']} has been a member of the {club['name']} "
                         f"since {say_day(start)}.", start.isoformat(), None)
                return
            self.add(person, "member", club, f"{person['name']} was a member of the {club['name']} from "
                     f"{say_day(start)} to {say_day(end)}.", start.isoformat(), end.isoformat())
            start = end + dt.timedelta(days=rng.randint(30, 900))

    def _spouses(self, persons, births) -> None:
        rng = self.rng
        order = list(range(len(persons)))
        rng.shuffle(order)
        n_pairs = int(len(persons) * self.sizes.spouse_rate / 2)
        for a, b in zip(order[: 2 * n_pairs: 2], order[1: 2 * n_pairs: 2]):
            year = min(2024, max(births[a].year, births[b].year) + rng.randint(22, 35))
            day = random_day(rng, dt.date(year, 1, 1), dt.date(year, 12, 31))
            self.add(persons[a], "spouse", persons[b],
                     f"{persons[a]['name']} married {persons[b]['name']} on {say_day(day)}.", day.isoformat(), None)

    def _events(self, cities, orgs, founded) -> None:
        rng = self.rng
        for _ in range(self.sizes.events):
            event = self.entity(self.names.event(), "EVENT")
            org = rng.choice(orgs)
            year, month = rng.randint(founded[org["id"]] + 1, 2024), rng.randint(1, 12)
            when, iso = say_month(year, month), f"{year}-{month:02d}"
            city = rng.choice(cities)
            self.add(event, "venue", city, f"The {event['name']} was held in {city['name']} in {when}.", iso, iso)
            self.add(event, "organiser", org, f"The {event['name']} was organised by {org['name']} in {when}.", iso, iso)


def generate_world(index: int, seed: int, taken: set[str], sizes: WorldSizes | None = None) -> list[dict]:
    """The facts of world `index`; names drawn are added to `taken` (pass one set for a whole run)."""
    sizes = sizes or WorldSizes()
    sizes.validate()
    return _WorldBuilder(index, seed, taken, sizes).build()


def generate_worlds(seed: int, num_worlds: int, sizes: WorldSizes | None = None, progress: bool = False) -> list[dict]:
    """All facts of `num_worlds` worlds, world after world (a fact's index is its position)."""
    if num_worlds < 1:
        raise ValueError(f"num_worlds: must be >= 1, got {num_worlds}")
    from kblampp.progress import progress_bar

    taken: set[str] = set()
    facts: list[dict] = []
    for index in progress_bar(range(num_worlds), desc="worlds", disable=not progress):
        facts.extend(generate_world(index, seed, taken, sizes))
    return facts


def fact_world(fact: dict) -> str | None:
    """The world id a fact carries in `context.disamb.world` (None if absent)."""
    disamb = (fact.get("context") or {}).get("disamb")
    return disamb.get("world") if isinstance(disamb, dict) else None
