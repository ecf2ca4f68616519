"""One results table for every row of an evaluation run: JSON + Markdown, per question type, seen vs
unseen tails, retrieval columns where a row retrieves through the KB.

A test answer is "seen" when its normalised string is the answer (or an alias) of any training
question: the value path can only have memorised such tails, so it is reported apart from unseen ones.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from kblampp.metrics import mean, normalize_answer
from kblampp.schema import QA_TYPES, QARecord

RETRIEVAL_KEYS = ("recall@1", "recall@K", "top_alpha_precision", "time_match_mass", "time_mismatch_mass")


@dataclass
class QuestionResult:
    """One row's result on one question (a line of predictions.jsonl)."""

    row: str
    qid: str
    type: str
    seen: bool
    answer: str
    output: str
    pred: str
    em: float
    f1: float
    contained: float
    prompt_tokens: int
    retrieval: dict[str, float | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def seen_answers(train_records: Iterable[QARecord]) -> set[str]:
    """Normalised answers and aliases of the training questions."""
    return {normalize_answer(a) for r in train_records for a in r.aliases if normalize_answer(a)}


def is_seen(record: QARecord, seen: set[str]) -> bool:
    """Any alias of the gold answer occurs among the training answers."""
    return any(normalize_answer(a) in seen for a in record.aliases)


def summarize_row(results: Sequence[QuestionResult]) -> dict[str, Any]:
    """Aggregates of one row: overall, per type, seen/unseen, retrieval means (None = not applicable)."""
    out: dict[str, Any] = {"n": len(results)}
    for metric in ("em", "f1", "contained"):
        out[metric] = mean(getattr(r, metric) for r in results)
    out["prompt_tokens"] = mean(r.prompt_tokens for r in results)
    for qtype in QA_TYPES:
        group = [r for r in results if r.type == qtype]
        out[f"n_{qtype}"] = len(group)
        out[f"em_{qtype}"] = mean(r.em for r in group)
        out[f"contained_{qtype}"] = mean(r.contained for r in group)
    for label, flag in (("seen", True), ("unseen", False)):
        group = [r for r in results if r.seen is flag]
        out[f"n_{label}"] = len(group)
        out[f"em_{label}"] = mean(r.em for r in group)
    with_ret = [r.retrieval for r in results if r.retrieval is not None]
    for key in RETRIEVAL_KEYS:
        out[key] = mean(v[key] for v in with_ret if v.get(key) is not None) if with_ret else None
        single = [r.retrieval for r in results if r.retrieval is not None and r.type == "single-hop"]
        if key in ("recall@K", "top_alpha_precision"):
            out[f"{key}_single-hop"] = mean(v[key] for v in single if v.get(key) is not None) if single else None
    return out


# (column title, summary key, kind): pct = x100 with one decimal, num = two decimals, int = as is
COLUMNS: list[tuple[str, str, str]] = [
    ("N", "n", "int"), ("EM", "em", "pct"), ("F1", "f1", "pct"), ("Contained", "contained", "pct"),
    ("EM single", "em_single-hop", "pct"), ("EM multi", "em_multi-hop", "pct"),
    ("EM temporal", "em_temporal", "pct"), ("EM seen", "em_seen", "pct"), ("EM unseen", "em_unseen", "pct"),
    ("R@1", "recall@1", "pct"), ("R@K", "recall@K", "pct"), ("R@K single", "recall@K_single-hop", "pct"),
    ("Top-α prec", "top_alpha_precision", "pct"), ("Top-α prec single", "top_alpha_precision_single-hop", "pct"),
    ("α time-match", "time_match_mass", "num"), ("α time-mismatch", "time_mismatch_mass", "num"),
    ("Prompt tok", "prompt_tokens", "int"), ("ms/q", "ms_per_question", "int"),
]


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "num":
        return f"{value:.2f}"
    return str(int(round(value)))


def markdown_table(summary: dict[str, dict[str, Any]], meta: dict[str, Any] | None = None,
                   notes: Sequence[str] = ()) -> str:
    """The one table (rows in insertion order), with a header naming the run's shared settings."""
    lines = []
    if meta:
        lines.append("Evaluation: " + ", ".join(f"{k} = {v}" for k, v in meta.items()))
        lines.append("")
    lines.append("| Row | " + " | ".join(title for title, _, _ in COLUMNS) + " |")
    lines.append("|---|" + "|".join("---:" for _ in COLUMNS) + "|")
    for row, stats in summary.items():
        lines.append(f"| {row} | " + " | ".join(_cell(stats.get(key), kind) for _, key, kind in COLUMNS) + " |")
    lines.append("")
    lines.append("EM/F1/Contained/R/precision in %; Contained = normalised gold inside the raw output; "
                 "seen = the gold answer is also a training answer; R@1 = the answer fact has the top alpha "
                 "at the last prompt token; R@K = share of supporting facts among the K_top candidates; "
                 "α time-(mis)match = alpha mass on same-(head, relation) candidates whose window does "
                 "(not) overlap the question's (temporal questions); for RAG the R/precision columns rank "
                 "its own embedding retrieval.")
    lines.extend(["", *notes] if notes else [])
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_report(out_dir: str | Path, rows: dict[str, Sequence[QuestionResult]],
                 meta: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                 notes: Sequence[str] = (), row_stats: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write results.json, results.md and predictions.jsonl into `out_dir`; returns the JSON object.
    `row_stats` adds per-row values (e.g. ms_per_question) to the summary."""
    out = Path(out_dir)
    summary = {name: {**summarize_row(results), **(row_stats or {}).get(name, {})} for name, results in rows.items()}
    payload = {"meta": meta or {}, "rows": summary, **(extra or {})}
    _write_atomic(out / "results.json", json.dumps(payload, indent=2, sort_keys=False) + "\n")
    _write_atomic(out / "results.md", markdown_table(summary, meta, notes))
    preds = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for results in rows.values() for r in results)
    _write_atomic(out / "predictions.jsonl", preds)
    return payload
