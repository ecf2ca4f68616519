"""TimeQA after the build: the window-inference report, the split by page and the files training and
evaluation read (the TimeQA KB appended to the synthetic worlds' facts).

Why by page: a held-out question must be about a page whose facts no training question touched, as
the synthetic protocol holds out whole worlds. Pages go to train / dev / test by a seeded hash of
the page name, so adding pages never moves the others.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from kblampp.builders.common import _write_lines
from kblampp.timewin import window_days

SPLITS = ("train", "dev", "test")


def _year(iso: str | None) -> str | None:
    return None if iso is None else iso[:4]


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def window_report(facts: Sequence[dict], qa: Iterable[dict]) -> dict:
    """Share of facts with an inferred window, and per question level (easy / hard / all) how the
    answer fact's window agrees with the question's parsed time: same start / end year, the two
    windows overlap, the question's window lies inside the fact's. A check only: no window is
    built from a question."""
    n = len(facts)
    with_window = sum(1 for f in facts if f["time_window"]["start"] or f["time_window"]["end"])
    closed = sum(1 for f in facts if f["time_window"]["start"] and f["time_window"]["end"])
    rules: dict[str, int] = {}
    for f in facts:
        rule = f["context"].get("time_rule", "none")
        rules[rule] = rules.get(rule, 0) + 1
    levels: dict[str, dict[str, int]] = {}
    for q in qa:
        if not q.get("answerable", True) or q.get("answer_fact") is None or not q.get("question_time"):
            continue
        tw = facts[q["answer_fact"]]["time_window"]
        qt = q["question_time"]
        fw, qw = window_days(tw["start"], tw["end"]), window_days(qt["start"], qt["end"])
        has = bool(tw["start"] or tw["end"])
        for level in (q.get("level") or "all", "all") if q.get("level") else ("all",):
            c = levels.setdefault(level, {"questions": 0, "fact_has_window": 0, "start_year": 0, "end_year": 0,
                                          "both_years": 0, "overlap": 0, "inside": 0})
            c["questions"] += 1
            c["fact_has_window"] += has
            same_start = has and _year(tw["start"]) == _year(qt["start"])
            same_end = has and _year(tw["end"]) == _year(qt["end"])
            c["start_year"] += same_start
            c["end_year"] += same_end
            c["both_years"] += same_start and same_end
            c["overlap"] += has and _overlaps(fw, qw)
            c["inside"] += has and fw[0] <= qw[0] and qw[1] <= fw[1]
    return {"facts": n, "with_window": with_window, "closed_window": closed, "rules": dict(sorted(rules.items())),
            "levels": levels}


def report_lines(report: dict) -> list[str]:
    """The report as Markdown: fact coverage, then one agreement row per question level."""
    n = max(report["facts"], 1)
    lines = [f"facts: {report['facts']}; with an inferred window: {report['with_window']} "
             f"({100 * report['with_window'] / n:.1f}%); both ends: {report['closed_window']} "
             f"({100 * report['closed_window'] / n:.1f}%)",
             "rules: " + ", ".join(f"{k} {v}" for k, v in report["rules"].items()), "",
             "| questions | n | fact has window | same start year | same end year | both years | overlap | question inside fact |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for level, c in sorted(report["levels"].items()):
        q = max(c["questions"], 1)
        cells = [f"{100 * c[k] / q:.1f}" for k in ("fact_has_window", "start_year", "end_year", "both_years",
                                                  "overlap", "inside")]
        lines.append(f"| {level} | {c['questions']} | " + " | ".join(cells) + " |")
    return lines


def page_split(page: str, fractions: tuple[float, float, float], seed: int = 0) -> str:
    """train / dev / test of one page, from a seeded hash of its name (stable as pages are added)."""
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"split fractions {fractions} must be >= 0 and sum to 1")
    h = int.from_bytes(hashlib.sha256(f"{seed}:{page}".encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    cum = 0.0
    for name, frac in zip(SPLITS, fractions):
        cum += frac
        if h < cum:
            return name
    return SPLITS[-1]


@dataclass
class SplitFiles:
    """What `write_split_files` wrote: paths by name and counts, for the job's log."""

    paths: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [f"{name}: {self.counts.get(name, 0)} -> {path}" for name, path in self.paths.items()]


def _read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_split_files(timeqa_facts: str | Path, timeqa_qa: str | Path, out_facts: str | Path, qa_dir: str | Path,
                      prefix: str = "timeqa", base_facts: str | Path | None = None, base_train: str | Path | None = None,
                      fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0) -> SplitFiles:
    """One fact file (the base facts, e.g. the synthetic worlds, then the TimeQA facts tagged with
    their page's split as `context.disamb.world = timeqa-<split>`) and the QA files:
    `<prefix>_train` (base training QA + TimeQA training pages, easy and hard), `<prefix>_dev`
    (dev pages), `<prefix>_test_easy` / `<prefix>_test_hard` (test pages), answerable questions only;
    unanswerable ones, if the build kept them, go to `<prefix>_<split>_unanswerable`."""
    base = _read_jsonl(base_facts) if base_facts else []
    facts = _read_jsonl(timeqa_facts)
    qa = _read_jsonl(timeqa_qa)
    offset = len(base)
    split_of: dict[str, str] = {}
    for f in facts:
        page = f["head"]["id"].split(":", 1)[-1]
        split_of.setdefault(page, page_split(page, fractions, seed))
        f["context"]["disamb"] = dict(f["context"].get("disamb") or {}, world=f"timeqa-{split_of[page]}")
    out: dict[str, list[dict]] = {"train": _read_jsonl(base_train) if base_train else []}
    for q in qa:
        split = split_of.get(q["page"]) or page_split(q["page"], fractions, seed)
        q = dict(q, world=f"timeqa-{split}", supporting_facts=[i + offset for i in q["supporting_facts"]])
        if q.get("answer_fact") is not None:
            q["answer_fact"] += offset
        if not q.get("answerable", True):
            name = f"{split}_unanswerable"
        elif split == "test":
            name = f"test_{q.get('level') or 'easy'}"
        elif split == "dev":
            if q.get("level") == "hard":
                continue  # dev: one question per fact (easy), for choices
            name = "dev"
        else:
            name = "train"
        out.setdefault(name, []).append(q)
    result = SplitFiles()
    targets = [(Path(out_facts), base + facts, "facts")]
    targets += [(Path(qa_dir) / f"{prefix}_{name}.jsonl", rows, name) for name, rows in sorted(out.items())]
    for path, rows, name in targets:
        tmp = _write_lines(path, rows)
        tmp.replace(path)
        result.paths[name], result.counts[name] = path, len(rows)
    result.counts["pages"] = len(split_of)
    for split in SPLITS:
        result.counts[f"pages_{split}"] = sum(1 for s in split_of.values() if s == split)
    return result


def merge_unanswerable(answerable: Sequence[str | Path], unanswerable: str | Path, out: str | Path,
                       level: str | None = None) -> int:
    """One QA file: the `answerable` files' records, then the unanswerable ones (only `level`'s when
    given: each test level is scored with its own phrasing). Written atomically; returns the count."""
    rows = [r for path in answerable for r in _read_jsonl(path)]
    rows += [r for r in _read_jsonl(unanswerable) if level is None or r.get("level") == level]
    _write_lines(Path(out), rows).replace(out)
    return len(rows)
