"""Generate training-only worlds for the retrieval phase: facts kept out of the KB, and questions over them.

    python offline/gen_extra_worlds.py --kb data/5tuple/synth_world.jsonl \\
        --facts_out data/5tuple/synth_world_extra.jsonl --qa_out data/qa/synth_world_extra_train.jsonl \\
        --n_facts 20000 --seed 3
No entity of the new worlds is named like one of `--kb`'s, so no question about the KB's people is
answered by an extra fact. Stage A reads the two files from `stage_a.retrieval_extra_facts` and
`stage_a.retrieval_extra_qa` (kblampp.training.extra_worlds); the main job writes them itself.
Deterministic: same arguments, byte-identical files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.synth.pipeline import make_extra_world_files  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kb", required=True, help="the KB's 5-tuple file (its entity names are reserved)")
    p.add_argument("--facts_out", required=True, help="5-tuple JSONL of the training-only worlds")
    p.add_argument("--qa_out", required=True, help="their training questions (fact ids index --facts_out)")
    p.add_argument("--n_facts", type=int, default=20000)
    p.add_argument("--seed", type=int, default=3, help="world seed (the size benchmark's distractors use 1 and 2)")
    p.add_argument("--train_variants", type=int, default=1, help="phrasings per question")
    args = p.parse_args(argv)
    if args.n_facts < 1:
        p.error(f"--n_facts: must be >= 1, got {args.n_facts}")
    report = make_extra_world_files(args.kb, args.facts_out, args.qa_out, args.n_facts, args.seed,
                                    train_variants=args.train_variants)
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
