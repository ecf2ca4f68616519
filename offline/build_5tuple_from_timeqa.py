"""TimeQA JSONL (gz or not) -> 5-tuples with time windows + temporal QA (thin CLI over kblampp.builders.timeqa)."""
from __future__ import annotations

import argparse
import sys

from kblampp.builders.common import add_common_args, run_builder
from kblampp.builders.timeqa import build_timeqa, load_timeqa_relations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="TimeQA to temporal QA and 5-tuples. idx = /wiki/<page>#<PID>#<k> gives head (the page) and "
        "relation (PID, labelled from --relations or the built-in table); each non-empty target is a tail whose "
        "evidence is the context sentence holding context[from:end]; question_time and the fact's time window come "
        "from the question text ('in X', 'from X to Y', 'between X and Y', 'before X', 'after X', X = YYYY, "
        "Mon YYYY, early/late 1990s; see kblampp/question_time.py). targets [''] = unanswerable: skipped and "
        "counted unless --keep_unanswerable (answer 'unanswerable', no supporting facts).")
    parser.add_argument("inputs", nargs="+", help="TimeQA JSON Lines files (.gz / .gzip allowed)")
    parser.add_argument("--relations", default=None, help="TimeQA relations.json (PID -> {meaning, ...}) for relation labels")
    parser.add_argument("--keep_unanswerable", action="store_true", help="write unanswerable questions too")
    add_common_args(parser, "data/5tuple/timeqa.jsonl", "data/qa/timeqa.jsonl")
    args = parser.parse_args(argv)
    return run_builder(lambda: build_timeqa(
        args.inputs, max_samples=args.max_samples, keep_unanswerable=args.keep_unanswerable,
        relation_labels=load_timeqa_relations(args.relations) if args.relations else None), args)


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
