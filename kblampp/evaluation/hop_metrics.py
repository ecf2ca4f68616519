"""Per-hop retrieval of the multi-hop model (issue 11), from each question's last-token records.

hop j recall@K: the chain's j-th supporting fact is among the j-th inject layer's K_top candidates,
over the multi-hop questions whose chain has a j-th fact (2-hop and 3-hop also apart); hop choice
accuracy: the answer head copied from the layer of the chain's last fact (`kblampp.hops.is_entity_chain`;
other questions: the first layer). Rows run with one inject layer have no hops and are left out.
"""
from __future__ import annotations

from typing import Any, Sequence

from kblampp.hops import is_entity_chain
from kblampp.schema import Fact, QARecord

MULTI_HOP = "multi-hop"


def hop_summary(last: Sequence[Any], records: Sequence[QARecord], facts: Sequence[Fact]) -> dict[str, float] | None:
    """Per-hop recall@K and hop-choice accuracy of one row; None when the row recorded no hops."""
    pairs = [(r, rec) for r, rec in zip(last, records) if r is not None and r.hops and rec.answerable]
    if not pairs:
        return None
    head_of, tail_of = (lambda i: facts[i].head_name), (lambda i: facts[i].tail_name)

    def expected_hop(record: QARecord, n_layers: int) -> int:
        """The layer whose candidates should answer: a chain's last hop, else the first layer."""
        if not is_entity_chain(record.supporting_facts, record.type, head_of, tail_of):
            return 0
        return min(len(record.supporting_facts), n_layers) - 1

    n_layers = len(pairs[0][0].hops)
    out: dict[str, float] = {}
    for j in range(n_layers):
        for label, want in (("", None), ("2hop/", 2), ("3hop/", 3)):
            sel = [(r, rec) for r, rec in pairs if rec.type == MULTI_HOP and len(rec.supporting_facts) > j
                   and (want is None or len(rec.supporting_facts) == want)]
            if sel:
                hits = [rec.supporting_facts[j] in r.hops[j]["cand_ids"] for r, rec in sel]
                out[f"{label}hop{j + 1}_recall@K"] = sum(hits) / len(hits)
                out[f"{label}hop{j + 1}_n"] = float(len(hits))
    chosen = [(r, rec) for r, rec in pairs if r.hop is not None]
    if chosen:
        out["hop_choice_acc"] = sum(r.hop == expected_hop(rec, n_layers) for r, rec in chosen) / len(chosen)
        multi = [(r, rec) for r, rec in chosen if rec.type == MULTI_HOP]
        single = [(r, rec) for r, rec in chosen if rec.type != MULTI_HOP]
        if multi:
            out["hop_choice_acc_multi"] = sum(r.hop == expected_hop(rec, n_layers) for r, rec in multi) / len(multi)
        if single:
            out["hop_choice_acc_other"] = sum(r.hop == expected_hop(rec, n_layers) for r, rec in single) / len(single)
    return out


def markdown_hops(summary: dict[str, dict[str, float]]) -> str:
    """A small table: one line per row with hops, recall per hop on 2-hop and 3-hop questions."""
    if not summary:
        return ""
    cols = sorted({k for s in summary.values() for k in s if k.endswith("recall@K") or k.startswith("hop_choice")})
    lines = ["Per-hop retrieval at the last prompt token (recall@K of the chain's j-th fact at the j-th inject "
             "layer; hop choice = the answer head copied from the layer of the chain's last fact):", "",
             "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row, s in summary.items():
        lines.append(f"| {row} | " + " | ".join("–" if c not in s else f"{100 * s[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)
