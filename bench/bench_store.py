"""Benchmark the offline store pipeline on generated worlds (SPEC section 9): encode facts/s, index
build time, peak memory, HNSW / IVF-PQ recall@k against exact search on the stored keys, queries/s.

    python bench/bench_store.py --min_facts 100000                     # full run (MiniLM on every string)
    python bench/bench_store.py --min_facts 100000 --sentence_fraction 0.2
With --sentence_fraction f < 1 only a fraction f of the evidence sentences is embedded (the others
reuse the tail's embedding as e_c); heads, relations and tails are always embedded, so the keys, and
every recall number, are real. Prints one JSON object (and a markdown table) to paste into
docs/BENCHMARKS.md. Not a test: it takes minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.embedding import embed_unique, load_embedder  # noqa: E402
from kblampp.kb_store import RAW, KBValueStore, build_store_index, write_store  # noqa: E402
from kblampp.knowledge_index import KnowledgeIndex, recall_at_k  # noqa: E402
from kblampp.kv_encoder import KVEncoder  # noqa: E402
from kblampp.schema import load_facts  # noqa: E402
from kblampp.synth.pipeline import make_world_file  # noqa: E402
from kblampp.synth.world import generate_world  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="/tmp/kblampp_bench_store", help="work folder (tuples + store)")
    p.add_argument("--min_facts", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embedding_model", default="embedded:all-MiniLM-L6-v2")
    p.add_argument("--sentence_fraction", type=float, default=1.0)
    p.add_argument("--d_k", type=int, default=384)
    p.add_argument("--d_v", type=int, default=384)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.3, help="query = key + noise of this relative norm")
    p.add_argument("--reuse", action="store_true", help="reuse an existing store in --out_dir")
    p.add_argument("--methods", default="hnsw,ivfpq", help="indexes built into the store and measured ('' = none)")
    p.add_argument("--ivfpq_variant", action="append", default=[], metavar="PQ_M:NPROBE",
                   help="also measure an in-memory IVF-PQ with these parameters (repeatable), e.g. 48:64")
    args = p.parse_args(argv)
    out, res = Path(args.out_dir), {"machine": f"{platform.processor() or platform.machine()}, "
                                    f"{__import__('os').cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    out.mkdir(parents=True, exist_ok=True)
    tuples, store_dir = out / "facts.jsonl", out / "store"
    if not (args.reuse and (store_dir / "manifest.json").is_file()):
        per_world = len(generate_world(0, args.seed, set()))
        t0 = time.perf_counter()
        make_world_file(tuples, args.seed, math.ceil(args.min_facts / per_world * 1.02) + 1)
        facts = load_facts(tuples)
        res["generate_s"] = time.perf_counter() - t0
        embedder = load_embedder(args.embedding_model)
        t0 = time.perf_counter()
        rng = np.random.default_rng(args.seed)
        sampled = rng.random(len(facts)) < args.sentence_fraction
        short = [f.head_name for f in facts] + [f.relation_name for f in facts] + [f.tail_name for f in facts]
        table, index = embed_unique(embedder, short + [f.sentence for f, s in zip(facts, sampled) if s],
                                    args.batch_size)
        n = len(facts)
        raw = {"e_h": table[index[:n]], "e_r": table[index[n:2 * n]], "e_t": table[index[2 * n:3 * n]]}
        raw["e_c"] = raw["e_t"].copy()
        raw["e_c"][sampled] = table[index[3 * n:]]
        res["embed_s"], res["distinct_strings_embedded"] = time.perf_counter() - t0, len(table)
        t1 = time.perf_counter()
        enc = KVEncoder(embedder.dim, args.d_k, args.d_v, 32, seed=args.seed)
        write_store(store_dir, facts, raw, enc, embedder.name, tuples)
        res["kv_and_write_s"] = time.perf_counter() - t1
        res.update(n_facts=n, sentence_fraction=args.sentence_fraction,
                   strings_per_s=len(table) / res["embed_s"],
                   encode_facts_per_s=n / (res["embed_s"] + res["kv_and_write_s"]),
                   peak_rss_mb_after_encode=peak_rss_mb())
        del raw, table, facts
    store = KBValueStore.load(store_dir)
    keys = np.asarray(store.arrays["K.npy"], dtype=np.float32)
    res["n_facts"] = store.n
    rng = np.random.default_rng(args.seed + 1)
    pick = rng.choice(store.n, size=args.queries, replace=False)
    noise = rng.standard_normal((args.queries, keys.shape[1])).astype(np.float32)
    base = keys[pick]
    noise *= args.noise * np.linalg.norm(base, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
    queries = {"stored_keys": base, f"keys_plus_{args.noise}_noise": base + noise}
    for method in [m for m in args.methods.split(",") if m]:
        rep = build_store_index(store_dir, method, "cosine")
        res[f"{method}_build_s"], res[f"{method}_params"] = rep["build_s"], rep["params"]
        index = KnowledgeIndex.load(store.index_dir(method), expect_n=store.n, expect_store_id=store.store_id)
        for name, q in queries.items():
            rec = recall_at_k(index, keys, q, args.k)
            res[f"{method}_recall@{args.k}_{name}"] = rec["recall"]
            res[f"{method}_strict_recall@{args.k}_{name}"] = rec["strict_recall"]
        q = queries[f"keys_plus_{args.noise}_noise"]
        t0 = time.perf_counter()
        index.search(q, args.k)
        res[f"{method}_batched_qps"] = len(q) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for row in q[:200]:
            index.search(row[None], args.k)
        res[f"{method}_single_query_ms"] = (time.perf_counter() - t0) / 200 * 1000
    for variant in args.ivfpq_variant:
        pq_m, nprobe = (int(x) for x in variant.split(":"))
        t0 = time.perf_counter()
        index = KnowledgeIndex.build(keys, "ivfpq", "cosine", pq_m=pq_m, nprobe=nprobe)
        name = f"ivfpq_m{pq_m}_nprobe{nprobe}"
        res[f"{name}_build_s"] = time.perf_counter() - t0
        q = queries[f"keys_plus_{args.noise}_noise"]
        res[f"{name}_recall@{args.k}_keys_plus_{args.noise}_noise"] = recall_at_k(index, keys, q, args.k)["recall"]
        t0 = time.perf_counter()
        index.search(q, args.k)
        res[f"{name}_batched_qps"] = len(q) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    exact = KnowledgeIndex.build(keys, "flat", "cosine")
    exact.search(queries[f"keys_plus_{args.noise}_noise"], args.k)
    res["exact_flat_qps"] = args.queries / (time.perf_counter() - t0)
    res["peak_rss_mb"] = peak_rss_mb()
    res["store_bytes"] = sum(f.stat().st_size for f in store_dir.rglob("*") if f.is_file())
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}, indent=2))
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
