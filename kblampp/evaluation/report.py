"""One results table for every row of an evaluation run: JSON + Markdown. Headline: official SQuAD
v1.1 EM on the raw answer line with a seeded 95% bootstrap interval; then F1, the lenient reading,
"gold contained", answerable EM and abstention precision / recall / F1; EM per question type and per
family (the record's `family`, else its `type`); seen vs unseen tails; retrieval columns where a
row retrieves through the KB.

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

from kblampp.metrics import bootstrap_interval, mean, normalize_answer
from kblampp.schema import QA_TYPES, QARecord

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0

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
    family: str = ""  # the record's family (else its type)
    answerable: bool = True
    em_lenient: float = 0.0
    abstained: bool = False

    def __post_init__(self) -> None:
        self.family = self.family or self.type


def record_family(record: QARecord) -> str:
    """The record's question family (docs/DESIGN_QA.md), else its type for older files."""
    family = record.raw.get("family")
    return family if isinstance(family, str) and family else record.type


def record_answerable(record: QARecord) -> bool:
    """False only for records marked `answerable: false`."""
    return record.raw.get("answerable", True) is not False


def seen_answers(train_records: Iterable[QARecord]) -> set[str]:
    """Normalised answers and aliases of the answerable training questions ("no answer" is a marker)."""
    return {normalize_answer(a) for r in train_records if record_answerable(r) for a in r.aliases
            if normalize_answer(a)}


def is_seen(record: QARecord, seen: set[str]) -> bool:
    """Any alias of the gold answer occurs among the training answers (never for unanswerable ones)."""
    return record_answerable(record) and any(normalize_answer(a) in seen for a in record.aliases)


def abstention_scores(results: Sequence[QuestionResult]) -> dict[str, float | None]:
    """Precision / recall / F1 of abstaining as a detector of unanswerable questions (None = undefined)."""
    abstained = [r for r in results if r.abstained]
    unanswerable = [r for r in results if not r.answerable]
    hits = sum(1 for r in abstained if not r.answerable)
    precision = hits / len(abstained) if abstained else None
    recall = hits / len(unanswerable) if unanswerable else None
    f1 = (2 * precision * recall / (precision + recall) if precision and recall else
          (0.0 if precision is not None and recall is not None else None))
    return {"abstain_precision": precision, "abstain_recall": recall, "abstain_f1": f1,
            "n_abstained": len(abstained), "n_unanswerable": len(unanswerable)}


def _ordered(keys: Iterable[str], first: Sequence[str]) -> list[str]:
    """`first` (always, in order), then any other key present, sorted."""
    present = set(keys)
    return list(first) + sorted(k for k in present if k not in first)


