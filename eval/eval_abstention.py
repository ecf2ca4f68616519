"""The trained abstention decision on a whole QA split, from the model's own signals (no generation):
abstention precision / recall / F1, abstention rate per question family, and the answerable questions
it abstains on whose top-alpha candidate is the answer fact.

    python eval/eval_abstention.py --config configs/embedded_default.yaml --checkpoint runs/main_abstain

The decision is taken at the last prompt token before any answer token is written, so these numbers
are exactly those of the `kblampp` row's abstentions; eval/eval_qa.py gives the answers' EM.
`--signals` also writes <run folder>/abstention_signals_<qa name>.md: per family, the median of a few
decision features and the share abstained on; per unanswerable family, the features that best
separate it alone (ROC AUC) from the answerable questions answered right and from `initials`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from kblampp.config import add_config_args, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="run folder (kb_final.safetensors with kb_abstain)")
    parser.add_argument("--qa", help="QA JSONL (default: the config's test_dataset)")
    parser.add_argument("--out", help="JSON file to write (default: <run folder>/abstention_<qa name>.json)")
    parser.add_argument("--signals", action="store_true", help="also write the per-family signal tables (.md)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    qa = args.qa or cfg.test_dataset
    if not qa:
        parser.error("no --qa and no test_dataset in the config")

    import torch

    from kblampp.abstention import ABSTAIN_FEATURES
    from kblampp.evaluation.abstention_signals import signal_tables
    from kblampp.training.abstention_phase import decision_data, decision_report

    run = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    with torch.no_grad():
        data, p, t = decision_data(cfg, args.checkpoint, qa, run / "cache", progress=not args.no_progress)
    report = decision_report(data, p, t, qa)
    out = Path(args.out) if args.out else run / f"abstention_{Path(qa).stem}.json"
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=1))
    if args.signals:
        text = signal_tables(data.features.numpy(), data.families, data.labels.numpy() > 0, data.answer_ok.numpy(),
                             p >= t, ABSTAIN_FEATURES)
        (out.with_name(f"abstention_signals_{Path(qa).stem}.md")).write_text(
            f"Decision threshold {t:.4f}; {qa}\n\n" + text, encoding="utf-8")
        print(text)
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
