"""Programmatic QA from a synthetic world file: single-hop, multi-hop (2-3 facts) and temporal.

Every question has exactly one answer fact (`answer_fact`, listed last in `supporting_facts`) whose
tail name is the gold answer; time-dependent hops are resolved through the facts' windows with
`resolve_in_time`, the same rule a checker uses to recompute the answer. Worlds are split whole into
train/dev/test (last worlds held out), and phrasings marked held-out never appear in training.
"""
from __future__ import annotations

import datetime as dt
import math
import random
from collections import defaultdict
from pathlib import Path

from kblampp.schema import Fact
from kblampp.synth.dates import say_day
from kblampp.synth.jsonl import write_jsonl
from kblampp.synth.templates import is_heldout, render, template_ids
from kblampp.synth.world import LAST_DAY, RELATION_KEY
from kblampp.timewin import EPOCH, window_days

SPLITS = ("train", "dev", "test")
CHAINS = ("spouse>born", "employer>hq", "educated>located", "employer>founder", "founder>born",
          "spouse>educated>located", "employer>founder>born", "spouse>employer>hq")
SINGLE = ("born", "educated", "employer", "spouse", "residence", "member", "founder", "hq", "located",
          "venue", "organiser")
_COMPANY_SUFFIXES = (" Inc", " PLC", " LLC", " Ltd", " Group")


def _day(days: float) -> dt.date:
    return EPOCH + dt.timedelta(days=int(days))


def _days(day: dt.date) -> float:
    return float((day - EPOCH).days)


def resolve_in_time(candidates: list[Fact], qtime: tuple[float, float]) -> list[int]:
    """Positions of the candidate facts a question time selects (one expected).

    `in`/`on` (both ends finite): the fact whose window covers the whole question window;
    `before` (open start): the fact valid at the question window's last day;
    `after` (open end): the fact valid at the question window's first day."""
    lo, hi = qtime
    if math.isinf(lo) and math.isinf(hi):
        return list(range(len(candidates)))
    if math.isinf(lo):
        lo = hi
    elif math.isinf(hi):
        hi = lo
    return [i for i, f in enumerate(candidates) if f.tau_min <= lo and hi <= f.tau_max]


def answer_aliases(name: str) -> list[str]:
    """Short forms a reader would accept, e.g. 'Turner Inc' -> ['Turner']."""
    return [name[: -len(s)] for s in _COMPANY_SUFFIXES if name.endswith(s)]


def fact_world_of(fact: Fact) -> str:
    disamb = fact.raw.get("context", {}).get("disamb")
    world = disamb.get("world") if isinstance(disamb, dict) else None
    return world if isinstance(world, str) else "world_unknown"


class _WorldQA:
    """Question candidates of one world; `emit` picks a phrasing and writes the record."""

    def __init__(self, world: str, indices: list[int], facts: list[Fact], rng: random.Random):
        self.world, self.facts, self.rng = world, facts, rng
        self.by_hr: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i in indices:
            key = RELATION_KEY.get(facts[i].relation_name)
            if key is not None and facts[i].head_id is not None:
                self.by_hr[(facts[i].head_id, key)].append(i)
        for group in self.by_hr.values():
            group.sort(key=lambda i: facts[i].tau_min)
        self.items: list[dict] = []

    def only(self, head_id: str | None, key: str) -> int | None:
        """The single fact of a functional (head, relation); None if absent or ambiguous."""
        found = self.by_hr.get((head_id, key), []) if head_id else []
        return found[0] if len(found) == 1 else None

    def add(self, group: str, qtype: str, chain: list[int], qtime: tuple[str | None, str | None] | None,
            **values: str) -> None:
        head = self.facts[chain[0]].head_name
        self.items.append({"group": group, "type": qtype, "chain": chain, "qtime": qtime,
                           "values": {"h": head, **values}})

    def unique_at(self, idx: int, key: str, qtime: tuple[str | None, str | None]) -> bool:
        """True when `qtime` selects exactly fact `idx` among its (head, relation) siblings."""
        siblings = self.by_hr[(self.facts[idx].head_id, key)]
        hits = resolve_in_time([self.facts[i] for i in siblings], window_days(*qtime))
        return [siblings[h] for h in hits] == [idx]

    def full_years(self, idx: int) -> list[int]:
        f = self.facts[idx]
        first = _day(f.tau_min).year + (0 if _day(f.tau_min) == dt.date(_day(f.tau_min).year, 1, 1) else 1)
        last_day = LAST_DAY if math.isinf(f.tau_max) else _day(f.tau_max)
        last = last_day.year - (0 if last_day == dt.date(last_day.year, 12, 31) else 1)
        return list(range(first, last + 1))

    def build(self) -> list[dict]:
        for (head_id, key), group in sorted(self.by_hr.items()):
            if key in SINGLE and key != "member" and len(group) == 1:
                self.add(key, "single-hop", group, None)
            if key == "member":
                if len(group) == 1:
                    self.add(key, "single-hop", group, None)
                self.timed(key, group, ("in", "on"))
            if key == "ceo":
                self.timed(key, group, ("in", "on", "before", "after"))
                self.ceo_born(group)
            if key == "organiser":
                self.organiser_ceo(group)
        self.chains()
        return self.items

    def timed(self, key: str, group: list[int], forms: tuple[str, ...]) -> None:
        rng = self.rng
        for k, idx in enumerate(group):
            f = self.facts[idx]
            years = self.full_years(idx)
            if "in" in forms and years:
                y = rng.choice(years)
                self.try_timed(f"{key}@in", idx, key, (str(y), str(y)), year=str(y))
            if "on" in forms:
                hi = min(f.tau_max, _days(LAST_DAY))
                day = _day(rng.randint(int(f.tau_min), int(hi)))
                self.try_timed(f"{key}@on", idx, key, (day.isoformat(), day.isoformat()), date=say_day(day))
            if "before" in forms and k + 1 < len(group):
                y = _day(self.facts[group[k + 1]].tau_min).year
                self.try_timed(f"{key}@before", idx, key, (None, str(y - 1)), year=str(y))
            if "after" in forms and k > 0:
                y = _day(self.facts[group[k - 1]].tau_max).year
                self.try_timed(f"{key}@after", idx, key, (str(y + 1), None), year=str(y))

    def try_timed(self, group: str, idx: int, key: str, qtime: tuple[str | None, str | None], **values: str) -> None:
        if self.unique_at(idx, key, qtime):
            self.add(group, "temporal", [idx], qtime, **values)

    def ceo_born(self, group: list[int]) -> None:
        for idx in group:
            years = self.full_years(idx)
            born = self.only(self.facts[idx].tail_id, "born")
            if years and born is not None:
                y = str(self.rng.choice(years))
                if self.unique_at(idx, "ceo", (y, y)):
                    self.add("ceo@in>born", "multi-hop", [idx, born], (y, y), year=y)

    def organiser_ceo(self, group: list[int]) -> None:
        if len(group) != 1:
            return
        event_fact = self.facts[group[0]]
        qtime = (event_fact.start, event_fact.end)
        ceos = self.by_hr.get((event_fact.tail_id, "ceo"), [])
        for idx in ceos:
            if self.unique_at(idx, "ceo", qtime):
                self.add("organiser>ceo@event", "multi-hop", [group[0], idx], qtime)

    def chains(self) -> None:
        starts = sorted({h for (h, _k) in self.by_hr})
        for group in CHAINS:
            keys = group.split(">")
            for head in starts:
                chain, node = [], head
                for key in keys:
                    idx = self.only(node, key)
                    if idx is None:
                        break
                    chain.append(idx)
                    node = self.facts[idx].tail_id
                if len(chain) == len(keys):
                    self.add(group, "multi-hop", chain, None)


