#!/usr/bin/env python
"""Draw per-question alpha bar charts (PNG) from an evidence JSON, and training curves from a run's
metrics JSONL. Example:
    python eval/visualize_alpha.py --evidence runs/x/eval/evidence.json --out_dir plots/ \
        --metrics runs/x/metrics.jsonl
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evidence", help="evidence.json written by eval/dump_evidence.py")
    parser.add_argument("--out_dir", required=True, help="folder for the PNG files")
    parser.add_argument("--metrics", help="training metrics JSONL (the run folder's metrics.jsonl)")
    parser.add_argument("--max_questions", type=int, default=0, help="plot at most this many entries (0 = all)")
    args = parser.parse_args(argv)
    if not args.evidence and not args.metrics:
        parser.error("give --evidence and/or --metrics")
    from kblampp.evaluation.evidence import EvidenceError, read_evidence
    from kblampp.evaluation.plots import plot_evidence, plot_training_curves, read_metrics_jsonl

    written = []
    try:
        if args.evidence:
            entries = read_evidence(args.evidence)
            if args.max_questions > 0:
                entries = entries[:args.max_questions]
            written += plot_evidence(entries, args.out_dir)
        if args.metrics:
            written += plot_training_curves(read_metrics_jsonl(args.metrics), args.out_dir)
    except (EvidenceError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} PNG files to {args.out_dir}")
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
