"""Generate QA of every question family (docs/DESIGN_QA.md) from a world file, split by world.

    python offline/gen_synth_qa.py --world data/5tuple/synth_world.jsonl --out_dir data/qa --prefix synth_world
writes <prefix>_train.jsonl, <prefix>_dev.jsonl, <prefix>_test.jsonl (the last worlds are dev/test;
held-out phrasings never appear in train). `--generator llm` asks an OpenAI-compatible API with the
plan's QA prompt instead, one world at a time, and keeps only validated questions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.synth.llm_client import add_llm_args, client_from_args  # noqa: E402
from kblampp.synth.llm_gen import make_llm_qa_files  # noqa: E402
from kblampp.synth.pipeline import make_qa_files  # noqa: E402
from kblampp.synth.qa import REFERENCE_DATE  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, help="5-tuple JSONL written by gen_synth_world.py")
    p.add_argument("--out_dir", default="data/qa")
    p.add_argument("--prefix", default="synth_world", help="file prefix and QA `dataset` field")
    p.add_argument("--out", default=None, help="FILE: write FILE-dir/FILE-stem_{train,dev,test}.jsonl (instead of --out_dir/--prefix)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dev_worlds", type=int, default=1)
    p.add_argument("--test_worlds", type=int, default=1)
    p.add_argument("--train_variants", type=int, default=1, help="training phrasings per question")
    p.add_argument("--eval_heldout_only", action="store_true", help="dev/test use only held-out phrasings")
    p.add_argument("--reference_date", default=REFERENCE_DATE, help="what 'now' in a question means (ISO date)")
    p.add_argument("--generator", choices=("programmatic", "llm"), default="programmatic")
    add_llm_args(p)
    args = p.parse_args(argv)
    out_dir, prefix = args.out_dir, args.prefix
    if args.out:
        out_dir, prefix = str(Path(args.out).parent), Path(args.out).stem
    if args.generator == "llm":
        report = make_llm_qa_files(client_from_args(args), args.world, out_dir, prefix,
                                   dev_worlds=args.dev_worlds, test_worlds=args.test_worlds)
    else:
        report = make_qa_files(args.world, out_dir, prefix, seed=args.seed, dev_worlds=args.dev_worlds,
                               test_worlds=args.test_worlds, train_variants=args.train_variants,
                               eval_heldout_only=args.eval_heldout_only, reference_date=args.reference_date)
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
