"""Recall@k of the Milvus backend (Milvus Lite) against faiss, both against exact search: HNSW against
HNSW (default), or IVF_FLAT against faiss `ivfflat` (`--index ivfflat`, the same nlist and nprobe).

    python bench/bench_milvus.py --store_dir /work/main/store/synth_world --copies 8 --queries 1000
    python bench/bench_milvus.py --store_dir runs/kb_size/n100000/store --copies 1 \
        --queries_npy runs/kb_size/queries.npy --hnsw_m 64 --ef_construction 400 --ef_search 1024
    python bench/bench_milvus.py --store_dir runs/kb_size/n100000/store --copies 1 \
        --queries_npy runs/kb_size/queries.npy --index ivfflat --nprobe 128

Keys: the store's trained keys K.npy, plus `copies - 1` noisy replicas of each (replica = key + noise
of relative norm --replica_noise), so the index holds N * copies keys with the store's real geometry
and dense neighbourhoods. Queries: stored keys (random rows) + noise of relative norm --noise, so no
query is in the index; or `--queries_npy`, real questions' queries. Both indexes get the same HNSW parameters (M, efConstruction, efSearch) and
the store index's similarity; recall is `recall_at_k` (tie-aware; `strict` is plain id overlap).
Prints one JSON object with the machine load. Not a test and not a timing benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.knowledge_index import KnowledgeIndex, recall_at_k  # noqa: E402
from kblampp.store_io import read_json  # noqa: E402


def noisy(x: np.ndarray, rel: float, rng: np.random.Generator) -> np.ndarray:
    """x + a random direction scaled to `rel` times each row's norm."""
    g = rng.standard_normal(x.shape).astype(np.float32)
    g *= (rel * np.linalg.norm(x, axis=1, keepdims=True) / np.linalg.norm(g, axis=1, keepdims=True))
    return (x + g).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store_dir", default="/work/main/store/synth_world")
    p.add_argument("--copies", type=int, default=8, help="index size = store N * copies")
    p.add_argument("--replica_noise", type=float, default=0.5)
    p.add_argument("--noise", type=float, default=0.3, help="query = stored key + noise of this relative norm")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--queries_npy", help="real queries (N, d) instead of noisy stored keys, e.g. the trained "
                   "model's query at each test question's last prompt token (bench/bench_kb_size.py's queries.npy)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--hnsw_m", type=int, default=32)
    p.add_argument("--ef_construction", type=int, default=200)
    p.add_argument("--ef_search", type=int, default=128)
    p.add_argument("--index", choices=("hnsw", "ivfflat"), default="hnsw",
                   help="hnsw: faiss HNSW vs Milvus HNSW; ivfflat: faiss IVF-flat vs Milvus IVF_FLAT")
    p.add_argument("--ivf_nlist", type=int, default=0, help="IVF lists (0 = about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=128)
    p.add_argument("--similarity", default=None, help="default: the store index's (else ip)")
    p.add_argument("--milvus_mips", choices=("l2", "ip"), default="l2",
                   help="Milvus's inner-product search: the L2 form (default, as faiss's) or its native IP")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    store = Path(args.store_dir)
    base = np.load(store / "K.npy", allow_pickle=False).astype(np.float32)
    alive = np.load(store / "meta/alive.npy", allow_pickle=False)
    base = base[alive]
    similarity = args.similarity
    if similarity is None:
        found = sorted(store.glob("index_*/params.json"))
        similarity = read_json(found[0], "index params")["similarity"] if found else "ip"
    rng = np.random.default_rng(args.seed)
    keys = np.concatenate([base] + [noisy(base, args.replica_noise, rng) for _ in range(args.copies - 1)])
    if args.queries_npy:
        queries = np.load(args.queries_npy, allow_pickle=False).astype(np.float32)
        if queries.ndim != 2 or queries.shape[1] != base.shape[1]:
            raise SystemExit(f"{args.queries_npy}: expected (N, {base.shape[1]}) queries, got {queries.shape}")
    else:
        rows = rng.choice(len(base), size=min(args.queries, len(base)), replace=False)
        queries = noisy(base[rows], args.noise, rng)
    if args.index == "hnsw":
        params = {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search": args.ef_search}
        milvus_params = dict(params, milvus_index_type="HNSW")
    else:
        params = {"ivf_nlist": args.ivf_nlist, "nprobe": args.nprobe}
        milvus_params = dict(params, milvus_index_type="IVF_FLAT")

    res = {"keys": f"{store}/K.npy ({len(base)} live trained keys) x {args.copies} "
                   f"(replicas at relative noise {args.replica_noise})",
           "n": len(keys), "d": keys.shape[1], "queries": len(queries),
           "query_source": args.queries_npy or f"stored keys + noise of relative norm {args.noise}",
           "k": args.k, "similarity": similarity, "index": args.index, "params": params,
           "load_avg_start": os.getloadavg(), "cpu_count": os.cpu_count()}
    faiss_index = KnowledgeIndex.build(keys, args.index, similarity, **params)
    res[f"faiss_{args.index}"] = recall_at_k(faiss_index, keys, queries, args.k)
    del faiss_index
    with tempfile.TemporaryDirectory(prefix="kblampp_milvus_") as tmp:
        uri = str(Path(tmp) / "milvus.db")
        milvus = KnowledgeIndex.build(keys, "milvus", similarity, uri=uri, collection="bench", mips=args.milvus_mips,
                                      **milvus_params)
        res["milvus_index"] = milvus.client.describe_index("bench", "key")
        files = [f.suffix or f.name for f in Path(uri).rglob("*") if f.is_file()]
        res["milvus_lite_files"] = {s: files.count(s) for s in sorted(set(files))}  # .idx: one index per segment
        res[f"milvus_{args.index}"] = recall_at_k(milvus, keys, queries, args.k)
        milvus.close()
    res["recall_gap"] = round(res[f"milvus_{args.index}"]["recall"] - res[f"faiss_{args.index}"]["recall"], 4)
    res["load_avg_end"] = os.getloadavg()
    import milvus_lite
    import pymilvus

    res["versions"] = {"pymilvus": pymilvus.__version__, "milvus_lite": milvus_lite.__version__,
                       "faiss": __import__("faiss").__version__}
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
