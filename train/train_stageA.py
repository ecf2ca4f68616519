"""Stage A: backbone frozen, KB modules trained in phases (SPEC section 7).

    python train/train_stageA.py --config configs/embedded_default.yaml
    python train/train_stageA.py --config CFG --set stage_a.retrieval_steps=3000 --set output_dir=runs/x
    accelerate launch train/train_stageA.py --config CFG          # several devices, unchanged

Phases (each off with 0 steps): retrieval on cached inject-layer states -> answer-head copy gate on
cached quantities -> value warm-up with gold facts forced -> end to end. Needs the store built by
offline/encode_kv.py (+ offline/build_index.py). Writes OUTPUT_DIR/{config.resolved.yaml,
metrics.jsonl, checkpoints/, kb_final.safetensors, kv_encoder.safetensors, stage_a_summary.json};
rerunning resumes from the last checkpoint (--no_resume starts over in the same folder).
"""
from __future__ import annotations

import argparse
import json

from kblampp.config import add_config_args, add_run_args, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_run_args(parser, "run folder (default: the config's output_dir)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.output_dir:
        cfg.output_dir = args.output_dir

    from kblampp.training.stage_a import StageA, load_inputs

    if args.no_resume:
        import shutil
        from pathlib import Path

        shutil.rmtree(Path(cfg.output_dir) / "checkpoints", ignore_errors=True)
        (Path(cfg.output_dir) / "progress.json").unlink(missing_ok=True)
    stage = StageA(load_inputs(cfg, progress=not args.no_progress), cfg.output_dir, progress=not args.no_progress)
    results = stage.run(resume=not args.no_resume)
    print(json.dumps({"run_dir": cfg.output_dir, "timings_s": stage.timings,
                      "retrieval": results.get("retrieval_final") or results.get("retrieval"),
                      "copy_gate": results.get("copy_gate")}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
