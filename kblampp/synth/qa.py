"""Programmatic QA from a synthetic world file, one question family at a time (docs/DESIGN_QA.md).

Every answerable question has exactly one answer fact (`answer_fact`, listed last in
`supporting_facts`; succession and relative questions list their anchor fact first) whose tail name
is the gold answer, and a gold typed `time_constraint` that `kblampp.question_time` must read from the
text. Whether a time form selects exactly one fact is decided here by construction (the neighbouring
tenure, the only overlapping window); `kblampp.answer_check` recomputes every answer independently.
About 10% of each split is unanswerable. Worlds are split whole into train/dev/test (last worlds
held out), and phrasings marked held-out never appear in training.
"""
from __future__ import annotations

import datetime as dt
import math
import random
from collections import Counter, defaultdict
from pathlib import Path

from kblampp.schema import Fact
from kblampp.synth.families import NO_ANSWER
from kblampp.synth.jsonl import write_jsonl
from kblampp.synth.names import initials_of
from kblampp.synth.templates import is_heldout, render, render_anchor, template_ids
from kblampp.synth.world import LAST_DAY, RELATION_KEY
from kblampp.timewin import EPOCH

SPLITS = ("train", "dev", "test")
SINGLE = ("born", "educated", "employer", "spouse", "residence", "member", "founder", "hq", "located",
          "venue", "organiser")
PERSON_KEYS = ("born", "educated", "employer", "spouse", "residence", "member")
REFERENCE_DATE = LAST_DAY.isoformat()
UNANSWERABLE_SHARE = 0.10
# share of single-hop questions asked in each surface form (the rest plainly)
SURFACE_SHARE = {"paraphrase": 0.15, "lowercase": 0.15, "initials": 0.15}
_COMPANY_SUFFIXES = (" Inc", " PLC", " LLC", " Ltd", " Group")


def day_of(days: float) -> dt.date:
    return EPOCH + dt.timedelta(days=int(days))


def days_of(day: dt.date) -> float:
    return float((day - EPOCH).days)


def answer_aliases(name: str) -> list[str]:
    """Short forms a reader would accept, e.g. 'Turner Inc' -> ['Turner']."""
    return [name[: -len(s)] for s in _COMPANY_SUFFIXES if name.endswith(s)]


def fact_world_of(fact: Fact) -> str:
    disamb = fact.raw.get("context", {}).get("disamb")
    world = disamb.get("world") if isinstance(disamb, dict) else None
    return world if isinstance(world, str) else "world_unknown"


class WorldQA:
    """One world's facts, indexed for question building; families append items to `items`."""

    def __init__(self, world: str, indices: list[int], facts: list[Fact], rng: random.Random,
                 reference_date: str, file_names: set[str], initials_count: Counter):
        self.world, self.facts, self.rng, self.indices = world, facts, rng, indices
        self.reference_date = reference_date
        self.ref_days = days_of(dt.date.fromisoformat(reference_date))
        self.file_names, self.initials_count = file_names, initials_count
        self.by_hr: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.entity_type: dict[str, str] = {}
        self.name: dict[str, str] = {}
        for i in indices:
            f = facts[i]
            key = RELATION_KEY.get(f.relation_name)
            if key is not None and f.head_id is not None:
                self.by_hr[(f.head_id, key)].append(i)
            for part in ("head", "tail"):
                ent = f.raw[part]
                if ent.get("id"):
                    self.entity_type.setdefault(ent["id"], ent.get("type") or "")
                    self.name.setdefault(ent["id"], ent["name"])
        for group in self.by_hr.values():
            group.sort(key=lambda i: facts[i].tau_min)
        self.items: list[dict] = []

    def heads(self, key: str) -> list[str]:
        return sorted(h for (h, k) in self.by_hr if k == key)

    def only(self, head_id: str | None, key: str) -> int | None:
        """The single fact of a (head, relation); None if absent or several."""
        found = self.by_hr.get((head_id, key), []) if head_id else []
        return found[0] if len(found) == 1 else None

    def overlapping(self, group: list[int], lo: float, hi: float) -> list[int]:
        return [i for i in group if self.facts[i].tau_min <= hi and lo <= self.facts[i].tau_max]

    def now_fact(self, head_id: str, key: str) -> int | None:
        """The one fact of (head, key) valid at the reference date, if exactly one."""
        hits = self.overlapping(self.by_hr.get((head_id, key), []), self.ref_days, self.ref_days)
        return hits[0] if len(hits) == 1 else None

    def full_years(self, idx: int) -> list[int]:
        f = self.facts[idx]
        first_day = day_of(f.tau_min)
        first = first_day.year + (0 if first_day == dt.date(first_day.year, 1, 1) else 1)
        last_day = LAST_DAY if math.isinf(f.tau_max) else day_of(f.tau_max)
        last = last_day.year - (0 if last_day == dt.date(last_day.year, 12, 31) else 1)
        return list(range(first, last + 1))

    def add(self, group: str, family: str, qtype: str, chain: list[int], qtime=None, kind: str | None = None,
            dates=None, **values: str) -> dict:
        """Queue one question; `qtime` is the record's question_time, `dates` the constraint's (default qtime)."""
        if "h" not in values:
            values["h"] = self.facts[chain[0]].head_name
        item = {"group": group, "family": family, "type": qtype, "chain": chain, "qtime": qtime, "kind": kind,
                "dates": qtime if dates is None else dates, "values": values}
        self.items.append(item)
        return item

    def sample(self, items: list, cap: int) -> list:
        """At most `cap` of `items`, drawn with the world's rng (order kept)."""
        if len(items) <= cap:
            return items
        keep = set(self.rng.sample(range(len(items)), cap))
        return [x for i, x in enumerate(items) if i in keep]


