"""HotpotQA JSON -> 5-tuples from supporting sentences + multi-hop QA (thin CLI over kblampp.builders.hotpot)."""
from __future__ import annotations

import argparse
import sys

from kblampp.builders.common import add_common_args, run_builder
from kblampp.builders.hotpot import build_hotpot

RULE = """extraction rule, one fact per supporting sentence [title, sent_id]:
  head     = the paragraph title (its Wikipedia page)
  tail     = first of: (answer) the answer if it occurs in the sentence and is not the head or yes/no;
             (bridge) the title of another paragraph of the question mentioned in the sentence;
             (date) the first date or year in the sentence;
             (description) the rest of the sentence after the head mention, at most 12 words
  relation = the words between the head mention (or the sentence start, less a leading pronoun) and
             the tail, brackets and punctuation dropped, at most 8 words ("mentions" if none)
  window   = open; QA: type multi-hop, question_time null, supporting_facts = these facts' indices,
             answer_fact = the fact made by the answer rule (when there is one)"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="HotpotQA (one JSON list or JSON Lines; _id or id; list-of-pairs or dict-of-lists "
        "supporting_facts/context) to 5-tuples and multi-hop QA.", epilog=RULE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="HotpotQA JSON / JSONL files (.gz allowed)")
    add_common_args(parser, "data/5tuple/hotpot.jsonl", "data/qa/hotpot.jsonl")
    args = parser.parse_args(argv)
    return run_builder(lambda: build_hotpot(args.inputs, max_samples=args.max_samples), args)


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
