"""The TimeQA table: one line per (training, row), easy and hard side by side, from the evaluation's
own `results.json` (official SQuAD v1.1 EM on the raw answer line, its 95% bootstrap interval, gold
contained). Each evaluation folder is `<eval_dir>/<run>_<level>/`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

ROW_NAMES = {"backbone": "backbone alone", "rag": "in-context RAG (top-8 facts)",
             "oracle_context": "oracle context (supporting facts in the prompt)", "lookup": "`lookup` (no LLM)",
             "kblampp": "KBLaM++ (answer head)", "kblampp_eta0": "KBLaM++, eta = 0",
             "kblampp_no_abstention": "KBLaM++, abstention off"}


def read_rows(results_json: Path) -> dict[str, dict]:
    """{row: summary} of one evaluation's results.json."""
    return json.loads(Path(results_json).read_text(encoding="utf-8"))["rows"]


def _cell(s: dict | None) -> str:
    if s is None:
        return "– | –"
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}"  # noqa: E731
    return f"{pct(s['em'])} [{pct(s.get('em_ci_low'))}, {pct(s.get('em_ci_high'))}] | {pct(s.get('contained'))}"


def timeqa_table(eval_dir: str | Path, levels: Sequence[str], runs: Sequence[tuple[str, str]]) -> str:
    """Markdown: official EM [95% CI] and gold contained per level, for every row each run evaluated."""
    scores = {(run, lv): read_rows(p) for run, _ in runs for lv in levels
              if (p := Path(eval_dir) / f"{run}_{lv}" / "results.json").is_file()}
    lines = ["| training | row | " + " | ".join(f"EM {lv} [95% CI] | contained {lv}" for lv in levels) + " |",
             "| --- | --- | " + " | ".join("--- | ---" for _ in levels) + " |"]
    for run, label in runs:
        for row in dict.fromkeys(r for lv in levels for r in scores.get((run, lv), {})):
            cells = [_cell(scores.get((run, lv), {}).get(row)) for lv in levels]
            lines.append(f"| {label} | {ROW_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
    counts = {lv: sorted({s["n"] for (_, l2), rows in scores.items() if l2 == lv for s in rows.values()})
              for lv in levels}
    lines += ["", "Questions per level (held-out pages, answerable): "
              + ", ".join(f"{lv} {'/'.join(map(str, n)) or 0}" for lv, n in counts.items()) + "."]
    return "\n".join(lines)


def abstention_table(eval_dir: str | Path, levels: Sequence[str], run: str) -> str:
    """Markdown: per level and row, EM on all questions [95% CI], EM on the answerable ones, and
    abstention precision / recall / F1 as a detector of the unanswerable questions."""
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = ["| level | row | n (unanswerable) | EM [95% CI] | EM answerable | abstain P | abstain R | abstain F1 |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for lv in levels:
        path = Path(eval_dir) / f"{run}_{lv}" / "results.json"
        if not path.is_file():
            continue
        for row, s in read_rows(path).items():
            lines.append(f"| {lv} | {ROW_NAMES.get(row, row)} | {s['n']} ({s['n_unanswerable']}) | {pct(s['em'])} "
                         f"[{pct(s.get('em_ci_low'))}, {pct(s.get('em_ci_high'))}] | {pct(s.get('em_answerable'))} | "
                         f"{pct(s.get('abstain_precision'))} | {pct(s.get('abstain_recall'))} | "
                         f"{pct(s.get('abstain_f1'))} |")
    return "\n".join(lines)