def _single_hop(wq: WorldQA) -> None:
    """One question per functional (head, relation); a share of them in a surface form."""
    for (head_id, key), group in sorted(wq.by_hr.items()):
        if key not in SINGLE or len(group) != 1:
            continue
        item = wq.add(key, "single_hop", "single-hop", group)
        draw = wq.rng.random()
        cut = 0.0
        for surface, share in SURFACE_SHARE.items():
            cut += share
            if draw < cut:
                if surface == "paraphrase":
                    item.update(group=f"{key}~p", family="paraphrase")
                elif surface == "lowercase":
                    item["family"] = "lowercase"
                elif key in PERSON_KEYS and wq.initials_count.get(initials_of(wq.name[head_id]) or "", 0) == 1:
                    item["family"] = "initials"
                break


def build_world(wq: WorldQA) -> list[dict]:
    from kblampp.synth.qa_chains import chains
    from kblampp.synth.qa_time import relative, timed
    from kblampp.synth.qa_unans import unanswerable

    _single_hop(wq)
    timed(wq)
    relative(wq)
    chains(wq)
    unanswerable(wq, round(len(wq.items) * UNANSWERABLE_SHARE / (1 - UNANSWERABLE_SHARE)))
    return wq.items


def _surface(values: dict, family: str) -> dict:
    if family == "lowercase":
        return {k: v.lower() for k, v in values.items()}
    if family == "initials":
        return {**values, "h": initials_of(values["h"])}
    return values


def _record(item: dict, facts: list[Fact], template: str, qid: str, dataset: str, world: str,
            reference_date: str) -> dict:
    values = _surface(item["values"], item["family"])
    kind, dates = item["kind"], item["dates"]
    if kind == "current":
        dates = (reference_date, reference_date)
    constraint = None if kind is None else {
        "kind": kind, "start": None if dates is None else dates[0], "end": None if dates is None else dates[1],
        "anchor": render_anchor(template, **values)}
    qtime = (reference_date, reference_date) if kind == "current" else item["qtime"]
    record = {
        "qid": qid, "dataset": dataset, "question": render(template, **values), "type": item["type"],
        "question_time": None if qtime is None else {"start": qtime[0], "end": qtime[1]},
        "world": world, "template": template, "heldout_phrasing": is_heldout(template), "family": item["family"],
    }
    if item["type"] == "unanswerable":
        un = item["unanswerable"]
        record.update({"answer": NO_ANSWER, "supporting_facts": [], "relation": un["relation"], "answer_fact": None,
                       "answer_aliases": [], "answerable": False, "time_constraint": constraint,
                       "unanswerable_reason": un["reason"], "subject": un["subject"],
                       "near_miss_facts": un["near"]})
        return {k: record[k] for k in _UNANS_ORDER}
    answer_fact = item["chain"][-1]
    answer = facts[answer_fact].tail_name
    record.update({"answer": answer, "supporting_facts": list(item["chain"]),
                   "relation": facts[answer_fact].relation_name, "answer_fact": answer_fact,
                   "answer_aliases": answer_aliases(answer), "answerable": True, "time_constraint": constraint})
    return {k: record[k] for k in _ORDER}


_ORDER = ("qid", "dataset", "question", "answer", "type", "supporting_facts", "question_time", "world", "template",
          "heldout_phrasing", "relation", "answer_fact", "answer_aliases", "family", "answerable", "time_constraint")
_UNANS_ORDER = _ORDER + ("unanswerable_reason", "subject", "near_miss_facts")


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


def _file_names(facts: list[Fact]) -> tuple[set[str], Counter]:
    """Every entity name of the file (casefolded) and how many persons share each initials form."""
    names: set[str] = set()
    persons: set[str] = set()
    for f in facts:
        for part in ("head", "tail"):
            ent = f.raw[part]
            names.add(ent["name"].casefold())
            if ent.get("type") == "PERSON":
                persons.add(ent["name"])
    return names, Counter(initials_of(n) for n in persons)


def generate_qa(facts: list[Fact], seed: int = 0, dev_worlds: int = 1, test_worlds: int = 1,
                dataset: str = "synth_world", train_variants: int = 1, eval_heldout_only: bool = False,
                reference_date: str = REFERENCE_DATE) -> dict[str, list[dict]]:
    """QA records per split. Training questions use only non-held-out phrasings (`train_variants`
    distinct ones per question when available); dev/test draw from all phrasings, or only from the
    held-out ones with `eval_heldout_only`. "now" in a question means `reference_date`."""
    if train_variants < 1:
        raise ValueError(f"train_variants: must be >= 1, got {train_variants}")
    dt.date.fromisoformat(reference_date)
    members: dict[str, list[int]] = defaultdict(list)
    for i, fact in enumerate(facts):
        members[fact_world_of(fact)].append(i)
    worlds = list(members)  # order of first appearance in the file
    split_of = {w: s for s, ws in split_worlds(worlds, dev_worlds, test_worlds).items() for w in ws}
    file_names, initials_count = _file_names(facts)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for w_pos, world in enumerate(worlds):
        rng = random.Random(seed * 1_000_003 + w_pos)
        split = split_of[world]
        items = build_world(WorldQA(world, members[world], facts, rng, reference_date, file_names, initials_count))
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
                out[split].append(_record(item, facts, template, f"{dataset}-{world}-{n:05d}", dataset, world,
                                          reference_date))
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
