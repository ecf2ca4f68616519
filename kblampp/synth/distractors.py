"""Distractor facts for a grown KB: freshly generated worlds appended after an existing KB's facts.

Why this shape: QA records name their supporting facts by position, so a bigger KB keeps the base
facts first and unchanged and only appends. The new worlds use another seed (their own name and
date draws) and world indices after the base's (entity ids `W<index>E<n>` never repeat), and every
name of the base KB (heads and tails) is reserved before drawing, so no distractor entity shares a
name with an entity the base KB's questions ask about: nothing a question names gets a conflicting
fact. Questions also name a person by initials ("J. Hubbard", `kblampp.synth.names.initials_of`, asked
only where the base KB has one such person), so those short forms are reserved too: no distractor is a
J... Hubbard. `collisions` checks both on the result.

The name pools are finite (about 4,000 university names, for one), so the reserved set starts again
from the base names every `names_block` worlds: distractor worlds of different blocks may share a
name with each other (never with the base KB). The default block of 400 worlds is ~2 x 10^5 facts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from kblampp.progress import progress_bar
from kblampp.synth.names import initials_of
from kblampp.synth.world import WorldSizes, fact_world, generate_world

_WORLD_INDEX = re.compile(r"^world_(\d+)$")


def entity_names(facts: Sequence[dict]) -> set[str]:
    """Every head and tail name of `facts` (the names a question can mention)."""
    return {f[part]["name"] for f in facts for part in ("head", "tail")}


def person_short_forms(facts: Sequence[dict]) -> set[str]:
    """The initials form of every person of `facts` (how an "initials" question names them)."""
    forms = {initials_of(f[part]["name"]) for f in facts for part in ("head", "tail") if f[part].get("type") == "PERSON"}
    return forms - {None}


def first_free_world(facts: Sequence[dict]) -> int:
    """One past the highest `world_<n>` index of `facts` (0 when none carries a world)."""
    found = [int(m.group(1)) for f in facts if (m := _WORLD_INDEX.match(fact_world(f) or ""))]
    return max(found) + 1 if found else 0


def distractor_facts(base: Sequence[dict], count: int, seed: int, sizes: WorldSizes | None = None,
                     progress: bool = True, names_block: int = 400) -> list[dict]:
    """Exactly `count` facts of new worlds (indices from `first_free_world(base)`, names unused in `base`).

    Deterministic; a smaller `count` gives a prefix of a larger one (worlds are drawn in order and the
    last one is cut), so KBs of growing size are nested."""
    if count < 0:
        raise ValueError(f"count: must be >= 0, got {count}")
    if names_block < 1:
        raise ValueError(f"names_block: must be >= 1, got {names_block}")
    reserved = entity_names(base) | person_short_forms(base)
    start, out = first_free_world(base), []
    bar = progress_bar(total=count, desc="distractor facts", unit="fact", disable=not progress or count == 0)
    index = start
    while len(out) < count:
        if (index - start) % names_block == 0:
            taken = set(reserved)
        world = generate_world(index, seed, taken, sizes)
        world = world[:count - len(out)]
        out.extend(world)
        bar.update(len(world))
        index += 1
    bar.close()
    return out


@dataclass
class Collisions:
    """Distractor entities that share a name (or a person's initials form) or an id with the base KB's
    entities (both should be 0)."""

    names: int
    ids: int
    examples: list[str]
    checked: int = 0  # distinct distractor entities compared

    @property
    def rate(self) -> float:
        return 0.0 if not self.checked else (self.names + self.ids) / self.checked


def collisions(base: Sequence[dict], distractors: Sequence[dict]) -> Collisions:
    """Count distractor entities whose name, initials form (persons) or id is also a base entity's."""
    base_names, base_forms = entity_names(base), person_short_forms(base)
    base_ids = {f[p].get("id") for f in base for p in ("head", "tail")} - {None}
    seen: dict[str, str | None] = {}
    persons: set[str] = set()
    for f in distractors:
        for part in ("head", "tail"):
            seen.setdefault(f[part]["name"], f[part].get("id"))
            if f[part].get("type") == "PERSON":
                persons.add(f[part]["name"])
    clash_names = sorted(n for n in seen if n in base_names or (n in persons and initials_of(n) in base_forms))
    clash_ids = sorted(i for i in set(seen.values()) - {None} if i in base_ids)
    return Collisions(len(clash_names), len(clash_ids), (clash_names + clash_ids)[:5], checked=len(seen))


__all__ = ["distractor_facts", "collisions", "Collisions", "entity_names", "first_free_world", "person_short_forms"]
