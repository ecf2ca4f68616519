"""Realistic, distinct entity names for synthetic worlds.

One `NamePool` per world draws from a Faker instance seeded for that world; a shared `taken` set
keeps every full name unique across all worlds of a run, so a held-out world's entities (and most of
its tails) are names that never occur in training worlds. Persons reuse a small per-world surname pool
and Faker's weighted first names, so a world has people sharing surnames or first names (hard negatives).
"""
from __future__ import annotations

import random
from typing import Callable

from faker import Faker

ADJECTIVES = (
    "Silver", "Golden", "Northern", "Crimson", "Evergreen", "Azure", "Copper", "Iron", "Emerald",
    "Scarlet", "Amber", "Western", "Eastern", "Southern", "Royal", "Granite", "Velvet", "Ivory",
    "Cobalt", "Hidden", "Bright", "Quiet", "Wild", "Midnight", "Sunlit", "Frozen", "Misty", "Bold",
    "Ancient", "Coral", "Jade", "Oaken", "Stormy", "Radiant", "Hollow", "Crystal", "Rustic", "Lunar",
)
NOUNS = (
    "Falcon", "Harbor", "Oak", "River", "Summit", "Lantern", "Meadow", "Anchor", "Beacon", "Cedar",
    "Comet", "Delta", "Ember", "Fjord", "Glacier", "Heron", "Island", "Juniper", "Kestrel", "Lighthouse",
    "Maple", "Orchard", "Pinnacle", "Quarry", "Raven", "Sparrow", "Thistle", "Valley", "Willow",
    "Bay", "Canyon", "Dune", "Fox", "Grove", "Hawk", "Lynx", "Otter", "Pine", "Ridge", "Stag",
)
CLUB_KINDS = (
    "Rowing Club", "Chess Club", "Football Club", "Sailing Club", "Hiking Society", "Jazz Society",
    "Debating Society", "Cycling Club", "Tennis Club", "Photography Society", "Astronomy Club",
    "Drama Society",
)
EVENT_KINDS = (
    "Festival", "Summit", "Marathon", "Expo", "Film Festival", "Book Fair", "Regatta", "Science Fair",
    "Music Awards", "Conference", "Design Week", "Games",
)
ORG_SECTORS = (
    "Robotics", "Analytics", "Foods", "Logistics", "Pharmaceuticals", "Energy", "Textiles", "Media",
    "Aerospace", "Biotech", "Software", "Shipping", "Motors", "Capital", "Labs", "Systems",
)
UNIVERSITY_FORMS = ("{} University", "{} College", "{} Institute of Technology", "University of {}")


def initials_of(name: str) -> str | None:
    """'Jane Hubbard' -> 'J. Hubbard' (two-word names only): how the "initials" questions name a person."""
    parts = name.split()
    return f"{parts[0][0]}. {parts[-1]}" if len(parts) == 2 and parts[0][:1].isalpha() else None


class NamePool:
    """Draws unique names of every entity kind for one world (deterministic given seed and `taken`)."""

    def __init__(self, seed: int, taken: set[str], num_surnames: int = 30, locale: str = "en_US"):
        self.rng = random.Random(seed)
        self.faker = Faker(locale)
        self.faker.seed_instance(seed)
        self.taken = taken
        self.surnames = self._distinct(self.faker.last_name, num_surnames)

    def _distinct(self, make, count: int) -> list[str]:
        """`count` distinct values of `make()` (need not be globally unique: surname components)."""
        out: list[str] = []
        for _ in range(count * 50):
            value = make()
            if value not in out:
                out.append(value)
            if len(out) == count:
                return out
        raise RuntimeError(f"could not draw {count} distinct values")

    def _unique(self, make: Callable[[], str], what: str, short_form: Callable[[str], str | None] | None = None) -> str:
        """A name from `make()` not used before in any world of this run (nor, with `short_form`, one whose
        short form is taken: a reserved "J. Hubbard" keeps out every J... Hubbard); recorded as taken."""
        for _ in range(1000):
            name = make()
            if name not in self.taken and (short_form is None or short_form(name) not in self.taken):
                self.taken.add(name)
                return name
        raise RuntimeError(f"name space for {what} exhausted (too many worlds or entities)")

    def person(self) -> str:
        return self._unique(lambda: f"{self.faker.first_name()} {self.rng.choice(self.surnames)}", "persons",
                            initials_of)

    def city(self) -> str:
        return self._unique(self.faker.city, "cities")

    def organisation(self) -> str:
        def make() -> str:
            if self.rng.random() < 0.4:
                return self.faker.company()
            return f"{self.faker.last_name()} {self.rng.choice(ORG_SECTORS)}"
        return self._unique(make, "organisations")

    def university(self) -> str:
        return self._unique(lambda: self.rng.choice(UNIVERSITY_FORMS).format(self.faker.last_name()), "universities")

    def club(self) -> str:
        return self._unique(
            lambda: f"{self.rng.choice(ADJECTIVES)} {self.rng.choice(NOUNS)} {self.rng.choice(CLUB_KINDS)}", "clubs")

    def event(self) -> str:
        return self._unique(
            lambda: f"{self.rng.choice(ADJECTIVES)} {self.rng.choice(NOUNS)} {self.rng.choice(EVENT_KINDS)}", "events")