def _record(item: dict, facts: list[Fact], template: str, qid: str, dataset: str, world: str) -> dict:
    answer_fact = item["chain"][-1]
    answer = facts[answer_fact].tail_name
    qtime = item["qtime"]
    return {
        "qid": qid, "dataset": dataset, "question": render(template, **item["values"]), "answer": answer,
        "type": item["type"], "supporting_facts": list(item["chain"]),
        "question_time": None if qtime is None else {"start": qtime[0], "end": qtime[1]},
        "world": world, "template": template, "heldout_phrasing": is_heldout(template),
        "relation": facts[answer_fact].relation_name, "answer_fact": answer_fact,
        "answer_aliases": answer_aliases(answer),
    }


def split_worlds(worlds: list[str], dev_worlds: int, test_worlds: int) -> dict[str, list[str]]:
    """Whole worlds per split: the last `test_worlds` are test, the `dev_worlds` before them dev."""
    if dev_worlds < 0 or test_worlds < 0:
        raise ValueError("dev_worlds and test_worlds must be >= 0")
    n_train = len(worlds) - dev_worlds - test_worlds
    if n_train < 1:
        raise ValueError(f"{len(worlds)} world(s) cannot give {dev_worlds} dev + {test_worlds} test worlds "
                         "and at least one training world")
    return {"train": worlds[:n_train], "dev": worlds[n_train:n_train + dev_worlds],
            "test": worlds[n_train + dev_worlds:]}


def generate_qa(facts: list[Fact], seed: int = 0, dev_worlds: int = 1, test_worlds: int = 1,
                dataset: str = "synth_world", train_variants: int = 1,
                eval_heldout_only: bool = False) -> dict[str, list[dict]]:
    """QA records per split. Training questions use only non-held-out phrasings (`train_variants`
    distinct ones per question when available); dev/test draw from all phrasings, or only from the
    held-out ones with `eval_heldout_only`."""
    if train_variants < 1:
        raise ValueError(f"train_variants: must be >= 1, got {train_variants}")
    members: dict[str, list[int]] = defaultdict(list)
    for i, fact in enumerate(facts):
        members[fact_world_of(fact)].append(i)
    worlds = list(members)  # order of first appearance in the file
    split_of = {w: s for s, ws in split_worlds(worlds, dev_worlds, test_worlds).items() for w in ws}
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for w_pos, world in enumerate(worlds):
        rng = random.Random(seed * 1_000_003 + w_pos)
        split = split_of[world]
        items = _WorldQA(world, members[world], facts, rng).build()
        n = 0
        for item in items:
            ids = template_ids(item["group"])
            if split == "train":
                pool = [t for t in ids if not is_heldout(t)]
                chosen = rng.sample(pool, min(train_variants, len(pool)))
            else:
                pool = [t for t in ids if is_heldout(t)] if eval_heldout_only else ids
                chosen = [rng.choice(pool)]
            for template in chosen:
                out[split].append(_record(item, facts, template, f"{dataset}-{world}-{n:05d}", dataset, world))
                n += 1
    return out


def write_qa(splits: dict[str, list[dict]], out_dir: str | Path, prefix: str = "synth_world") -> dict[str, Path]:
    """Write `<prefix>_{train,dev,test}.jsonl` atomically; returns the paths."""
    paths = {}
    for split in SPLITS:
        path = Path(out_dir) / f"{prefix}_{split}.jsonl"
        write_jsonl(path, splits.get(split, []))
        paths[split] = path
    return paths