def summarize_row(results: Sequence[QuestionResult]) -> dict[str, Any]:
    """Aggregates of one row: overall (EM with its interval), answerable, abstention, per type, per
    family, seen/unseen, retrieval means (None = not applicable)."""
    out: dict[str, Any] = {"n": len(results)}
    for metric in ("em", "f1", "em_lenient", "contained"):
        out[metric] = mean(getattr(r, metric) for r in results)
    ci = bootstrap_interval([r.em for r in results], BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    out["em_ci_low"], out["em_ci_high"] = ci if ci else (None, None)
    answerable = [r for r in results if r.answerable]
    out["n_answerable"], out["em_answerable"] = len(answerable), mean(r.em for r in answerable)
    out.update(abstention_scores(results))
    out["prompt_tokens"] = mean(r.prompt_tokens for r in results)
    for qtype in _ordered((r.type for r in results), QA_TYPES):
        group = [r for r in results if r.type == qtype]
        out[f"n_{qtype}"] = len(group)
        out[f"em_{qtype}"] = mean(r.em for r in group)
        out[f"contained_{qtype}"] = mean(r.contained for r in group)
    families: dict[str, Any] = {}
    for family in _ordered((r.family for r in results), ()):
        group = [r for r in results if r.family == family]
        low_high = bootstrap_interval([r.em for r in group], BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
        families[family] = {"n": len(group), "em": mean(r.em for r in group),
                            "em_ci": None if low_high is None else list(low_high)}
    out["families"] = families
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


# (column title, summary key, kind): pct = x100 with one decimal, num = two decimals, int = as is,
# ci = EM with its interval
COLUMNS: list[tuple[str, str, str]] = [
    ("N", "n", "int"), ("EM [95% CI]", "em", "ci"), ("F1", "f1", "pct"), ("EM lenient", "em_lenient", "pct"),
    ("Contained", "contained", "pct"), ("EM answerable", "em_answerable", "pct"),
    ("Abstain P", "abstain_precision", "pct"), ("Abstain R", "abstain_recall", "pct"), ("Abstain F1", "abstain_f1", "pct"),
    ("EM seen", "em_seen", "pct"), ("EM unseen", "em_unseen", "pct"), ("ms/q", "ms_per_question", "int"),
]
RETRIEVAL_COLUMNS: list[tuple[str, str, str]] = [
    ("R@1", "recall@1", "pct"), ("R@K", "recall@K", "pct"), ("R@K single", "recall@K_single-hop", "pct"),
    ("Top-α prec", "top_alpha_precision", "pct"), ("Top-α prec single", "top_alpha_precision_single-hop", "pct"),
    ("α time-match", "time_match_mass", "num"), ("α time-mismatch", "time_mismatch_mass", "num"),
    ("Prompt tok", "prompt_tokens", "int"),
]


def _cell(value: Any, kind: str, stats: dict[str, Any] | None = None) -> str:
    if value is None:
        return "–"
    if kind == "ci":
        low, high = (stats or {}).get("em_ci_low"), (stats or {}).get("em_ci_high")
        return f"{100 * value:.1f}" + ("" if low is None else f" [{100 * low:.1f}, {100 * high:.1f}]")
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "num":
        return f"{value:.2f}"
    return str(int(round(value)))


def _table(summary: dict[str, dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> list[str]:
    lines = ["| Row | " + " | ".join(title for title, _, _ in columns) + " |",
             "|---|" + "|".join("---:" for _ in columns) + "|"]
    for row, stats in summary.items():
        lines.append(f"| {row} | " + " | ".join(_cell(stats.get(key), kind, stats) for _, key, kind in columns) + " |")
    return lines


def _group_table(summary: dict[str, dict[str, Any]], title: str, groups: list[tuple[str, str]],
                 cell: Any) -> list[str]:
    lines = ["| Row | " + " | ".join(name for name, _ in groups) + " |",
             "|---|" + "|".join("---:" for _ in groups) + "|"]
    for row, stats in summary.items():
        lines.append(f"| {row} | " + " | ".join(cell(stats, key) for _, key in groups) + " |")
    return [title, "", *lines]


def markdown_table(summary: dict[str, dict[str, Any]], meta: dict[str, Any] | None = None,
                   notes: Sequence[str] = ()) -> str:
    """The headline table, then EM per type and per family, then retrieval (rows in insertion order)."""
    lines = []
    if meta:
        lines.append("Evaluation: " + ", ".join(f"{k} = {v}" for k, v in meta.items()))
        lines.append("")
    lines += _table(summary, COLUMNS)
    lines.append("")
    lines.append("EM = official SQuAD v1.1 exact match on the raw output's first line (nothing cut out), with a "
                 f"95% bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples of the questions, seed {BOOTSTRAP_SEED}); "
                 "on unanswerable questions right exactly when the row answered the abstain answer. EM lenient = "
                 "the same after dropping lead-ins / a trailing sentence and cutting a committed sentence to its "
                 "answer span (never the headline). Contained = normalised gold inside the raw output. Abstain "
                 "P/R/F1 = abstaining as a detector of unanswerable questions (– = the row never abstained or the "
                 "split has none). seen = the gold answer is also a training answer. All in %.")
    types = _ordered((k[3:] for st in summary.values() for k in st if k.startswith("em_") and f"n_{k[3:]}" in st
                      and k[3:] not in ("answerable", "seen", "unseen")), QA_TYPES)
    type_groups = [(f"{t} (n={next(iter(summary.values())).get(f'n_{t}', 0)})", t) for t in types]
    lines += ["", *_group_table(summary, "EM per question type:", type_groups,
                                lambda st, t: _cell(st.get(f"em_{t}"), "pct"))]
    families = _ordered((f for st in summary.values() for f in st.get("families", {})), ())
    first = next(iter(summary.values()), {}).get("families", {})
    fam_groups = [(f"{f} (n={first.get(f, {}).get('n', 0)})", f) for f in families]
    lines += ["", *_group_table(summary, "EM per question family:", fam_groups,
                                lambda st, f: _cell((st.get("families", {}).get(f) or {}).get("em"), "pct"))]
    lines += ["", "Retrieval (rows that retrieve):", "", *_table(summary, RETRIEVAL_COLUMNS), ""]
    lines.append("R@1 = the answer fact has the top alpha at the last prompt token; R@K = share of supporting facts "
                 "among the K_top candidates; α time-(mis)match = alpha mass on same-(head, relation) candidates "
                 "whose window does (not) overlap the question's (temporal questions); for RAG the R/precision "
                 "columns rank its own embedding retrieval; lookup rows rank the facts they copied from.")
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
