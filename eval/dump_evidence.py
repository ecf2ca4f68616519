#!/usr/bin/env python
"""Write the evidence JSON (plan section 7.2) of chosen questions: the answer, the facts at the last
prompt token with their alpha weights and time windows, plus beta, layer and the copy gate. Example:
    python eval/dump_evidence.py --config configs/embedded_default.yaml --checkpoint runs/x \
        --max_questions 10 --out runs/x/eval/evidence.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kblampp.config import add_config_args, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="kb_final.safetensors, or the training run folder")
    parser.add_argument("--qa", help="QA JSONL (default: config test_dataset, else eval_dataset)")
    parser.add_argument("--qids", help="comma-separated qids to explain (default: a stratified sample)")
    parser.add_argument("--max_questions", type=int, default=10, help="sample size when --qids is not given")
    parser.add_argument("--types", help="comma-separated question types to keep")
    parser.add_argument("--row", default="kblampp", help="KBLaM++ variant (default: %(default)s, the answer head)")
    parser.add_argument("--out", help="evidence JSON path (default: <run folder>/eval/evidence.json)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    from kblampp.evaluation.evidence import write_evidence
    from kblampp.evaluation.runner import collect_evidence, load_eval_context, select_questions
    from kblampp.inference.loading import resolve_checkpoint
    from kblampp.schema import load_qa

    ckpt = resolve_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.parent / "eval" / "evidence.json"
    ec = load_eval_context(cfg, ckpt)
    qids = [q.strip() for q in args.qids.split(",") if q.strip()] if args.qids else None
    records = select_questions(load_qa(args.qa or cfg.test_dataset or cfg.eval_dataset, num_facts=len(ec.facts)),
                               0 if qids else args.max_questions,
                               [t.strip() for t in args.types.split(",")] if args.types else None, qids, args.seed)
    entries = collect_evidence(ec, records, args.row, args.batch_size)
    write_evidence(out, entries)
    right = sum(e["pred_answer"].strip().lower() == e["answer"].strip().lower() for e in entries)
    print(f"wrote {len(entries)} evidence entries to {out} ({right} answered exactly)")
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
