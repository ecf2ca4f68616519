"""TimeQA JSONL (gz or not) -> a KB of 5-tuples (windows inferred from the page text) + temporal QA
(thin CLI over kblampp.builders.timeqa)."""
from __future__ import annotations

import argparse
import sys

from kblampp.builders.common import add_common_args, run_builder
from kblampp.builders.timeqa import build_timeqa, load_timeqa_relations
from kblampp.builders.timeqa_split import report_lines, window_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="TimeQA to a KB and temporal QA. idx = /wiki/<page>#<PID>#<k>; one fact per (page, relation, "
        "tail): head = the page, relation = PID (labelled from --relations or the built-in table), tail = a non-empty "
        "target, evidence = the context sentence holding context[from:end]. The fact's time window is inferred from "
        "the page text around that span (ranges, points, since/until in its list row, sentence or neighbours; open "
        "ends closed by the next holder's start; see kblampp/builders/text_windows.py), never from a question. "
        "question_time is parsed from each question's text (kblampp/question_time.py). Files named *.easy.* / "
        "*.hard.* give qids <idx>#easy / <idx>#hard. targets [''] = unanswerable: skipped and counted unless "
        "--keep_unanswerable (answerable false, answer 'no answer', no supporting facts; docs/DESIGN_QA.md).")
    parser.add_argument("inputs", nargs="+", help="TimeQA JSON Lines files (.gz / .gzip allowed)")
    parser.add_argument("--relations", default=None, help="TimeQA relations.json (PID -> {meaning, ...}) for relation labels")
    parser.add_argument("--keep_unanswerable", action="store_true", help="write unanswerable questions too")
    parser.add_argument("--report", action="store_true",
                        help="print the window-inference report (coverage; agreement with the questions' times, a check only)")
    add_common_args(parser, "data/5tuple/timeqa.jsonl", "data/qa/timeqa.jsonl")
    args = parser.parse_args(argv)

    def build():
        result = build_timeqa(args.inputs, max_samples=args.max_samples, keep_unanswerable=args.keep_unanswerable,
                              relation_labels=load_timeqa_relations(args.relations) if args.relations else None)
        if args.report:
            print("\n".join(report_lines(window_report(result.facts, result.qa))), file=sys.stderr)
        return result

    return run_builder(build, args)


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
