"""LLM generators: worlds (plan prompt 4.1.1) and QA (plan prompt 4.1.2), validated item by item.

Repairs are limited to bookkeeping the model cannot know (world id, id prefixes, the `source`
fields, stripped names); anything semantically wrong (schema problems, an evidence sentence that
does not name head and tail, a name already used by another world, an answer that is no supporting
fact's tail or that the facts do not give for the question's family, an index out of range) rejects
the item with a message. QA items get a `family` (inferred when the model names none) and the
`time_constraint` that `kblampp.question_time` reads from the question.
"""
from __future__ import annotations

import copy
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from kblampp.answer_check import FactLookup, check_record
from kblampp.question_time import TimeConstraint, parse_time_constraint
from kblampp.schema import check_fact, check_qa, load_facts
from kblampp.synth.families import NO_ANSWER
from kblampp.synth.jsonl import write_jsonl
from kblampp.synth.llm_client import LLMClient
from kblampp.synth.pipeline import StepReport, qa_counts
from kblampp.synth.prompts import WORLD_PROMPT, qa_prompt
from kblampp.synth.qa import REFERENCE_DATE, SPLITS, answer_aliases, fact_world_of, split_worlds
from kblampp.synth.world import world_id

LLM_SOURCE = "llm_synth"


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def repair_fact(item: dict, world: str, index: int) -> dict:
    """Fill bookkeeping fields and make ids world-unique; the semantic content is left as is."""
    fact = copy.deepcopy(item)
    for key in ("head", "relation", "tail"):
        part = fact.get(key)
        if isinstance(part, dict):
            if isinstance(part.get("name"), str):
                part["name"] = part["name"].strip()
            if key != "relation" and isinstance(part.get("id"), str):
                part["id"] = f"W{index:02d}{part['id']}"
    ctx = fact.get("context")
    if isinstance(ctx, dict):
        ctx.setdefault("source", LLM_SOURCE)
        if isinstance(fact.get("head"), dict):
            ctx.setdefault("page_title", fact["head"].get("name"))
        if not isinstance(ctx.get("disamb"), dict):
            ctx["disamb"] = {}
        ctx["disamb"]["world"] = world
        ctx.setdefault("ver", {"url": None, "rev_id": None})
    if isinstance(fact.get("time_window"), dict):
        fact["time_window"].setdefault("source", "text_infer")
    return fact


def world_validator(index: int, taken: dict[str, str]):
    """Validator for one world's items; `taken` maps entity names to the world that used them first."""
    world = world_id(index)

    def validate(items: list[Any]) -> tuple[list[dict], list[str]]:
        valid, rejected, seen = [], [], set()
        names: dict[str, str] = {}
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                rejected.append(f"item {i}: <item>: expected a JSON object, got {type(item).__name__}")
                continue
            fact = repair_fact(item, world, index)
            problems = check_fact(fact, i)
            if problems:
                rejected.extend(f"item {i}: {p.field}: {p.reason}" for p in problems)
                continue
            sentence = _norm(fact["context"]["sent_span"])
            missing = [k for k in ("head", "tail") if _norm(fact[k]["name"]) not in sentence
                       and (k == "head" or fact["tail"].get("id") is not None)]
            if missing:
                rejected.append(f"item {i}: context.sent_span: does not mention the {missing[0]} name "
                                f"{fact[missing[0]]['name']!r}")
                continue
            clash = [k for k in ("head", "tail") if taken.get(_norm(fact[k]["name"]), world) != world
                     and (k == "head" or fact["tail"].get("id") is not None)]
            if clash:
                name = fact[clash[0]]["name"]
                rejected.append(f"item {i}: {clash[0]}.name: entity {name!r} already used in "
                                f"{taken[_norm(name)]}")
                continue
            key = (fact["head"]["name"], fact["relation"]["name"], fact["tail"]["name"],
                   fact["time_window"]["start"], fact["time_window"]["end"])
            if key in seen:
                rejected.append(f"item {i}: <item>: duplicate of an earlier fact")
                continue
            seen.add(key)
            for k in ("head", "tail"):
                if k == "head" or fact["tail"].get("id") is not None:
                    names[_norm(fact[k]["name"])] = world
            valid.append(fact)
        if valid:
            taken.update(names)
        return valid, rejected

    return validate


def make_llm_world_file(client: LLMClient, out: str | Path, num_worlds: int) -> StepReport:
    """Ask for `num_worlds` worlds with the plan's prompt; write the validated facts to one file."""
    t0 = time.perf_counter()
    taken: dict[str, str] = {}
    facts: list[dict] = []
    rejected = 0
    for index in range(num_worlds):
        valid, bad = client.generate(WORLD_PROMPT, world_validator(index, taken), world_id(index))
        facts.extend(valid)
        rejected += len(bad)
    n = write_jsonl(out, facts)
    return StepReport({"facts": Path(out)}, {"facts": n}, time.perf_counter() - t0,
                      {"worlds": num_worlds, "rejected items": rejected})


