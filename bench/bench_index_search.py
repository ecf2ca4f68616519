"""Search cost and recall of a store's saved indexes on real questions' queries (issue 16).

    python bench/bench_index_search.py --store runs/kb_size_v2/n1000000/store \
        --queries runs/kb_size_v2/queries.npy --ef_search 1024 4096 --nprobe 64 128 256

Each `index_<method>/` folder of the store (HNSW, IVF-flat, IVF-PQ) is loaded once and searched with
every given search-time value (efSearch for HNSW, nprobe for IVF; no rebuild), all queries in one batched
call, like the model's search at the last prompt token of a batch of questions. Reported: index recall
of the exact top-1 / top-K (a tie counts as a hit, so facts sharing a key are not misses) and ms per
query (the median of --repeats batched calls, faiss on --threads threads). The queries are the trained
model's (`bench/bench_kb_size.py` caches them as `queries.npy`). Run it alone: the line printed first
states the machine's load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.knowledge_index import KnowledgeIndex, recalls_of  # noqa: E402


def timed_search(index: KnowledgeIndex, queries: np.ndarray, k: int, repeats: int) -> tuple[np.ndarray, float]:
    """(ids of the last call, median ms per query over `repeats` batched calls)."""
    times, ids = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        times.append(time.perf_counter() - t0)
    return ids, 1e3 * statistics.median(times) / len(queries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="a store folder with index_<method>/ folders")
    p.add_argument("--queries", required=True, help="(Q, d_k) float32 .npy of real queries")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--ef_search", type=int, nargs="+", default=[1024])
    p.add_argument("--nprobe", type=int, nargs="+", default=[128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    store = Path(args.store)
    keys = np.load(store / "K.npy", mmap_mode="r")
    queries = np.load(args.queries, allow_pickle=False).astype(np.float32)
    if queries.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise SystemExit(f"{args.queries}: expected (Q, {keys.shape[1]}) queries, got {queries.shape}")
    folders = sorted(f for f in store.glob("index_*") if (f / "params.json").is_file() and f.name != "index_milvus")
    if not folders:
        raise SystemExit(f"{store}: no index_<method>/ folder to search")
    print(f"# {len(keys):,} keys, {len(queries)} queries, k {args.k}, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
          f"| index | search | recall@1 | recall@{args.k} | strict@{args.k} | ms per query |\n|---|---|---:|---:|---:|---:|",
          flush=True)
    rows, founds = [], {}
    for folder in folders:
        index = KnowledgeIndex.load(folder, expect_n=len(keys))
        knob, values = ("ef_search", args.ef_search) if index.method == "hnsw" else ("nprobe", args.nprobe)
        for value in values:
            index.params[knob] = int(value)
            founds[len(rows)], ms = timed_search(index, queries, args.k, args.repeats)
            rows.append({"index": index.method, knob: int(value), "ms_per_query": ms,
                         "params": {k: v for k, v in index.params.items() if k != "mips_norm"}})
        del index
    # row i of K.npy = fact i; one pass of exact scores serves every search
    for i, recall in recalls_of(founds, keys, queries, (1, args.k), "ip").items():
        row = rows[i] = rows[i] | recall
        knob = "ef_search" if "ef_search" in row else "nprobe"
        print(f"| {row['index']} | {knob} {row[knob]} | {100 * recall['recall@1']:.1f} | "
              f"{100 * recall[f'recall@{args.k}']:.1f} | {100 * recall[f'strict@{args.k}']:.1f} | "
              f"{row['ms_per_query']:.2f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv, "load_end": os.getloadavg(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
