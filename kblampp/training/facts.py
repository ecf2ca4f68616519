"""Every fact of the KB as training tensors: raw text embeddings (keys/values are recomputed from them
through the trainable K/V encoder), evidence vectors, time windows, and the ids that hard-negative
mining needs (head, relation, head-name parts).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kblampp.schema import Fact

Embed = Callable[[list[str]], np.ndarray]


@dataclass
class FactTable:
    """Row i = fact i (the 5-tuple file's order). Embeddings (N, d_ctx) float32, windows (N,) days."""

    e_h: torch.Tensor
    e_r: torch.Tensor
    e_t: torch.Tensor
    e_c: torch.Tensor
    ctx_vec: torch.Tensor
    tau_min: torch.Tensor
    tau_max: torch.Tensor
    head_keys: list[str]  # head id (or name) per fact
    relation_keys: list[str]
    head_names: list[str]
    tail_names: list[str]
    worlds: list[str | None] | None = None  # context.disamb.world of each fact, when the facts carry it

    @property
    def num_facts(self) -> int:
        return int(self.e_h.shape[0])

    def to(self, device: torch.device | str) -> "FactTable":
        """A copy with every tensor on `device` (the id lists are shared)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    @classmethod
    def from_facts(cls, facts: Sequence[Fact], embed: Embed) -> "FactTable":
        """Embed each distinct text once (head, relation, tail names; evidence sentences)."""
        def table(texts: list[str]) -> torch.Tensor:
            uniq = list(dict.fromkeys(texts))
            vecs = np.asarray(embed(uniq), dtype=np.float32)
            pos = {t: i for i, t in enumerate(uniq)}
            return torch.from_numpy(vecs[[pos[t] for t in texts]])

        e_c = table([f.sentence for f in facts])
        return cls(
            e_h=table([f.head_name for f in facts]), e_r=table([f.relation_name for f in facts]),
            e_t=table([f.tail_name for f in facts]), e_c=e_c, ctx_vec=e_c,
            tau_min=torch.tensor([f.tau_min for f in facts], dtype=torch.float64),
            tau_max=torch.tensor([f.tau_max for f in facts], dtype=torch.float64),
            head_keys=[f.head_id or f.head_name for f in facts],
            relation_keys=[f.relation_id or f.relation_name for f in facts],
            head_names=[f.head_name for f in facts], tail_names=[f.tail_name for f in facts],
            worlds=fact_worlds(facts))

    @classmethod
    def from_store(cls, store: Any, facts: Sequence[Fact]) -> "FactTable":
        """Raw embeddings and meta arrays of a built store (a `KBValueStore`), facts for ids."""
        raw = {k: store.raw(k) for k in ("e_h", "e_r", "e_t", "e_c")}
        meta = {k: np.asarray(store.arrays[f"meta/{k}.npy"]) for k in ("ctx_vec", "tau_min", "tau_max")}
        if len(facts) != len(raw["e_h"]):
            raise ValueError(f"store has {len(raw['e_h'])} facts but the 5-tuple file has {len(facts)}")
        t = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in raw.items()}
        return cls(e_h=t["e_h"], e_r=t["e_r"], e_t=t["e_t"], e_c=t["e_c"],
                   ctx_vec=torch.from_numpy(np.array(meta["ctx_vec"], dtype=np.float32)),
                   tau_min=torch.from_numpy(np.array(meta["tau_min"], dtype=np.float64)),
                   tau_max=torch.from_numpy(np.array(meta["tau_max"], dtype=np.float64)),
                   head_keys=[f.head_id or f.head_name for f in facts],
                   relation_keys=[f.relation_id or f.relation_name for f in facts],
                   head_names=[f.head_name for f in facts], tail_names=[f.tail_name for f in facts],
                   worlds=fact_worlds(facts))

    def concat(self, other: "FactTable") -> "FactTable":
        """This table's facts, then `other`'s (row i of `other` becomes row num_facts + i)."""
        tensors = {f.name: torch.cat([getattr(self, f.name), getattr(other, f.name).to(getattr(self, f.name).device)])
                   for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        lists = {name: getattr(self, name) + getattr(other, name)
                 for name in ("head_keys", "relation_keys", "head_names", "tail_names")}
        worlds = None if self.worlds is None and other.worlds is None else (
            (self.worlds or [None] * self.num_facts) + (other.worlds or [None] * other.num_facts))
        return replace(self, **tensors, **lists, worlds=worlds)

    def group_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(head_id, rel_id) (N,) long: facts sharing both share a (head, relation) (siblings)."""
        heads: dict[str, int] = {}
        rels: dict[str, int] = {}
        h = torch.tensor([heads.setdefault(k, len(heads)) for k in self.head_keys], dtype=torch.long)
        r = torch.tensor([rels.setdefault(k, len(rels)) for k in self.relation_keys], dtype=torch.long)
        return h.to(self.e_h.device), r.to(self.e_h.device)

    def same_head_relation(self, facts: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: the facts sharing (head, relation) with each of `facts` (B,): identical keys,
        so sem cannot tell them apart (the retrieval losses' sem term treats them as one target)."""
        group = self.__dict__.get("_hr_group")
        if group is None or group.device != facts.device:
            h, r = self.group_ids()
            group = (h * (int(r.max()) + 1 if len(r) else 1) + r).to(facts.device)  # (N,) one id per pair
            self.__dict__["_hr_group"] = group
        return group[facts].unsqueeze(1) == group.unsqueeze(0)

    def sibling_index(self) -> torch.Tensor:
        """(N, L) long, -1 padded: row i lists every fact sharing fact i's (head, relation), i included."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(zip(self.head_keys, self.relation_keys)):
            groups.setdefault(key, []).append(i)
        width = max((len(g) for g in groups.values()), default=1)
        out = torch.full((self.num_facts, width), -1, dtype=torch.long)
        for members in groups.values():
            row = torch.tensor(members, dtype=torch.long)
            out[row, :len(members)] = row
        return out.to(self.e_h.device)

    def world_mask(self, worlds: set[str]) -> torch.Tensor | None:
        """(N,) bool: facts of the given worlds; None when the facts carry no world tags."""
        if not self.worlds or not worlds or all(w is None for w in self.worlds):
            return None
        return torch.tensor([w in worlds for w in self.worlds], device=self.e_h.device)


def fact_worlds(facts: Sequence[Fact]) -> list[str | None]:
    """The synthetic generator's world tag (context.disamb.world) of each fact, None where absent."""
    out: list[str | None] = []
    for f in facts:
        disamb = (f.raw.get("context") or {}).get("disamb") if isinstance(f.raw, dict) else None
        out.append(disamb.get("world") if isinstance(disamb, dict) else None)
    return out


def hard_negatives(table: FactTable, answer_facts: Sequence[int], supporting: Sequence[Sequence[int]],
                   limit: int) -> torch.Tensor:
    """(n, limit) fact ids, -1 padded: for each question's answer fact, in this order, the same
    (head, relation) at other times, the same head's other relations, then people sharing a name part
    with the head under the same relation. Supporting facts are never negatives. Deterministic."""
    by_head: dict[str, list[int]] = {}
    by_part_rel: dict[tuple[str, str], list[int]] = {}
    for i, (head, rel, name) in enumerate(zip(table.head_keys, table.relation_keys, table.head_names)):
        by_head.setdefault(head, []).append(i)
        for part in {p.lower() for p in name.split() if len(p) > 1}:
            by_part_rel.setdefault((part, rel), []).append(i)
    out = torch.full((len(answer_facts), max(limit, 0)), -1, dtype=torch.long)
    if limit <= 0:
        return out
    for row, (ans, sup) in enumerate(zip(answer_facts, supporting)):
        head, rel = table.head_keys[ans], table.relation_keys[ans]
        banned = set(sup) | {ans}
        same_hr = [i for i in by_head[head] if table.relation_keys[i] == rel]
        same_h = [i for i in by_head[head] if table.relation_keys[i] != rel]
        parts = {p.lower() for p in table.head_names[ans].split() if len(p) > 1}
        namesakes = sorted({i for p in parts for i in by_part_rel.get((p, rel), []) if table.head_keys[i] != head})
        namesakes = [namesakes[j] for j in np.random.default_rng(ans).permutation(len(namesakes))]  # varied, fixed
        picked: list[int] = []
        for i in same_hr + same_h + namesakes:
            if i not in banned and i not in picked:
                picked.append(i)
            if len(picked) == limit:
                break
        out[row, :len(picked)] = torch.tensor(picked, dtype=torch.long)
    return out
