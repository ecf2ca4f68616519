#!/usr/bin/env python
"""Evaluate a KB checkpoint against every baseline in one table (same questions, prompt builder,
token budget and answer extraction for every row). Example:
    python eval/eval_qa.py --config configs/embedded_default.yaml --checkpoint runs/x/kb_final.safetensors
Writes results.json, results.md and predictions.jsonl into --out_dir (default: <run folder>/eval).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kblampp.config import add_config_args, config_from_args

from kblampp.evaluation.runner import ALL_ROWS, DEFAULT_ROWS as _DEFAULT_ROWS  # noqa: E402

ROWS_HELP = "comma-separated rows (default: %(default)s); known: " + ", ".join(ALL_ROWS)
DEFAULT_ROWS = ",".join(_DEFAULT_ROWS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="kb_final.safetensors, or the training run folder")
    parser.add_argument("--qa", help="QA JSONL to evaluate (default: config test_dataset, else eval_dataset)")
    parser.add_argument("--out_dir", help="output folder (default: the checkpoint's run folder / eval)")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=ROWS_HELP)
    parser.add_argument("--max_questions", type=int, default=0,
                        help="type-stratified subset (0 = the whole split, the default for reported numbers)")
    parser.add_argument("--types", help="comma-separated question types to keep (single-hop,multi-hop,temporal)")
    parser.add_argument("--batch_size", type=int, default=16, help="questions per generate() call")
    parser.add_argument("--batch_tokens", type=int, default=0,
                        help="at most this many padded prompt tokens per generate() call (0 = no limit)")
    parser.add_argument("--rag_k", type=int, default=0, help="facts written into the RAG prompt (0 = K_top)")
    parser.add_argument("--kb_edit", type=int, default=50, help="KB-edit check on this many facts (0 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    from kblampp.evaluation.runner import evaluate, load_eval_context
    from kblampp.inference.loading import resolve_checkpoint

    qa = args.qa or cfg.test_dataset or cfg.eval_dataset
    ckpt = resolve_checkpoint(args.checkpoint)
    out_dir = Path(args.out_dir) if args.out_dir else ckpt.parent / "eval"
    ec = load_eval_context(cfg, ckpt, progress=not args.no_progress)
    payload = evaluate(ec, qa, out_dir, rows=[r.strip() for r in args.rows.split(",") if r.strip()],
                       max_questions=args.max_questions,
                       types=[t.strip() for t in args.types.split(",")] if args.types else None,
                       batch_size=args.batch_size, rag_k=args.rag_k or None, kb_edit_n=args.kb_edit,
                       seed=args.seed, progress=not args.no_progress, batch_tokens=args.batch_tokens or None)
    print((out_dir / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {out_dir}/results.json, results.md, predictions.jsonl ({len(payload['rows'])} rows)")
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
