#!/usr/bin/env python
"""Official SQuAD v1.1 EM per question family from an evaluation's predictions.jsonl: the raw output's
first line (whitespace stripped, nothing cut out of it) against the answer and its aliases, with a 95%
bootstrap interval per family and row. Example:
    python eval/per_family_em.py --qa data/qa/synth_world_test.jsonl runs/x/eval/predictions.jsonl
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from kblampp.metrics import exact_match


def official_em(output: str, golds: list[str]) -> float:
    lines = output.strip().splitlines()
    return exact_match(lines[0].strip() if lines else "", golds)


def bootstrap(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean (in points)."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n, len(v)))
    means = v[idx].mean(axis=1) * 100
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def family_table(qa_path: Path, pred_paths: list[Path]) -> dict[str, dict[str, dict]]:
    """{row: {family: {n, em, lo, hi}}} over the questions each predictions file holds."""
    records = {}
    with open(qa_path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                rec = json.loads(line)
                records[rec["qid"]] = rec
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in pred_paths:
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                p = json.loads(line)
                rec = records.get(p["qid"])
                if rec is None:
                    raise SystemExit(f"{path}:{line_no}: qid: {p['qid']!r} is not in {qa_path}")
                golds = [rec["answer"]] + [a for a in rec.get("answer_aliases") or [] if a != rec["answer"]]
                em = official_em(p["output"], golds)
                family = rec.get("family") or rec["type"]
                scores[p["row"]][family].append(em)
                scores[p["row"]][f"[{rec['type']}]"].append(em)
    out: dict[str, dict[str, dict]] = {}
    for row, fams in scores.items():
        out[row] = {}
        for fam, vals in sorted(fams.items()):
            lo, hi = bootstrap(vals)
            out[row][fam] = {"n": len(vals), "em": 100 * float(np.mean(vals)), "lo": lo, "hi": hi}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qa", required=True, help="the QA JSONL the predictions were made on")
    parser.add_argument("--json", help="also write the table as JSON here")
    parser.add_argument("predictions", nargs="+", help="predictions.jsonl files (rows are read from them)")
    args = parser.parse_args(argv)
    table = family_table(Path(args.qa), [Path(p) for p in args.predictions])
    rows = list(table)
    families = sorted({f for t in table.values() for f in t})
    print("| family | n | " + " | ".join(rows) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in rows) + " |")
    for fam in families:
        n = next(t[fam]["n"] for t in table.values() if fam in t)
        cells = [f"{t[fam]['em']:.1f} [{t[fam]['lo']:.1f}, {t[fam]['hi']:.1f}]" if fam in t else "" for t in table.values()]
        print(f"| {fam} | {n} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
