"""Server start-up time versus pending edits in the write-ahead log (issue 15).

For each count P: copy the store, start an engine on the copy, make P acknowledged edits (half
replacements with a new tail, 30% adds, 20% deletes), drop the engine without compaction (a crash),
then time a fresh start: model + store load, WAL replay into memory (new facts embedded in one batch)
and the one-commit compaction. Prints one line per P and the machine's load average (start-up time
depends on it: say whether the machine was shared when you quote the numbers).

    python bench/bench_startup.py --config runs/main/config.resolved.yaml \\
        --checkpoint runs/main/kb_final.safetensors --pending 0 100 1000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.config import add_config_args, config_from_args  # noqa: E402


def _edit(engine, rng: random.Random, step: int) -> None:
    live = [i for i in range(engine.kb.num_slots()) if engine.kb.get(i) is not None]
    i = rng.choice(live)
    old = json.loads(json.dumps(engine.kb.get(i)))
    roll = rng.random()
    if roll < 0.5:
        old["tail"] = {"id": None, "name": f"Bench Tail {step}"}
        old["context"]["sent_span"] = f"{old['head']['name']} {old['relation']['name']} Bench Tail {step}."
        engine.replace_fact(i, old)
    elif roll < 0.8:
        old["head"] = {**old["head"], "id": f"BENCH{step}", "name": f"Bench Entity {step}"}
        old["context"]["sent_span"] = f"Bench Entity {step} {old['relation']['name']} {old['tail']['name']}."
        engine.add_facts([old])
    else:
        engine.delete_fact(i)


def measure(cfg, checkpoint: str, pending: int, work: Path, seed: int) -> dict:
    from kblampp.serving.build import build_engine
    from kblampp.serving.config import ServerSettings

    store = work / f"store_{pending}"
    shutil.copytree(cfg.store_dir, store, ignore=shutil.ignore_patterns(".writer.lock", ".commit.lock"))
    run_cfg = cfg.__class__(**{**vars(cfg), "store_dir": str(store)})
    settings = ServerSettings(token="bench-" + os.urandom(12).hex(), compact_every=0)
    wal = work / f"store_{pending}.wal.jsonl"
    first = build_engine(run_cfg, checkpoint, settings, wal)
    rng = random.Random(seed)
    for step in range(pending):
        _edit(first, rng, step)
    first.log.close()  # a crash: no compaction, the WAL keeps every edit
    first.audit.close()
    first.kb.close()
    t0 = time.perf_counter()
    engine = build_engine(run_cfg, checkpoint, settings, wal)
    start_s = time.perf_counter() - t0
    out = {"pending": pending, "start_s": round(start_s, 2), "replayed": engine.recovered["replayed"],
           "N_live": engine.kb.num_live(), "index": engine.kb.stats()["index_type"]}
    engine.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="KB checkpoint (safetensors)")
    parser.add_argument("--pending", type=int, nargs="+", default=[0, 100, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); on a shared, overloaded machine 1 "
                             "avoids threads spinning against other jobs")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        for pending in args.pending:
            rows.append(measure(cfg, args.checkpoint, pending, Path(tmp), args.seed))
            print(json.dumps(rows[-1]), flush=True)
    load_after = os.getloadavg()
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
               "loadavg_1_5_15_after": [round(x, 2) for x in load_after]}
    print(json.dumps({"machine": machine}))
    for row in rows:
        print(f"start-up with {row['pending']:>5} pending edits: {row['start_s']:7.2f} s "
              f"(replayed {row['replayed']}, N live {row['N_live']}, index {row['index']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "machine": machine}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
