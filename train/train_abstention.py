"""Train the abstention decision (`kb_abstain`) on a finished run and calibrate its threshold on dev.

    python train/train_abstention.py --config configs/embedded_default.yaml --init_from runs/main \
        --output_dir runs/main_abstain

Unanswerable training questions (`answerable: false`) are the positives; the signals are the first
inject layer's own at the last prompt token (alpha, sem/phi/g_time, windows, copy gate), computed once
from cached states. Writes OUTPUT_DIR/{kb_final.safetensors, config.resolved.yaml (with
abstention.threshold), abstention_summary.json}; evaluate or serve OUTPUT_DIR like any run folder.
The same phase runs at the end of Stage A when abstention.steps > 0.
"""
from __future__ import annotations

import argparse
import json

from kblampp.config import add_config_args, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--init_from", required=True, help="a run folder (kb_final.safetensors) or a KB checkpoint")
    parser.add_argument("--output_dir", required=True, help="run folder to write")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    cfg.output_dir = args.output_dir

    from kblampp.training.abstention_phase import train_on_checkpoint

    report = train_on_checkpoint(cfg, args.init_from, args.output_dir, progress=not args.no_progress)
    print(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
