"""Seconds per question of each evaluation row on a small, type-stratified subset of the test split,
with every question's output and EM saved, so a change to the generation path can be checked for
speed and for identical results (same questions, back to back).

    python bench/bench_eval_rows.py --threads 1 --max_questions 96 --out /tmp/rows_before.json
    python bench/bench_eval_rows.py --threads 1 --max_questions 96 --batch_size 64 --batch_tokens 5120 \
        --out /tmp/rows_after.json --compare /tmp/rows_before.json

Loads the main job's checkpoint (cfg.output_dir) with retrieval through the faiss index, as the main
job's eval step does; `--profile` writes a cProfile of the rows next to --out. The load average is
recorded before and after (the machine may be shared).
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.config import add_config_args, config_from_args  # noqa: E402


def compare(now: dict, before: dict) -> list[str]:
    """Per row and question: outputs and EM that differ between two runs of this script."""
    problems = []
    for row, items in now["rows"].items():
        old = before["rows"].get(row)
        if old is None:
            continue
        old_by_qid = {x["qid"]: x for x in old}
        for x in items:
            o = old_by_qid.get(x["qid"])
            if o is None:
                problems.append(f"{row} {x['qid']}: not in the earlier run")
            elif (o["output"], o["em"]) != (x["output"], x["em"]):
                problems.append(f"{row} {x['qid']}: {o['output']!r} (em {o['em']}) -> {x['output']!r} (em {x['em']})")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    p.set_defaults(config="configs/embedded_default.yaml")
    p.add_argument("--max_questions", type=int, default=160)
    p.add_argument("--rows", nargs="+", help="rows to run (default: the evaluation's DEFAULT_ROWS)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--batch_tokens", type=int, default=0, help="padded prompt tokens per batch (0 = no limit)")
    p.add_argument("--out", required=True, help="JSON with seconds per row and every question's output")
    p.add_argument("--compare", help="an earlier --out: fail when any output or EM differs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--profile", action="store_true", help="also write a cProfile (<out>.prof, top functions .txt)")
    args = p.parse_args(argv)

    import torch

    if args.threads > 0:  # one thread avoids OpenMP spin-waits when other jobs share the cores
        torch.set_num_threads(args.threads)

    from kblampp.evaluation.report import seen_answers
    from kblampp.evaluation.runner import DEFAULT_ROWS, load_eval_context, run_rows, select_questions, usable_rows
    from kblampp.schema import load_qa
    from kblampp.store_io import read_json, write_json_atomic

    before = read_json(args.compare, "--compare file") if args.compare else None  # fail before the long run
    cfg = dataclasses.replace(config_from_args(args), retrieval="faiss")
    ec = load_eval_context(cfg, cfg.output_dir, progress=False)
    records = select_questions(load_qa(cfg.test_dataset, num_facts=len(ec.facts)), args.max_questions)
    seen = seen_answers(load_qa(cfg.train_dataset))
    rows, _ = usable_rows(ec, args.rows or list(DEFAULT_ROWS))
    load_before = os.getloadavg()
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    results, _, seconds = run_rows(ec, records, rows, seen, args.batch_size, progress=False,
                                     batch_tokens=args.batch_tokens or None)
    if prof is not None:
        prof.disable()
    total = time.perf_counter() - t0
    payload = {
        "questions": len(records), "batch_size": args.batch_size, "batch_tokens": args.batch_tokens,
        "rows_run": rows, "threads": torch.get_num_threads(),
        "load_before": load_before, "load_after": os.getloadavg(), "total_s": round(total, 2),
        "seconds": seconds, "s_per_question": {r: round(s / len(records), 4) for r, s in seconds.items()},
        "em": {r: sum(x.em for x in res) / len(res) for r, res in results.items()},
        "rows": {r: [{"qid": x.qid, "output": x.output, "em": x.em} for x in res] for r, res in results.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, payload)
    for row in rows:
        print(f"{row:28s} {seconds[row]:8.2f} s  {1000 * seconds[row] / len(records):8.1f} ms/q  "
              f"EM {payload['em'][row]:.3f}")
    print(f"load average before {load_before}, after {payload['load_after']}; total {total:.1f} s")
    if prof is not None:
        prof.dump_stats(str(out.with_suffix(".prof")))
        with open(out.with_suffix(".txt"), "w", encoding="utf-8") as fh:
            pstats.Stats(prof, stream=fh).sort_stats("cumulative").print_stats(60)
            pstats.Stats(prof, stream=fh).sort_stats("tottime").print_stats(40)
    if args.compare:
        problems = compare(payload, before)
        print(f"compared with {args.compare}: {len(problems)} differences")
        for line in problems[:40]:
            print("  " + line)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main

    raise SystemExit(run_main(main))
