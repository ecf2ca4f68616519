"""T-REx documents / LAMA T-REx JSONL -> 5-tuple JSONL (thin CLI over kblampp.builders.trex)."""
from __future__ import annotations

import argparse
import sys

from kblampp.builders.common import add_common_args, run_builder
from kblampp.builders.trex import build_trex, load_lama_relations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="T-REx to 5-tuples. Inputs: T-REx document dumps (JSON list of {docid, title, uri, text, "
        "sentences_boundaries, triples}) and/or LAMA T-REx JSONL ({sub_label, obj_label, predicate_id, evidences}), "
        "plain or gzipped. One fact per aligned triple: head = subject (the page title for the page's own entity), "
        "relation = Wikidata property with a readable label, tail = object surface form or literal (Wikidata dates "
        "to ISO at their precision), evidence = the triple's sentence; dates of P569/P570/P571/P576/P577/P585/P729/"
        "P730/... set the time window. Identical 5-tuples from several aligners are written once.")
    parser.add_argument("inputs", nargs="+", help="T-REx JSON / LAMA JSONL files (.gz allowed)")
    parser.add_argument("--relations", default=None, help="LAMA relations.jsonl: labels that override the built-in table")
    add_common_args(parser, "data/5tuple/trex.jsonl", None)
    args = parser.parse_args(argv)
    return run_builder(lambda: build_trex(args.inputs, max_samples=args.max_samples, relation_labels=(
        load_lama_relations(args.relations) if args.relations else None)), args, qa=False)


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
