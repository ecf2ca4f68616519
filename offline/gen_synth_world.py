"""Generate synthetic worlds of 5-tuple facts into one JSONL file (a fact's index is its line).

    python offline/gen_synth_world.py --out data/5tuple/synth_world.jsonl --seed 0 --num_worlds 5
    python offline/gen_synth_world.py --out data/5tuple/llm_world.jsonl --generator llm \\
        --base_url http://127.0.0.1:8000/v1 --model qwen-plus --num_worlds 2
The programmatic generator (default) is deterministic: same arguments, byte-identical file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.synth.llm_client import add_llm_args, client_from_args  # noqa: E402
from kblampp.synth.llm_gen import make_llm_world_file  # noqa: E402
from kblampp.synth.pipeline import make_world_file  # noqa: E402
from kblampp.synth.world import WorldSizes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = WorldSizes()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_worlds", type=int, default=5, help="worlds with disjoint entities")
    p.add_argument("--generator", choices=("programmatic", "llm"), default="programmatic")
    for name in ("persons", "organisations", "cities", "universities", "clubs", "events", "min_ceos", "max_ceos"):
        p.add_argument(f"--{name}", type=int, default=getattr(defaults, name), help=f"per world (default %(default)s)")
    p.add_argument("--spouse_rate", type=float, default=defaults.spouse_rate, help="share of persons married")
    p.add_argument("--member_rate", type=float, default=defaults.member_rate, help="share of persons in clubs")
    add_llm_args(p)
    args = p.parse_args(argv)
    if args.generator == "llm":
        report = make_llm_world_file(client_from_args(args), args.out, args.num_worlds)
    else:
        sizes = WorldSizes(**{k: getattr(args, k) for k in vars(defaults)})
        report = make_world_file(args.out, args.seed, args.num_worlds, sizes)
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
