"""2- and 3-hop chains over every relation sequence the world supports (`templates.chain_groups`).

A hop follows a (head, relation) with exactly one fact, or `ceo@now`: the CEO at the reference date.
Chains never revisit an entity. Per world, a capped number of chains per length is drawn round-robin
over the sequences, so rare sequences (through spouses, events) are all kept and common ones sampled.
"""
from __future__ import annotations

from kblampp.synth.qa import WorldQA
from kblampp.synth.templates import chain_groups

CHAIN_CAP = {2: 170, 3: 150}  # questions per world


def _hop(wq: WorldQA, node: str, key: str) -> int | None:
    if key == "ceo@now":
        return wq.now_fact(node, "ceo")
    return wq.only(node, key)


def _follow(wq: WorldQA, head: str, keys: list[str]) -> list[int] | None:
    chain, seen, node = [], {head}, head
    for key in keys:
        idx = _hop(wq, node, key)
        if idx is None:
            return None
        node = wq.facts[idx].tail_id
        if node is None or node in seen:
            return None
        seen.add(node)
        chain.append(idx)
    return chain


def chains(wq: WorldQA) -> None:
    heads = sorted({h for (h, _k) in wq.by_hr})
    for length, cap in CHAIN_CAP.items():
        pools = []
        for group in chain_groups(length):
            keys = group.split(">")
            found = [c for c in (_follow(wq, h, keys) for h in heads) if c is not None]
            wq.rng.shuffle(found)
            pools.append((group, found))
        picked: list[tuple[str, list[int]]] = []
        depth = 0
        while len(picked) < cap and any(depth < len(found) for _g, found in pools):
            for group, found in pools:
                if depth < len(found) and len(picked) < cap:
                    picked.append((group, found[depth]))
            depth += 1
        for group, chain in picked:
            now = "ceo@now" in group
            head = wq.facts[chain[0]]
            the = "the " if head.raw["head"].get("type") == "EVENT" else ""  # "the Coral Comet Book Fair"
            wq.add(group, f"multi_hop_{length}", "multi-hop", chain, None, "current" if now else None,
                   h=the + head.head_name)
