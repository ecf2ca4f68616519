"""How often a time rule picks the answer's fact among its siblings, on TimeQA's text-inferred windows.

Why: among the facts that share a page and relation (one player's clubs, one office's holders), the
question's time has to pick one, and the windows come from the page text, so many are open-ended
("he joined X in 1995" gives [1995, +inf)). This measures the two closed-window rules on the pages of
one split (default: the training pages, so dev and test stay unseen): the largest overlap (`lookup`'s
earlier rule) and the nearest start, then the largest overlap (`lookup`'s rule and the start-closeness
feature of g_time, `kblampp.scorers`). Questions: answerable, "in" / "from A to B" (kind at / between),
the answer's fact with at least one sibling; candidates are the siblings whose window overlaps the
question's (all of them when none does), as in `lookup`.

    python offline/timeqa_time_rules.py [--qa data/qa/timeqa_train.jsonl] [--timeqa_dir ../shared/data/real]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kblampp.builders.timeqa import build_timeqa, load_timeqa_relations  # noqa: E402
from kblampp.evaluation.lookup import nearest_start  # noqa: E402
from kblampp.evaluation.parsed_time import question_time  # noqa: E402
from kblampp.timewin import window_days  # noqa: E402

FILES = ("timeqa_human_train.easy.jsonl.gz", "timeqa_human_train.hard.jsonl.gz")


def largest_overlap(ids: list[int], tau_min: np.ndarray, tau_max: np.ndarray, tau: tuple[float, float]) -> int:
    """`lookup`'s earlier rule, kept here as the comparison."""
    lo, hi = tau
    return max(ids, key=lambda i: min(hi, tau_max[i]) - max(lo, tau_min[i]))


RULES = {"largest overlap": largest_overlap, "nearest start, then largest overlap": nearest_start}


def split_pages(qa_path: Path) -> set[str]:
    """The TimeQA pages of a split file (`page` of its TimeQA questions)."""
    pages = set()
    with qa_path.open(encoding="utf-8") as handle:
        for line in handle:
            rec = json.loads(line)
            if rec.get("dataset") == "timeqa" and rec.get("page"):
                pages.add(rec["page"])
    if not pages:
        raise ValueError(f"{qa_path}: no TimeQA question with a `page` (run scripts/timeqa_job.py --until split)")
    return pages


def rule_counts(facts: list[dict], qa: list[dict], pages: set[str]) -> dict[str, dict[str, int]]:
    """{level: {"questions": n, rule: right}} over the questions described in the module docstring."""
    windows = [window_days(f["time_window"]["start"], f["time_window"]["end"]) for f in facts]
    tau_min, tau_max = np.asarray([w[0] for w in windows]), np.asarray([w[1] for w in windows])
    groups: dict[tuple[str, str], list[int]] = {}
    for i, f in enumerate(facts):
        groups.setdefault((f["head"]["name"], f["relation"]["id"]), []).append(i)
    counts: dict[str, dict[str, int]] = {}
    for q in qa:
        if not q["answerable"] or q["page"] not in pages:
            continue
        qt = question_time(q["question"])
        if qt.tau is None or qt.kind not in ("at", "between"):
            continue
        gold = facts[q["answer_fact"]]
        siblings = groups[(gold["head"]["name"], gold["relation"]["id"])]
        if len(siblings) < 2:
            continue
        lo, hi = qt.tau
        cands = [i for i in siblings if tau_min[i] <= hi and tau_max[i] >= lo] or siblings
        for level in ((q["level"], "all") if q.get("level") else ("all",)):
            c = counts.setdefault(level, {"questions": 0, **{name: 0 for name in RULES}})
            c["questions"] += 1
            for name, rule in RULES.items():
                c[name] += rule(cands, tau_min, tau_max, qt.tau) == q["answer_fact"]
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qa", default=str(ROOT / "data/qa/timeqa_train.jsonl"), help="split file whose pages are used")
    shared = next((b / "shared/data/real" for b in (ROOT.parent, ROOT.parent.parent) if (b / "shared/data/real").is_dir()),
                  ROOT.parent / "shared/data/real")  # ../shared beside the checkout, or beside a worktree's folder
    p.add_argument("--timeqa_dir", default=str(shared), help="the TimeQA files and timeqa_relations.json")
    args = p.parse_args(argv)
    src = Path(args.timeqa_dir)
    built = build_timeqa([src / name for name in FILES], relation_labels=load_timeqa_relations(src / "timeqa_relations.json"))
    counts = rule_counts(built.facts, built.qa, split_pages(Path(args.qa)))
    print(f"pages of {args.qa}; answer fact picked among its siblings (%)\n")
    print("| level | questions | " + " | ".join(RULES) + " |")
    print("|---|---:|" + "---:|" * len(RULES))
    for level in ("easy", "hard", "all"):
        c = counts.get(level)
        if c:
            cells = " | ".join(f"{100 * c[name] / c['questions']:.1f}" for name in RULES)
            print(f"| {level} | {c['questions']} | {cells} |")
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
