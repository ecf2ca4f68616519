"""Retrieval cost versus N (SPEC section 9): exact top-k (torch matmul), faiss flat, HNSW (efSearch
sweep) and IVF-PQ (nprobe sweep) over N synthetic keys, batched like a prefill (one call for all
B x T token queries) and one query at a time like a decode step; recall@k against exact search.

Keys are seeded Gaussian rows (speed does not depend on where they came from); queries are planted
next to random keys (`--noise`), so "planted@k" (the key a query was made from is in its top-k) is a
clean accuracy number even where the other neighbours of a random point are near-ties. `--store DIR`
measures on a real store's keys instead. Built indexes are cached under ~/.cache/kblampp/bench (never
in the repo) with their build time and parameters, so the 1e6 HNSW is built once.

    python bench/bench_retrieval.py --sizes 10000 100000 1000000 --methods exact hnsw ivfpq
    python bench/bench_retrieval.py --sizes 10000 --methods hnsw --ef_search 16 32 --queries 256  # quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.retrieval import TensorKB  # noqa: E402

CACHE = Path(os.environ.get("KBLAMPP_BENCH_CACHE", "~/.cache/kblampp/bench")).expanduser()


# ---- data --------------------------------------------------------------------------------------

def synthetic_keys(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 Gaussian keys of norm ~1; the first rows of a larger draw equal a smaller draw."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 1 << 17):  # chunks keep the peak at one copy
        rows = min(1 << 17, n - s)
        out[s:s + rows] = rng.standard_normal((rows, d), dtype=np.float32)
    out /= math.sqrt(d)
    return out


def planted_queries(keys: np.ndarray, m: int, noise: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(queries (m, d), source rows (m,)): q = key + noise * unit-scale Gaussian."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, len(keys), size=m)
    d = keys.shape[1]
    q = keys[src] + noise * rng.standard_normal((m, d), dtype=np.float32) / math.sqrt(d)
    return np.ascontiguousarray(q, dtype=np.float32), src


# ---- cached indexes ----------------------------------------------------------------------------

def _param_tag(params: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(params.items()))


def cached_index(keys: np.ndarray, method: str, tag: str, similarity: str = "ip", **params) -> tuple[Any, dict]:
    """Load the index for (tag, N, d, method, build params) from the cache, or build and cache it.

    `tag` names the key set (e.g. 'gauss-seed0'); only build-time params belong in the folder name,
    search-time ones (ef_search, nprobe) are set on the loaded index by the caller."""
    from kblampp.knowledge_index import KnowledgeIndex  # faiss only where an index is asked for

    n, d = keys.shape
    build_params = {k: v for k, v in params.items() if k not in ("ef_search", "nprobe")}
    folder = CACHE / f"{tag}_{similarity}_{method}_N{n}_d{d}_{_param_tag(build_params) or 'default'}"
    info_path = folder / "build.json"
    if info_path.is_file() and (folder / "index" / "params.json").is_file():
        t0 = time.perf_counter()
        index = KnowledgeIndex.load(folder / "index", expect_n=n, expect_dim=d)
        info = json.loads(info_path.read_text())
        info["load_s"] = round(time.perf_counter() - t0, 2)
        info["cached"] = True
    else:
        print(f"  building {method} over N={n:,} (params {build_params}) ...", flush=True)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        index = KnowledgeIndex.build(keys, method, similarity, **params)
        build_s = time.perf_counter() - t0
        index.save(folder / "index")
        info = {"method": method, "N": n, "d": d, "params": index.params, "build_s": round(build_s, 1),
                "load_avg_at_start": round(load0, 2), "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tag": tag}
        tmp = info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, info_path)
        info = {**info, "cached": False}
        print(f"  built in {build_s:.1f} s -> {folder}", flush=True)
    set_search_params(index, **{k: v for k, v in params.items() if k in ("ef_search", "nprobe")})
    return index, info


def set_search_params(index: Any, ef_search: int | None = None, nprobe: int | None = None) -> None:
    """Search-time knobs on a loaded index (KnowledgeIndex.search reads params['ef_search'])."""
    if ef_search is not None and index.method == "hnsw":
        index.params["ef_search"] = int(ef_search)
        index.index.hnsw.efSearch = int(ef_search)
    if nprobe is not None and index.method == "ivfpq":
        index.params["nprobe"] = int(nprobe)
        index.index.nprobe = int(nprobe)


# ---- IVF in torch (the on-device approximate search for large stores) ---------------------------

class TorchIVF:
    """IVF-flat on the keys' device: a k-means coarse quantiser, keys grouped by list and padded into
    one (nlist, L, d) tensor; a batch of queries is searched by one bmm over the probed lists, with the
    (query, list) pairs grouped per list, so a prefill's 2,048 queries cost ~nprobe/nlist of a full
    matmul and a decode step reads nprobe lists. nprobe = nlist is exact (checked by self_check)."""

    def __init__(self, keys: torch.Tensor, nlist: int, nprobe: int, iters: int = 8, seed: int = 0,
                 sample: int = 262_144):
        n, d = keys.shape
        if not 1 <= nlist <= n:
            raise ValueError(f"TorchIVF: nlist must be in 1..{n}, got {nlist}")
        self.nprobe, self.n = min(nprobe, nlist), n
        gen = torch.Generator().manual_seed(seed)
        x = keys.detach()
        pick = torch.randperm(n, generator=gen)[:min(n, max(sample, nlist))].to(x.device)
        train = x[pick].float()
        cent = train[torch.randperm(len(train), generator=gen)[:nlist].to(x.device)].clone()
        for _ in range(iters):  # Lloyd's k-means (L2) on the sample
            assign = self._nearest(train, cent)
            sums = torch.zeros_like(cent).index_add_(0, assign, train)
            counts = torch.bincount(assign, minlength=nlist).clamp_min(1).unsqueeze(1)
            cent = torch.where(counts > 0, sums / counts, cent)
        self.centroids = cent.to(x.dtype)
        assign = torch.cat([self._nearest(c.float(), cent) for c in x.split(65536)])
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=nlist)
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n, device=x.device) - start[assign[order]]
        self.L = int(counts.max())
        self.lists = torch.zeros(nlist, self.L, d, dtype=x.dtype, device=x.device)
        self.ids = torch.full((nlist, self.L), -1, dtype=torch.long, device=x.device)
        self.lists[assign[order], slot] = x[order]
        self.ids[assign[order], slot] = order

    @staticmethod
    def _nearest(x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
        return (x @ cent.T - 0.5 * (cent * cent).sum(-1)).argmax(-1)  # argmin of the L2 distance

    @property
    def num_facts(self) -> int:
        return self.n

    @torch.no_grad()
    def search(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """(M, k) ids by inner product within the nprobe lists whose centroids match q best (-1 = none)."""
        q = q.detach().to(device=self.lists.device, dtype=self.lists.dtype)
        m, p = q.shape[0], self.nprobe
        probe = torch.topk(q @ self.centroids.T, p, dim=-1).indices.flatten()  # (M*p,) list of each pair
        qi = torch.arange(m, device=q.device).repeat_interleave(p)
        order = torch.argsort(probe, stable=True)
        lists, inv, counts = torch.unique(probe[order], return_inverse=True, return_counts=True)
        slot = torch.arange(len(order), device=q.device) - (torch.cumsum(counts, 0) - counts)[inv]
        if 2 * len(lists) > len(self.lists):  # most lists probed (a prefill): no copy of the padded lists
            row, key_lists, cand = lists[inv], self.lists, self.ids
        else:  # few lists (a decode step): gather just those
            row, key_lists, cand = inv, self.lists[lists], self.ids[lists]
        qpad = q.new_zeros(len(key_lists), int(counts.max()), q.shape[1])
        qpad[row, slot] = q[qi[order]]
        scores = torch.bmm(qpad, key_lists.transpose(1, 2))  # (lists, Qmax, L)
        scores = scores.masked_fill(cand[:, None, :] < 0, float("-inf"))
        kk = min(k, self.L)
        top = torch.topk(scores, kk, dim=-1)
        vals = top.values[row, slot]  # (M*p, kk) in probe-sorted order
        got = cand.reshape(-1)[row[:, None] * self.L + top.indices[row, slot]]  # (M*p, kk) fact ids
        pair_vals = torch.empty_like(vals)
        pair_ids = torch.empty_like(got)
        pair_vals[order], pair_ids[order] = vals, got
        best = torch.topk(pair_vals.view(m, p * kk), min(k, p * kk), dim=-1)
        ids = pair_ids.view(m, p * kk).gather(1, best.indices).masked_fill(best.values == float("-inf"), -1)
        if ids.shape[1] < k:
            ids = torch.cat([ids, ids.new_full((m, k - ids.shape[1]), -1)], 1)
        return ids


class IVFSource:
    """TorchIVF search + a TensorKB's rows: a KB source for the injected layers (search/fetch/num_facts)."""

    def __init__(self, ivf: TorchIVF, kb: TensorKB):
        self.ivf, self.kb = ivf, kb

    @property
    def num_facts(self) -> int:
        return self.kb.num_facts

    def search(self, q: torch.Tensor, k: int) -> torch.Tensor:
        return self.ivf.search(q, k)

    def fetch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.kb.fetch(ids)


