"""The evidence JSON of plan section 7.2 / SPEC section 7: which facts an answer used, with alpha.

    {qid, dataset, question, answer, pred_answer,
     top_k_facts: [{index, head, relation, tail, context, time_window: [start, end], alpha}],
     + extras: type, question_time, supporting_facts, answer_fact, output, layer, beta, copy_gate,
       abstained, p_unanswerable, and on an abstention near_misses (candidates + reason) and abstain_reason}

Facts are listed by alpha, highest first, as seen at the last prompt token of the first inject layer
(where the answer head reads its pointer). `read_evidence` validates a file for the plotting script.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from kblampp.evaluation.retrieval_metrics import answer_fact_of
from kblampp.question_time import TimeConstraint
from kblampp.schema import Fact, QARecord

if TYPE_CHECKING:  # kbqa pulls in torch; the plotting script only reads JSON
    from kblampp.evaluation.kbqa import LastTokenRecord

REQUIRED = ("qid", "dataset", "question", "answer", "pred_answer", "top_k_facts")
FACT_FIELDS = ("index", "head", "relation", "tail", "context", "time_window", "alpha")
HOP_FACTS = 3  # facts shown per hop of a multi-hop model


class EvidenceError(ValueError):
    """A malformed evidence file; the message names the file, the entry and the field."""


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def evidence_entry(record: QARecord, pred_answer: str, last: "LastTokenRecord", facts: Sequence[Fact],
                   output: str | None = None, time: dict | None = None) -> dict[str, Any]:
    """One question's evidence; empty candidate slots (-1) are left out. `time` (`QuestionTimes.row`)
    adds the parsed constraint and, per fact, whether its window satisfies the constraint used."""
    from kblampp.time_query import window_satisfies  # torch: not needed to read evidence files

    def ranked_facts(cand_ids: Sequence[int], alphas: Sequence[float], limit: int | None = None) -> list[dict]:
        ranked = sorted((pair for pair in zip(cand_ids, alphas) if pair[0] >= 0), key=lambda p: -p[1])[:limit]
        out = []
        for idx, alpha in ranked:
            if idx >= len(facts):
                raise IndexError(f"qid {record.qid}: candidate fact {idx} out of range 0..{len(facts) - 1}")
            f = facts[idx]
            out.append({"index": int(idx), "head": f.head_name, "relation": f.relation_name, "tail": f.tail_name,
                        "context": f.sentence, "time_window": [f.start, f.end], "alpha": float(alpha)})
            if time is not None:
                used = time["used"] and TimeConstraint(**time["used"])
                out[-1]["satisfies_time"] = window_satisfies(used, f.tau_min, f.tau_max)
        return out

    top = ranked_facts(last.cand_ids, last.alpha)
    entry: dict[str, Any] = {
        "qid": record.qid, "dataset": record.dataset, "question": record.question, "answer": record.answer,
        "pred_answer": pred_answer, "top_k_facts": top,
        "type": record.type,
        "question_time": None if record.question_time is None else list(record.question_time),
        "supporting_facts": list(record.supporting_facts),
        "answer_fact": answer_fact_of(record) if record.supporting_facts else None,  # None: unanswerable
        "layer": last.layer, "beta": _finite(last.beta),
        "copy_gate": None if last.copy_gate is None else _finite(last.copy_gate),
    }
    if last.hops:  # the chain in order: each inject layer's best facts, and the layer the answer came from
        entry["hops"] = [{"hop": j + 1, "layer": h["layer"], "beta": _finite(h["beta"]),
                          "facts": ranked_facts(h["cand_ids"], h["alpha"], HOP_FACTS)} for j, h in enumerate(last.hops)]
        entry["answer_hop"] = None if last.hop is None else last.hop + 1
    if last.abstained is not None:
        entry["abstained"], entry["p_unanswerable"] = last.abstained, last.p_unanswerable
    if last.abstained:
        from kblampp.abstention import abstain_reason, near_misses

        entry["near_misses"] = near_misses(record.question, record.tau, top)
        entry["abstain_reason"] = abstain_reason(entry["near_misses"])
    if output is not None:
        entry["output"] = output
    if time is not None:
        entry["time_constraint"] = time
    return entry


def write_evidence(path: str | Path, entries: Sequence[dict[str, Any]]) -> Path:
    """Write the list as pretty JSON via a temp file and os.replace (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(list(entries), handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_evidence(path: str | Path) -> list[dict[str, Any]]:
    """Load and check an evidence file: a list of entries with the plan's fields and numeric alphas."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvidenceError(f"{path}: evidence file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvidenceError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise EvidenceError(f"{path}: expected a JSON list of evidence entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise EvidenceError(f"{where}: expected an object, got {type(entry).__name__}")
        for key in REQUIRED:
            if key not in entry:
                raise EvidenceError(f"{where}: {key}: missing field")
        if not isinstance(entry["top_k_facts"], list):
            raise EvidenceError(f"{where}: top_k_facts: expected a list")
        for j, fact in enumerate(entry["top_k_facts"]):
            if not isinstance(fact, dict):
                raise EvidenceError(f"{where}: top_k_facts[{j}]: expected an object")
            for key in FACT_FIELDS:
                if key not in fact:
                    raise EvidenceError(f"{where}: top_k_facts[{j}].{key}: missing field")
            alpha = fact["alpha"]
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise EvidenceError(f"{where}: top_k_facts[{j}].alpha: expected a finite number, got {alpha!r}")
    return data