def infer_family(record: dict, constraint: TimeConstraint | None) -> str:
    """The family of an LLM question that names none: from its type, hop count and parsed time."""
    if record["type"] == "single-hop":
        return "single_hop"
    if record["type"] == "multi-hop":
        return f"multi_hop_{min(max(len(record['supporting_facts']), 2), 3)}"
    if constraint is None:
        return "in"
    if constraint.anchor is not None and constraint.kind != "relative":
        return "succession"
    if constraint.kind == "at":
        return "on" if constraint.start is not None and len(constraint.start) == 10 else "in"
    return constraint.kind


def _llm_record(item: dict, members: list[int], facts: list) -> tuple[dict | None, str | None]:
    """The record of one schema-valid item (global indices, answer fact last), or the reason it is unusable."""
    record = dict(item)
    if item["type"] == "unanswerable" or item.get("answerable") is False:
        record.update({"answer": NO_ANSWER, "supporting_facts": [], "answer_fact": None, "answer_aliases": [],
                       "answerable": False, "near_miss_facts": [members[j] for j in item.get("near_miss_facts", [])
                                                                if 0 <= j < len(members)]})
        return record, None
    support = [members[j] for j in item["supporting_facts"]]
    hits = [g for g in support if _norm(facts[g].tail_name) == _norm(item["answer"])]
    if not hits:
        return None, f"answer: {item['answer']!r} is the tail of no supporting fact"
    answer_fact = hits[-1]
    record.update({"supporting_facts": [g for g in support if g != answer_fact] + [answer_fact],
                   "relation": facts[answer_fact].relation_name, "answer_fact": answer_fact,
                   "answer": facts[answer_fact].tail_name, "answer_aliases": answer_aliases(facts[answer_fact].tail_name),
                   "answerable": True})
    return record, None


def qa_validator(world: str, members: list[int], facts: list, dataset: str, counter: list[int],
                 lookup: FactLookup | None = None, reference_date: str = REFERENCE_DATE):
    """Validator for one world's QA items: schema, local index range, answer = a supporting tail, and
    the answer recomputed from the facts (kblampp.answer_check) for the item's family."""
    lookup = lookup or FactLookup(list(facts))

    def validate(items: list[Any]) -> tuple[list[dict], list[str]]:
        valid, rejected = [], []
        for i, item in enumerate(items):
            problems = check_qa(item, i, num_facts=len(members))
            if problems:
                rejected.extend(f"item {i}: {p.field}: {p.reason}" for p in problems)
                continue
            record, why = _llm_record(item, members, facts)
            if record is None:
                rejected.append(f"item {i}: {why}")
                continue
            constraint = parse_time_constraint(record["question"], reference_date)
            record["family"] = item.get("family") or infer_family(record, constraint)
            record["time_constraint"] = None if constraint is None else constraint.to_dict()
            problems = check_qa(record, i, num_facts=len(facts))
            found = [(p.field, p.reason) for p in problems] or check_record(record, lookup, reference_date)
            if found:
                rejected.extend(f"item {i}: {field}: {reason}" for field, reason in found)
                continue
            record.update({"qid": f"{dataset}-llm-{world}-{counter[0]:05d}", "llm_qid": item["qid"],
                           "dataset": dataset, "world": world, "template": "llm"})
            counter[0] += 1
            valid.append(record)
        return valid, rejected

    return validate


def make_llm_qa_files(client: LLMClient, world_path: str | Path, out_dir: str | Path, prefix: str = "synth_world",
                      dev_worlds: int = 1, test_worlds: int = 1, reference_date: str = REFERENCE_DATE) -> StepReport:
    """QA per world with the plan's prompt; indices mapped to the world file's lines; split by world."""
    t0 = time.perf_counter()
    facts = load_facts(world_path)
    lookup = FactLookup(facts)
    members: dict[str, list[int]] = defaultdict(list)
    for i, fact in enumerate(facts):
        members[fact_world_of(fact)].append(i)
    split_of = {w: s for s, ws in split_worlds(list(members), dev_worlds, test_worlds).items() for w in ws}
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    rejected = 0
    for world, idx in members.items():
        prompt = qa_prompt([facts[i].raw for i in idx], reference_date)
        valid, bad = client.generate(prompt, qa_validator(world, idx, facts, prefix, [0], lookup, reference_date), world)
        out[split_of[world]].extend(valid)
        rejected += len(bad)
    paths = {}
    for split in SPLITS:
        paths[split] = Path(out_dir) / f"{prefix}_{split}.jsonl"
        write_jsonl(paths[split], out[split])
    return StepReport(paths, {s: len(v) for s, v in out.items()}, time.perf_counter() - t0,
                      {"rejected items": rejected, **qa_counts(out)})
