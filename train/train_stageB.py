"""Stage B: LoRA (adapter `kb_lora`) on the top layers, or those layers unfrozen, at a lower lr, plus
the auxiliary alpha loss onto supporting facts and the time-mismatch penalty (SPEC section 7).

    python train/train_stageB.py --config configs/synth_world_stageB_embedded.yaml
    python train/train_stageB.py --config CFG --set stage_b.init_from=runs/stageA --set stage_b.steps=200

Starts from the Stage A run in stage_b.init_from (default: the config's output_dir); writes
OUTPUT_DIR/stage_b/ (or --output_dir): kb_final.safetensors (KB + kb_lora tensors),
stage_b_adapter.json (what `kblampp.training.stage_b.load_stage_b` needs), metrics.jsonl, checkpoints/.
"""
from __future__ import annotations

import argparse
import json

from kblampp.config import add_config_args, add_run_args, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_run_args(parser, "Stage B run folder (default: OUTPUT_DIR/stage_b)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)

    from kblampp.training.stage_a import load_inputs
    from kblampp.training.stage_b import run_stage_b

    result = run_stage_b(load_inputs(cfg, progress=not args.no_progress), args.output_dir,
                         resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
