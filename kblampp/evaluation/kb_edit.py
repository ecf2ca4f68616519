"""KB-edit check (SPEC section 7): change answer facts' tails in a COPY of the evaluation store (no
retraining), re-answer, and count how often the answer follows the new tail.

Each edit goes through `KBValueStore.replace_fact` (encoded with the store's own encoder, the faiss
index updated in the same commit, the tail token table row rebuilt by a registered builder). The new
tail comes from another fact of the same relation, so it is a plausible value; the evidence sentence
gets the new tail in place of the old one. The original store is never opened for writing.
"""
from __future__ import annotations

import copy
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from kblampp.inference.generate import generate_rows
from kblampp.evaluation.retrieval_metrics import answer_fact_of
from kblampp.metrics import exact_match, mean, normalize_answer
from kblampp.schema import Fact, QARecord, load_facts



@dataclass(frozen=True)
class Edit:
    """One planned edit: question `qid` is answered by fact `fact_index`, whose tail becomes `new_tail`."""

    qid: str
    fact_index: int
    old_tail: str
    new_tail: str


def plan_edits(records: Sequence[QARecord], facts: Sequence[Fact], n: int, seed: int = 0) -> list[Edit]:
    """Up to `n` single-hop questions with distinct answer facts, each given another tail of the same
    relation (a different normalised string), chosen with a seeded RNG."""
    by_relation: dict[str, list[str]] = {}
    for f in facts:
        tails = by_relation.setdefault(f.relation_id or f.relation_name, [])
        if f.tail_name not in tails:
            tails.append(f.tail_name)
    rng = random.Random(seed)
    pool = [r for r in records if r.type == "single-hop"]
    rng.shuffle(pool)
    edits: list[Edit] = []
    used: set[int] = set()
    for rec in pool:
        if len(edits) >= n:
            break
        idx = answer_fact_of(rec)
        if idx in used or not 0 <= idx < len(facts):
            continue
        fact = facts[idx]
        olds = {normalize_answer(a) for a in rec.aliases} | {normalize_answer(fact.tail_name)}
        options = [t for t in by_relation[fact.relation_id or fact.relation_name] if normalize_answer(t) not in olds]
        if not options:
            continue
        used.add(idx)
        edits.append(Edit(rec.qid, idx, fact.tail_name, rng.choice(options)))
    return edits


def edited_fact(raw: dict, new_tail: str) -> dict:
    """The 5-tuple with the new tail (id dropped: it is a value now) and the sentence rewritten."""
    obj = copy.deepcopy(raw)
    old = obj["tail"]["name"]
    obj["tail"] = {**obj["tail"], "id": None, "name": new_tail}
    sentence = obj["context"]["sent_span"]
    obj["context"] = {**obj["context"], "sent_span": sentence.replace(old, new_tail) if old in sentence
                      else f"{sentence} {obj['head']['name']}: {new_tail}."}
    return obj


def copy_store(store_root: str | Path, target: str | Path) -> Path:
    """A full copy of a store folder (arrays, index, extras) to edit freely."""
    target = Path(target)
    shutil.copytree(store_root, target)
    return target


def apply_edits(store: Any, edits: Sequence[Edit], tokenizer: Any, index: Any = None) -> None:
    """Replace each edited fact in `store` (a KBValueStore loaded WITH an embedder, on a copy); every
    per-fact tail token table is rebuilt for the new rows with `tokenizer`."""
    from kblampp.answer_head import tail_builders

    store.extra_builders.update(tail_builders(store.manifest, tokenizer))
    for edit in edits:
        store.replace_fact(edit.fact_index, edited_fact(store.fact(edit.fact_index), edit.new_tail), index=index)


def run_kb_edit(ec: Any, records: Sequence[QARecord], n: int, batch_size: int = 16, seed: int = 0,
                workdir: str | Path | None = None, progress: bool = True,
                make_source: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Answer the chosen questions before and after their edits with the default KBLaM++ row.

    `ec` is an `EvalContext`; its store is copied into `workdir` (a temp folder by default), loaded with
    `ec.store.embedder`, edited, and a new source / tail table built from the copy."""
    from kblampp.answer_head import load_or_build_tail_table
    from kblampp.evaluation.kbqa import KB_VARIANTS, kb_request
    from kblampp.inference.loading import build_source
    from kblampp.backbone import build_prompt
    from kblampp.kb_store import KBValueStore

    edits = plan_edits(records, ec.facts, n, seed)
    if not edits:
        return {"n_edits": 0, "note": "no single-hop question with an editable answer fact"}
    by_qid = {r.qid: r for r in records}
    chosen = [by_qid[e.qid] for e in edits]
    prompts = [build_prompt(ec.tokenizer, r.question) for r in chosen]
    e_q = torch.from_numpy(ec.embed([r.question for r in chosen]))
    variant = KB_VARIANTS["kblampp" if getattr(ec.model, "kb_copy_gate", None) is not None else "kblampp_injection"]

    def answer(source: Any, tail_table: torch.Tensor | None, desc: str) -> list[str]:
        req = kb_request(ec.model, source, e_q, chosen, variant, tail_table, ec.cfg.reference_date,
                         linked=ec.linked(chosen))  # an edit keeps each fact's head: the same links
        return [g.pred for g in generate_rows(ec.model, ec.tokenizer, prompts, ec.cfg.max_new_tokens,
                                              batch_size=batch_size, request=req, desc=desc, progress=progress,
                                              questions=[r.question for r in chosen])]

    before = answer(ec.source, ec.tail_table, "kb_edit before")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = copy_store(ec.store.root, Path(tmp) / "store")
        edited = KBValueStore.load(root, mmap=False, embedder=ec.store.embedder)
        source, index = (make_source or (lambda s: build_source(ec.cfg, s)))(edited)
        apply_edits(edited, edits, ec.tokenizer, index=index)
        source, _ = (make_source or (lambda s: build_source(ec.cfg, s)))(edited)
        facts = load_facts(edited.root / "facts.jsonl")
        table = load_or_build_tail_table(edited, [f.tail_name for f in facts], ec.tokenizer)
        after = answer(source, table, "kb_edit after")
    rows = []
    for e, rec, b, a in zip(edits, chosen, before, after):
        rows.append({**asdict(e), "pred_before": b, "pred_after": a,
                     "before_old": exact_match(b, rec.aliases), "after_new": exact_match(a, e.new_tail),
                     "after_old": exact_match(a, rec.aliases)})
    right_before = [r for r in rows if r["before_old"]]
    return {
        "row": variant.name, "n_edits": len(rows),
        "before_em": mean(r["before_old"] for r in rows),
        "follow_new": mean(r["after_new"] for r in rows),
        "still_old": mean(r["after_old"] for r in rows),
        "n_right_before": len(right_before),
        "follow_new_if_right_before": mean(r["after_new"] for r in right_before),
        "edits": rows,
    }


def markdown_kb_edit(result: dict[str, Any]) -> str:
    """A short paragraph for results.md."""
    if not result.get("n_edits"):
        return f"KB-edit check: not run ({result.get('note', 'no edits')}).\n"

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    return (f"KB-edit check ({result['row']}, {result['n_edits']} single-hop answer facts given another tail "
            f"of the same relation in a copy of the store, no retraining): answers equal to the NEW tail "
            f"{pct(result['follow_new'])} (among the {result['n_right_before']} answered right before the edit: "
            f"{pct(result['follow_new_if_right_before'])}); still the old tail {pct(result['still_old'])}; "
            f"EM before the edit {pct(result['before_em'])}.\n")