def self_check(device: str = "cpu") -> None:
    """TorchIVF with nprobe = nlist equals exact top-k; with fewer lists it returns valid, distinct ids."""
    keys = torch.from_numpy(synthetic_keys(3000, 32, seed=5)).to(device)
    q, _ = planted_queries(keys.cpu().numpy(), 200, 0.5, seed=6)
    qt = torch.from_numpy(q).to(device)
    exact = _exact_torch(keys, qt, 8)
    full = TorchIVF(keys, nlist=16, nprobe=16).search(qt, 8).cpu().numpy()
    if not np.array_equal(full, exact):
        raise SystemExit(f"self_check FAILED: TorchIVF(nprobe=nlist) differs from exact top-k in "
                         f"{int((full != exact).any(1).sum())} of {len(q)} rows")
    part = TorchIVF(keys, nlist=16, nprobe=2).search(qt, 8).cpu().numpy()
    if part.min() < 0 or part.max() >= 3000 or any(len(set(r)) != 8 for r in part.tolist()):
        raise SystemExit("self_check FAILED: TorchIVF(nprobe=2) returned invalid or repeated ids")
    one = TorchIVF(keys, nlist=16, nprobe=2).search(qt[:1], 8).cpu().numpy()
    if not np.array_equal(one[0], part[0]):
        raise SystemExit("self_check FAILED: one query alone differs from the same query in a batch")
    print(f"self_check ok on {device}: TorchIVF exact at nprobe=nlist, valid ids at nprobe=2 "
          f"(recall@8 vs exact {np.mean([len(set(a) & set(b)) / 8 for a, b in zip(part, exact)]):.2f})")


