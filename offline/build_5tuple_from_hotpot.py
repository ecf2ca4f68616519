"""HotpotQA JSON -> 5-tuples from supporting sentences + QA saying which questions the KB answers
(thin CLI over kblampp.builders.hotpot)."""
from __future__ import annotations

import argparse
import sys

from kblampp.builders.common import add_common_args, run_builder
from kblampp.builders.hotpot import build_hotpot, reachability

RULE = """extraction rule (the answer is never read when writing facts), per supporting sentence [title, sent_id]:
  head     = the paragraph's page: name without its disambiguation suffix, HTML entities un-escaped
  tails    = every tail the sentence states: another paragraph's title (linked to its page), a date
             (a decade "1980s" is 1980-1989), a number, a run of capitalised words, a native-script
             name "(Russian: ...)"; never inside the head's mention or its own name
  relation = the predicate phrase nearest the tail (kblampp/builders/hotpot_text.py documents it)
  window   = open; the parsed date of a date tail is kept in context.tail_date
QA: type multi-hop, family hotpot_bridge | hotpot_comparison | hotpot_yesno, supporting_facts = the
  supporting sentences' facts (first hop first), answer_fact = the supporting fact whose tail equals
  the answer after SQuAD normalisation (last hop first), answerable = answer_fact is not null.
  A record without an answer (the test split) gives facts and no QA record."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="HotpotQA (one JSON list or JSON Lines; _id or id; list-of-pairs or dict-of-lists "
        "supporting_facts/context) to 5-tuples and QA.", epilog=RULE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="HotpotQA JSON / JSONL files (.gz allowed)")
    add_common_args(parser, "data/5tuple/hotpot.jsonl", "data/qa/hotpot.jsonl")
    args = parser.parse_args(argv)

    def build():
        result = build_hotpot(args.inputs, max_samples=args.max_samples)
        for key, value in reachability(result).items():
            result.notes[f"kb: {key}"] = value if not isinstance(value, dict) else \
                ", ".join(f"{k} {v}" for k, v in value.items())
        return result

    return run_builder(build, args)


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
