"""The TimeQA table from evaluation outputs: official SQuAD EM on each row's raw output.

Why here: the evaluation's own table scores an extracted span; the headline metric is official EM on
the raw output's first line (nothing cut out of it), max over the answer aliases, with a 95%
bootstrap interval over the questions. This reads `predictions.jsonl` of each evaluation folder
`<eval_dir>/<run>_<level>/` and the QA file for the aliases.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from kblampp.metrics import contains_gold, exact_match

ROW_NAMES = {"backbone": "backbone alone", "rag": "in-context RAG (top-8 facts)",
             "oracle_context": "oracle context (supporting facts in the prompt)", "lookup": "`lookup` (no LLM)",
             "kblampp": "KBLaM++ (answer head)", "kblampp_eta0": "KBLaM++ eta = 0"}


def official_em(output: str, golds: Sequence[str]) -> float:
    """SQuAD v1.1 EM of the raw output's first line against any alias."""
    lines = output.strip().splitlines()
    return exact_match(lines[0] if lines else "", list(golds))


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean, in percent."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(n, x.size))].mean(axis=1)
    return 100 * float(np.percentile(means, 2.5)), 100 * float(np.percentile(means, 97.5))


def _aliases(qa_path: Path) -> dict[str, list[str]]:
    out = {}
    with open(qa_path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                q = json.loads(line)
                out[q["qid"]] = [q["answer"]] + [a for a in q.get("answer_aliases") or [] if a != q["answer"]]
    return out


def score_predictions(pred_path: Path, aliases: dict[str, list[str]]) -> dict[str, dict]:
    """Per row: n, official EM (%), its 95% interval, gold contained (%)."""
    per_row: dict[str, list[tuple[float, float]]] = {}
    with open(pred_path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            p = json.loads(line)
            golds = aliases[p["qid"]]
            per_row.setdefault(p["row"], []).append((official_em(p["output"], golds), contains_gold(p["output"], golds)))
    out = {}
    for row, scores in per_row.items():
        em = [s[0] for s in scores]
        out[row] = {"n": len(scores), "em": 100 * float(np.mean(em)), "ci": bootstrap_ci(em),
                    "contained": 100 * float(np.mean([s[1] for s in scores]))}
    return out


def timeqa_table(eval_dir: str | Path, qa_paths: dict[str, Path], runs: Sequence[tuple[str, str]]) -> str:
    """Markdown: one line per (run, row), official EM easy / hard with intervals, contained."""
    levels = list(qa_paths)
    scores = {}
    for run, _ in runs:
        for level in levels:
            pred = Path(eval_dir) / f"{run}_{level}" / "predictions.jsonl"
            if pred.is_file():
                scores[run, level] = score_predictions(pred, _aliases(qa_paths[level]))
    head = "| training | row | " + " | ".join(f"EM {lv} (95% CI) | contained {lv}" for lv in levels) + " |"
    lines = [head, "| --- | --- | " + " | ".join("--- | ---" for _ in levels) + " |"]
    for run, label in runs:
        rows = list(dict.fromkeys(r for lv in levels for r in scores.get((run, lv), {})))
        for row in rows:
            cells = []
            for lv in levels:
                s = scores.get((run, lv), {}).get(row)
                cells.append("– | –" if s is None else
                             f"{s['em']:.1f} ({s['ci'][0]:.1f}-{s['ci'][1]:.1f}) | {s['contained']:.1f}")
            lines.append(f"| {label} | {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
    ns = {lv: next((s[r]["n"] for (run, l2), s in scores.items() if l2 == lv for r in s), 0) for lv in levels}
    lines.append("")
    lines.append("Questions: " + ", ".join(f"{lv} {n}" for lv, n in ns.items()) + " (held-out pages, answerable).")
    return "\n".join(lines)