# ---- timing ------------------------------------------------------------------------------------

def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _dev(x: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(x).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _exact_torch(keys_t: torch.Tensor, q: torch.Tensor, k: int) -> np.ndarray:
    """TensorKB's exact top-k (chunked matmul + topk), the on-device path of training and small stores."""
    kb = TensorKB(keys_t, keys_t[:, :1], keys_t[:, :1], keys_t[:, 0], keys_t[:, 0])
    return kb.search(q, k).cpu().numpy()


def measure(name: str, search: Callable[[np.ndarray, int], np.ndarray], q: np.ndarray, src: np.ndarray,
            ref: np.ndarray, k: int, single: int, repeats: int) -> dict:
    """Batched µs/query, single-query latency, recall@k vs `ref` and planted@k for one searcher."""
    batch_s = median_time(lambda: search(q, k), repeats)
    single_s = median_time(lambda: [search(q[i:i + 1], k) for i in range(single)], 1) / single
    got = search(q, k)
    m = len(ref)
    recall = float(np.mean([len(set(got[i].tolist()) & set(ref[i].tolist())) / k for i in range(m)]))
    planted = float(np.mean([src[i] in set(got[i].tolist()) for i in range(len(q))]))
    return {"method": name, "batch_us_per_query": 1e6 * batch_s / len(q), "batch_queries_per_s": len(q) / batch_s,
            "single_ms": 1e3 * single_s, "recall_at_k": recall, "planted_at_k": planted}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--methods", nargs="+", default=["exact", "hnsw", "ivfpq"],
                   choices=["exact", "flat", "hnsw", "ivfpq", "ivf_torch"])
    p.add_argument("--d", type=int, default=384, help="key dimension d_k")
    p.add_argument("--k", type=int, nargs="+", default=[8, 16], help="K_top values")
    p.add_argument("--queries", type=int, default=1024, help="batched queries (a 4 x 256 prefill = 1024 tokens)")
    p.add_argument("--single", type=int, default=100, help="one-query calls timed (decode-step latency)")
    p.add_argument("--ref_queries", type=int, default=256, help="queries scored against exact search for recall")
    p.add_argument("--noise", type=float, default=0.5, help="planted query = key + noise * N(0, 1/d)")
    p.add_argument("--hnsw_m", type=int, default=32)
    p.add_argument("--ef_construction", type=int, default=80)
    p.add_argument("--ef_search", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    p.add_argument("--pq_m", type=int, default=48)
    p.add_argument("--nlist", type=int, default=0, help="ivf_torch lists (0 = 4 sqrt(N))")
    p.add_argument("--device", default="cpu", help="device of the torch methods (exact, ivf_torch)")
    p.add_argument("--torch_dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="key dtype of the torch methods (float16 on a GPU, as the issue's H100 figures)")
    p.add_argument("--self_check", action="store_true", help="check TorchIVF against exact search, then exit")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch/faiss threads (0 = leave as is)")
    p.add_argument("--store", default=None, help="use a real store's keys (K.npy) instead of Gaussian ones")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.self_check:
        self_check(args.device)
        return 0
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    print(f"# retrieval cost, d={args.d}, {args.queries} batched queries, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    rows: list[dict] = []
    all_keys, tag = _key_source(args)
    for n in args.sizes:
        keys = all_keys[:n]
        if len(keys) < n:
            raise SystemExit(f"--sizes: {n} is larger than the {len(keys)} keys available")
        q, src = planted_queries(keys, args.queries, args.noise)
        keys_t = torch.from_numpy(keys).to(args.device, getattr(torch, args.torch_dtype))
        for k in args.k:
            ref = _exact_torch(keys_t, torch.from_numpy(q[:args.ref_queries]).to(args.device), k)
            base = {"N": n, "k": k}
            if "exact" in args.methods:
                rows.append({**base, **measure(f"exact (torch matmul, {args.device})",
                                               lambda x, kk: _exact_torch(keys_t, _dev(x, args.device), kk),
                                               q, src, ref, k, max(1, args.single // 4), args.repeats), "build_s": 0.0})
                _show(rows[-1])
            if "ivf_torch" in args.methods:
                nlist = args.nlist or int(4 * math.sqrt(n))
                t0 = time.perf_counter()
                ivf = TorchIVF(keys_t, nlist=nlist, nprobe=1)
                _sync(args.device)
                build_s = time.perf_counter() - t0
                for nprobe in args.nprobe:
                    ivf.nprobe = min(nprobe, nlist)
                    row = measure(f"ivf_torch nlist{nlist} nprobe{nprobe} ({args.device})",
                                  lambda x, kk: ivf.search(_dev(x, args.device), kk).cpu().numpy(), q, src, ref, k,
                                  args.single, args.repeats)
                    rows.append({**base, **row, "build_s": round(build_s, 1)})
                    _show(rows[-1])
            if "flat" in args.methods:
                idx, info = cached_index(keys, "flat", tag)
                rows.append({**base, **measure("faiss flat", lambda x, kk: idx.search(x, kk)[1], q, src, ref, k,
                                               max(1, args.single // 4), args.repeats), "build_s": info["build_s"]})
                _show(rows[-1])
            if "hnsw" in args.methods:
                idx, info = cached_index(keys, "hnsw", tag, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
                for ef in args.ef_search:
                    set_search_params(idx, ef_search=ef)
                    for how, fn in (("KnowledgeIndex", lambda x, kk: idx.search(x, kk)[1]),
                                    ("raw faiss", lambda x, kk: idx.index.search(x, kk)[1])):
                        row = measure(f"hnsw M{args.hnsw_m} efC{args.ef_construction} ef{ef} ({how})", fn, q, src,
                                      ref, k, args.single, args.repeats)
                        rows.append({**base, **row, "build_s": info["build_s"], "cached": info["cached"]})
                        _show(rows[-1])
            if "ivfpq" in args.methods:
                idx, info = cached_index(keys, "ivfpq", tag, pq_m=args.pq_m)
                for nprobe in args.nprobe:
                    set_search_params(idx, nprobe=nprobe)
                    row = measure(f"ivfpq nlist{idx.params.get('ivf_nlist_used')} pq{args.pq_m} nprobe{nprobe}",
                                  lambda x, kk: idx.search(x, kk)[1], q, src, ref, k, args.single, args.repeats)
                    rows.append({**base, **row, "build_s": info["build_s"], "cached": info["cached"]})
                    _show(rows[-1])
    _table(rows, min(args.sizes))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"argv": sys.argv, "load": os.getloadavg(), "rows": rows}, indent=1))
        os.replace(tmp, out)
    return 0


def _key_source(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    if args.store:
        from kblampp.kb_store import KBValueStore

        store = KBValueStore.load(args.store)
        keys = np.ascontiguousarray(store.keys_tensor().numpy(), dtype=np.float32)
        args.d = keys.shape[1]
        return keys, f"store-{store.store_id}"
    t0 = time.perf_counter()
    keys = synthetic_keys(max(args.sizes), args.d)
    print(f"  {len(keys):,} Gaussian keys in {time.perf_counter() - t0:.1f} s", flush=True)
    return keys, "gauss-seed0"


def _show(row: dict) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def _table(rows: list[dict], n0: int) -> None:
    """Markdown table; 'x vs N0' = batched per-query cost over the same method's cost at the smallest N."""
    base = {(r["method"], r["k"]): r["batch_us_per_query"] for r in rows if r["N"] == n0}
    print("\n| N | K_top | method | batched µs/query | queries/s | x vs N=" f"{n0:,} | one query ms | recall@k | planted@k |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        grow = r["batch_us_per_query"] / base[(r["method"], r["k"])] if (r["method"], r["k"]) in base else float("nan")
        print(f"| {r['N']:,} | {r['k']} | {r['method']} | {r['batch_us_per_query']:.1f} | "
              f"{r['batch_queries_per_s']:.0f} | {grow:.2f} | {r['single_ms']:.3f} | {r['recall_at_k']:.3f} | "
              f"{r['planted_at_k']:.3f} |")


if __name__ == "__main__":
    from kblampp.cli import run_main
    raise SystemExit(run_main(main))
