"""The ANN index over the store's keys (faiss only; no torch here, SPEC sections 5-6).

faiss labels are positions in `labels` (label -> fact id), so one code path serves every method:
flat, IVF-flat and IVF-PQ physically remove deleted labels, HNSW (which cannot remove) marks them dead
and search over-fetches and filters them.

Edits after the build (`add(..., exact=True)`: live adds and replacements) go into a small exact
segment searched by brute force and merged with the ANN results, never into the ANN graph: a key
re-added to an HNSW graph next to its own dead copy can end up unreachable (issue 15), an exact
segment cannot. `needs_rebuild` / `rebuilt` fold the segment and the dead entries into a fresh ANN
index when they grow past a fraction of the live facts (the server does that at compaction).
The folder `index_<method>/` holds `index.faiss`, `labels.npy`, `dead.npy`, `exact_ids.npy`,
`exact_keys.npy` and `params.json` (method, similarity, parameters, dim, and the store id + N it was
built for, checked on load).

Inner product on HNSW (`mips: "l2"`, the default): the model's queries are far from its keys (trained
queries have norms ~40x the keys'), and faiss's native inner-product HNSW graph then misses a tenth of
the exact top-8 at 10^4 keys (issue 16). The index instead stores each key with one extra coordinate
sqrt(M^2 - |k|^2) (M = the largest key norm at build), so all keys have norm M, and searches the unit
query with a 0 appended by L2: |q - k'|^2 = 1 + M^2 - 2 q.k, the same order as the inner product
(Bachrach et al., 2014). Scores are converted back to inner products. A key added later with a norm
above M goes to the exact segment. `mips: "ip"` keeps faiss's native inner product (folders saved
before this option load as that).

IVF-flat (`ivfflat`) clusters the same L2-form keys into about 4 sqrt(N) lists and scans `nprobe` of
them with full keys, so every score it returns is exact. On the trained keys it holds far more of
the exact top-8 than the HNSW at 10^6 facts, where half the keys share their (head, relation) with
another fact and the HNSW graph walk loses whole groups of equal keys (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from kblampp.store_io import StoreError, atomic_dir, read_json, save_npy, write_json_atomic

METHODS = ("hnsw", "ivfflat", "ivfpq", "flat", "milvus")  # milvus: kblampp/milvus_index.py, same API
SIMILARITIES = ("cosine", "ip")
IVF_METHODS = ("ivfflat", "ivfpq")
TRAIN_PER_LIST = 64
DEFAULTS = {
    "hnsw": {"hnsw_m": 64, "ef_construction": 400, "ef_search": 1024, "mips": "l2"},  # see docs/BENCHMARKS.md
    "ivfflat": {"ivf_nlist": 0, "nprobe": 128, "mips": "l2"},  # full keys in lists: exact scores, see docs/BENCHMARKS.md
    "ivfpq": {"ivf_nlist": 0, "pq_m": 16, "pq_bits": 8, "nprobe": 128},
    "flat": {},
    "milvus": {"uri": "", "collection": "kblampp_keys", "milvus_index_type": "HNSW", "hnsw_m": 64,
               "ef_construction": 400, "ef_search": 1024, "ivf_nlist": 0, "nprobe": 128,
               "mips": "l2"},  # the faiss HNSW's / IVF-flat's defaults: the same graph or lists, the same search
}


def config_params(index_cfg: Any, method: str | None = None) -> dict:
    """The build parameters of `method` (default: the section's own) from a config's `index` section."""
    return {k: getattr(index_cfg, k) for k in DEFAULTS[method or index_cfg.method]}


SEARCH_PARAMS = ("ef_search", "nprobe")  # read at every search; changing them needs no rebuild


def apply_search_params(index: Any, index_cfg: Any) -> None:
    """Search-time settings come from the config, not from the folder the index was saved in: an
    HNSW's efSearch (faiss or Milvus) and an IVF's nprobe need no rebuild, and a larger KB wants a
    longer search."""
    for name in SEARCH_PARAMS:
        if name in index.params:
            index.params[name] = int(getattr(index_cfg, name))


def ivf_nlist(params: dict, count: int) -> int:
    """IVF lists for `count` keys: `ivf_nlist`, or about 4 sqrt(N), at most N/39 (faiss wants ~39 training
    points per centroid); recorded in `params` as `ivf_nlist_used`."""
    nlist = int(params["ivf_nlist"]) or int(4 * math.sqrt(count))
    params["ivf_nlist_used"] = nlist = max(1, min(nlist, count // 39))
    return nlist


def searches_ip_as_l2(method: str, similarity: str, params: dict) -> bool:
    """Whether an index searches inner product in the L2 form (`mips: l2` on an HNSW or IVF-flat
    backend; params without `mips`, as saved before the option, mean native inner product)."""
    return method in ("hnsw", "ivfflat", "milvus") and similarity == "ip" and params.get("mips", "ip") == "l2"


def l2_form_keys(keys: np.ndarray, mips_norm: float) -> np.ndarray:
    """Keys with the extra coordinate sqrt(M^2 - |k|^2): every row has norm M (`mips: l2`)."""
    extra = np.sqrt(np.maximum(float(mips_norm) ** 2 - np.einsum("nd,nd->n", keys, keys), 0.0))
    return np.ascontiguousarray(np.hstack([keys, extra[:, None]]), dtype=np.float32)


def l2_form_queries(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit queries with a 0 appended, their norms): L2 order on these = inner-product order."""
    norms = np.linalg.norm(queries, axis=1)
    unit = queries / np.maximum(norms, 1e-12)[:, None]
    return np.ascontiguousarray(np.hstack([unit, np.zeros((len(queries), 1), np.float32)]), np.float32), norms


class IndexMismatchError(StoreError):
    """An index folder that does not match what the caller expects (store id, N, dimension)."""


def _as_f32(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{what}: expected shape (n, {dim if dim is not None else 'd'}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or inf")
    return x


class KnowledgeIndex:
    """A faiss index over fact keys that searches by fact id (see module doc)."""

    def __init__(self, index: faiss.Index, method: str, similarity: str, params: dict,
                 labels: np.ndarray, dead: np.ndarray, store_id: str | None = None, n: int | None = None,
                 exact_ids: np.ndarray | None = None, exact_keys: np.ndarray | None = None):
        self.index, self.method, self.similarity, self.params = index, method, similarity, params
        self.labels, self.dead = labels.astype(np.int64), dead.astype(bool)
        self.store_id, self.n = store_id, n
        self.mips_l2 = searches_ip_as_l2(method, similarity, params)
        self.dim = int(index.d) - int(self.mips_l2)  # the keys' dimension (the L2 form stores one more)
        self.exact_ids = np.zeros(0, np.int64) if exact_ids is None else np.asarray(exact_ids, np.int64)
        self.exact_keys = (np.zeros((0, self.dim), np.float32) if exact_keys is None
                           else np.ascontiguousarray(exact_keys, dtype=np.float32))  # already normalised for cosine

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, keys: np.ndarray, method: str = "hnsw", similarity: str = "cosine",
              ids: np.ndarray | None = None, store_id: str | None = None, n: int | None = None,
              **params) -> "KnowledgeIndex":
        """Index `keys` (rows get fact ids `ids`, default 0..len-1); unknown params are an error."""
        if method not in METHODS:
            raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity: {similarity!r} is not one of {', '.join(SIMILARITIES)}")
        unknown = set(params) - set(DEFAULTS[method])
        if unknown:
            raise ValueError(f"unknown {method} parameter(s) {sorted(unknown)} (known: {sorted(DEFAULTS[method])})")
        keys = _as_f32(keys, None, "keys")
        count, dim = keys.shape
        ids = np.arange(count, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if ids.shape != (count,):
            raise ValueError(f"ids: expected shape ({count},), got {ids.shape}")
        full = {**DEFAULTS[method], **params}
        if "mips" in full and full["mips"] not in ("l2", "ip"):  # the HNSW and IVF-flat backends
            raise ValueError(f"mips: {full['mips']!r} is not one of l2, ip")
        if searches_ip_as_l2(method, similarity, full):
            full["mips_norm"] = float(np.linalg.norm(keys, axis=1).max()) if count else 0.0
            dim += 1
        if method == "milvus":
            from kblampp.milvus_index import MilvusIndex
            return MilvusIndex.create(keys, ids, similarity, full, store_id, count if n is None else n)
        index = cls._new_faiss(method, dim, full, count, l2="mips_norm" in full)
        self = cls(index, method, similarity, full, np.zeros(0, np.int64), np.zeros(0, bool), store_id,
                   count if n is None else n)
        if method in IVF_METHODS:
            self._train_ivf(keys)
        self.add(keys, ids)
        return self

    @staticmethod
    def _new_faiss(method: str, dim: int, p: dict, count: int, l2: bool = False) -> faiss.Index:
        ip = faiss.METRIC_L2 if l2 else faiss.METRIC_INNER_PRODUCT
        if method == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if method == "hnsw":
            index = faiss.IndexHNSWFlat(dim, int(p["hnsw_m"]), ip)
            index.hnsw.efConstruction = int(p["ef_construction"])
            index.hnsw.efSearch = int(p["ef_search"])
            return index
        nlist = ivf_nlist(p, count)
        if method == "ivfflat":
            return faiss.IndexIVFFlat(faiss.IndexFlatL2(dim) if l2 else faiss.IndexFlatIP(dim), dim, nlist, ip)
        if dim % int(p["pq_m"]):
            raise ValueError(f"pq_m: {p['pq_m']} does not divide the key dimension {dim}")
        if count < 2 ** int(p["pq_bits"]):
            raise ValueError(f"ivfpq needs at least {2 ** int(p['pq_bits'])} keys to train "
                             f"(pq_bits={p['pq_bits']}), got {count}; use flat or hnsw")
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, int(p["pq_m"]), int(p["pq_bits"]), ip)

    def _train_ivf(self, keys: np.ndarray) -> None:
        """k-means for the IVF lists on at most TRAIN_PER_LIST keys per list (a fixed sample: the
        centroids barely move beyond that, and 10^6 keys would take minutes more)."""
        take = self.index.nlist * TRAIN_PER_LIST
        if len(keys) > take:
            keys = keys[np.sort(np.random.default_rng(0).choice(len(keys), take, replace=False))]
        if not len(keys):  # an empty KB: one list around the origin, so later adds have somewhere to go
            keys = np.zeros((1, self.dim), np.float32)
        self.index.cp.min_points_per_centroid = 1  # a small KB gets one list (ivf_nlist): nothing to warn about
        self.index.train(l2_form_keys(keys, self.params["mips_norm"]) if self.mips_l2 else self._prep(keys))

    def _prep(self, x: np.ndarray) -> np.ndarray:
        if self.similarity == "cosine":
            x = x.copy()
            faiss.normalize_L2(x)
        return x

    # ---- edits -------------------------------------------------------------------------------
    def add(self, keys: np.ndarray, ids: np.ndarray, exact: bool = False) -> None:
        """Add keys under fact ids (an id already live must be removed first); `exact=True` puts them
        in the exact segment (edits after the build) instead of the ANN structure."""
        keys = _as_f32(keys, self.dim, "keys")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.shape[0] != keys.shape[0]:
            raise ValueError(f"ids: {ids.shape[0]} ids for {keys.shape[0]} keys")
        live = set(self.labels[~self.dead].tolist()) | set(self.exact_ids.tolist())
        clash = [i for i in ids.tolist() if i in live]
        if clash or len(set(ids.tolist())) != len(ids):
            raise ValueError(f"ids: fact id {(clash or ids.tolist())[0]} is already in the index (remove it first)")
        if exact:
            self.exact_ids = np.concatenate([self.exact_ids, ids])
            self.exact_keys = np.concatenate([self.exact_keys, self._prep(keys)])
            if self.n is not None and len(ids):
                self.n = max(self.n, int(ids.max()) + 1)
            return
        if self.mips_l2:  # a key longer than M has no L2 form with the same order: search it exactly
            longer = np.linalg.norm(keys, axis=1) > float(self.params["mips_norm"])
            if longer.any():
                self.add(keys[longer], ids[longer], exact=True)
                keys, ids = keys[~longer], ids[~longer]
        start = len(self.labels)
        new_labels = np.arange(start, start + len(ids), dtype=np.int64)
        x = l2_form_keys(keys, self.params["mips_norm"]) if self.mips_l2 else self._prep(keys)
        if self.method == "hnsw":
            self.index.add(x)
        else:
            self.index.add_with_ids(x, new_labels)
        self.labels = np.concatenate([self.labels, ids])
        self.dead = np.concatenate([self.dead, np.zeros(len(ids), bool)])
        if self.n is not None and len(ids):
            self.n = max(self.n, int(ids.max()) + 1)

    def remove(self, ids) -> int:
        """Remove facts by id; returns how many index entries were removed or hidden."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        wanted = np.isin(self.labels, ids) & ~self.dead
        gone = np.flatnonzero(wanted).astype(np.int64)
        if len(gone) and self.method != "hnsw":
            self.index.remove_ids(faiss.IDSelectorBatch(gone))
        self.dead[gone] = True
        in_exact = np.isin(self.exact_ids, ids)
        if in_exact.any():
            self.exact_ids, self.exact_keys = self.exact_ids[~in_exact], self.exact_keys[~in_exact]
        return len(gone) + int(in_exact.sum())

    def needs_rebuild(self, fraction: float = 0.1) -> bool:
        """True when the exact segment plus the dead ANN entries exceed `fraction` of the live facts."""
        return len(self.exact_ids) + int(self.dead.sum()) > fraction * max(1, self.n_live)

    def rebuilt(self, keys: np.ndarray, ids: np.ndarray) -> "KnowledgeIndex":
        """A fresh index of the same method, similarity and parameters over `keys` (fact ids `ids`)."""
        params = {k: v for k, v in self.params.items() if k in DEFAULTS[self.method]}
        return KnowledgeIndex.build(keys, self.method, self.similarity, ids=ids, store_id=self.store_id,
                                    n=self.n, **params)

    # ---- search ------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Entries a search can return: the faiss index's (dead HNSW entries included) + the exact segment."""
        return int(self.index.ntotal) + len(self.exact_ids)

    @property
    def n_live(self) -> int:
        return int((~self.dead).sum()) + len(self.exact_ids)

    def search(self, queries: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (Q,k) float32, fact ids (Q,k) int64); missing slots have id -1, score -inf."""
        queries = self._prep(_as_f32(queries, self.dim, "queries"))
        hidden = int(self.dead.sum()) if self.method == "hnsw" else 0
        fetch = max(1, min(k + hidden, int(self.index.ntotal)))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if self.index.ntotal:
            self._search_ann(queries, k, batch_size, hidden, fetch, scores, ids)
        if len(self.exact_ids):
            scores, ids = self._merge_exact(queries, k, scores, ids)
        return scores, ids

    def _merge_exact(self, queries: np.ndarray, k: int, scores: np.ndarray,
                     ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top-k of the exact segment merged with the ANN top-k (highest score first)."""
        ex = queries @ self.exact_keys.T  # (Q, S) same similarity as the ANN part (queries are prepped)
        take = min(k, ex.shape[1])
        top = np.argpartition(-ex, take - 1, axis=1)[:, :take]
        all_scores = np.concatenate([scores, np.take_along_axis(ex, top, 1)], axis=1)
        all_ids = np.concatenate([ids, self.exact_ids[top]], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        return (np.take_along_axis(all_scores, order, 1).astype(np.float32),
                np.take_along_axis(all_ids, order, 1))

    def _search_ann(self, queries: np.ndarray, k: int, batch_size: int, hidden: int, fetch: int,
                    scores: np.ndarray, ids: np.ndarray) -> None:
        if self.method == "hnsw":
            self.index.hnsw.efSearch = max(int(self.params["ef_search"]), fetch)
        if self.method in IVF_METHODS:
            self.index.nprobe = int(self.params["nprobe"])
        for start in range(0, len(queries), batch_size):
            chunk = queries[start:start + batch_size]
            if self.mips_l2:  # distances back to inner products: q.k = |q| (1 + M^2 - d) / 2
                unit, norms = l2_form_queries(chunk)
                d, lab = self.index.search(unit, fetch)
                d = norms[:, None] * (1.0 + float(self.params["mips_norm"]) ** 2 - d) / 2.0
            else:
                d, lab = self.index.search(chunk, fetch)
            if not hidden:  # nothing dead in the index: map labels to fact ids in one vectorised step
                found = lab >= 0
                rows = slice(start, start + len(lab))
                ids[rows, :fetch] = np.where(found, self.labels[np.where(found, lab, 0)], -1)
                scores[rows, :fetch] = np.where(found, d, -np.inf)
                continue
            for row, (drow, lrow) in enumerate(zip(d, lab), start=start):
                keep = lrow >= 0
                keep[keep] = ~self.dead[lrow[keep]]
                got_ids, got_d = self.labels[lrow[keep]][:k], drow[keep][:k]
                ids[row, :len(got_ids)], scores[row, :len(got_d)] = got_ids, got_d

    # ---- persistence -------------------------------------------------------------------------
    def params_json(self) -> dict:
        return {"format": "kblampp-index", "method": self.method, "similarity": self.similarity,
                "dim": self.dim, "params": self.params, "store_id": self.store_id, "n": self.n,
                "ntotal": int(self.index.ntotal), "n_labels": len(self.labels), "n_live": self.n_live,
                "n_exact": len(self.exact_ids),
                "faiss_version": faiss.__version__, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def writers(self) -> dict[str, Callable[[Path], None]]:
        """File name -> writer, so a store edit can commit the index together with its arrays."""
        return {"index.faiss": lambda p: faiss.write_index(self.index, str(p)),
                "labels.npy": lambda p: save_npy(p, self.labels),
                "dead.npy": lambda p: save_npy(p, self.dead),
                "exact_ids.npy": lambda p: save_npy(p, self.exact_ids),
                "exact_keys.npy": lambda p: save_npy(p, self.exact_keys),
                "params.json": lambda p: write_json_atomic(p, self.params_json())}

    def save(self, folder: str | Path) -> Path:
        """Write the index folder atomically (temp folder, then swap)."""
        with atomic_dir(folder) as tmp:
            for name, write in self.writers().items():
                write(tmp / name)
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path, expect_n: int | None = None, expect_dim: int | None = None,
             expect_store_id: str | None = None) -> "KnowledgeIndex":
        """Load and check against the caller's store; any disagreement is an IndexMismatchError."""
        folder = Path(folder)
        meta = read_json(folder / "params.json", "index params")
        if meta.get("method") == "milvus":
            from kblampp.milvus_index import MilvusIndex
            return MilvusIndex.load(folder, expect_n, expect_dim, expect_store_id)
        for name in ("index.faiss", "labels.npy", "dead.npy"):
            if not (folder / name).is_file():
                raise IndexMismatchError(f"{folder / name}: missing")
        index = faiss.read_index(str(folder / "index.faiss"))
        labels = np.load(folder / "labels.npy", allow_pickle=False)
        dead = np.load(folder / "dead.npy", allow_pickle=False)
        where = f"{folder}/params.json"
        if expect_store_id is not None and meta.get("store_id") != expect_store_id:
            raise IndexMismatchError(f"{where}: store_id: index was built for store {meta.get('store_id')!r}, "
                              f"this store is {expect_store_id!r} (rebuild with offline/build_index.py)")
        if expect_n is not None and meta.get("n") != expect_n:
            raise IndexMismatchError(f"{where}: n: index covers {meta.get('n')} facts, the store has {expect_n}")
        key_dim = index.d - int(searches_ip_as_l2(meta.get("method"), meta.get("similarity"), meta.get("params") or {}))
        if expect_dim is not None and key_dim != expect_dim:
            raise IndexMismatchError(f"{where}: dim: index dimension {key_dim}, the store's keys have {expect_dim}")
        if meta.get("dim") != key_dim:
            raise IndexMismatchError(f"{where}: dim: params say {meta.get('dim')}, index.faiss has {key_dim}")
        if index.ntotal != meta.get("ntotal"):
            raise IndexMismatchError(f"{where}: ntotal: params say {meta.get('ntotal')}, index.faiss has {index.ntotal}")
        if labels.shape != (meta.get("n_labels"),) or dead.shape != labels.shape:
            raise IndexMismatchError(f"{folder}/labels.npy: {labels.shape[0]} labels / {dead.shape[0]} dead flags, "
                              f"params say {meta.get('n_labels')}")
        exact_ids, exact_keys = None, None
        if (folder / "exact_ids.npy").is_file():  # older folders have no exact segment
            exact_ids = np.load(folder / "exact_ids.npy", allow_pickle=False)
            exact_keys = np.load(folder / "exact_keys.npy", allow_pickle=False)
            if exact_ids.shape != (meta.get("n_exact", 0),) or exact_keys.shape != (len(exact_ids), key_dim):
                raise IndexMismatchError(f"{folder}/exact_ids.npy: {exact_ids.shape[0]} ids / keys {exact_keys.shape}, "
                                         f"params say {meta.get('n_exact', 0)} of dimension {key_dim}")
        return cls(index, meta["method"], meta["similarity"], meta["params"], labels, dead,
                   meta.get("store_id"), meta.get("n"), exact_ids, exact_keys)


def exact_search(keys: np.ndarray, queries: np.ndarray, k: int, similarity: str = "cosine",
                 batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k with the index's similarity (reference for recall measurements)."""
    ref = KnowledgeIndex.build(keys, "flat", similarity)
    return ref.search(queries, k, batch_size)


def exact_scores(keys: np.ndarray, queries: np.ndarray, similarity: str = "ip", chunk: int = 256) -> np.ndarray:
    """(Q, N) float32 similarities of every query to every key (the model's exact search ranks by these)."""
    keys, queries = np.asarray(keys, np.float32), np.asarray(queries, np.float32)
    if similarity == "cosine":
        keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    elif similarity != "ip":
        raise ValueError(f"similarity: {similarity!r} is not one of ip, cosine")
    return np.concatenate([queries[s:s + chunk] @ keys.T for s in range(0, len(queries), chunk)])


def recall_against(found: np.ndarray, scores: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Recall of `found` (Q, >= max k) key rows, best first (-1 = none), against exact `scores` (Q, N), per k:
    tie-aware ("recall@k": a hit scores at least the exact k-th best, so facts with equal keys
    (one head and relation) are not misses) and plain id overlap with the exact top-k ("strict@k").
    Hits and the k-th best are read from the same `scores`, so no tolerance has to absorb two
    computations' rounding (queries ~200x a key's norm make scores of ~10^3)."""
    out = {}
    for k in ks:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, k) exact top-k, unordered
        kth = np.take_along_axis(scores, top, 1).min(axis=1)  # (Q,) the exact k-th best score
        got = found[:, :k]
        ok = got >= 0
        got_scores = np.where(ok, np.take_along_axis(scores, np.where(ok, got, 0), 1), -np.inf)
        out[f"recall@{k}"] = float((got_scores >= kth[:, None] - 1e-5).sum() / got.size)
        out[f"strict@{k}"] = float(sum(len(set(g[g >= 0].tolist()) & set(t.tolist())) for g, t in zip(got, top))
                                   / got.size)
    return out


def recalls_of(founds: dict[Any, np.ndarray], keys: np.ndarray, queries: np.ndarray, ks: Sequence[int],
               similarity: str = "ip", chunk: int = 128) -> dict[Any, dict[str, float]]:
    """`recall_against` of each of several searches' `founds` (name -> (Q, >= max k) key rows) over
    `similarity` on `keys`, in query chunks (memory stays at chunk x N); the exact scores of a chunk
    are computed once for all of them."""
    queries = np.asarray(queries, np.float32)
    totals: dict[str, dict[str, float]] = {name: {} for name in founds}
    for s in range(0, len(queries), chunk):
        scores = exact_scores(keys, queries[s:s + chunk], similarity)
        for name, found in founds.items():
            for metric, value in recall_against(found[s:s + chunk], scores, ks).items():
                totals[name][metric] = totals[name].get(metric, 0.0) + value * len(scores)
    return {name: {m: v / len(queries) for m, v in total.items()} for name, total in totals.items()}


def recall_of(found: np.ndarray, keys: np.ndarray, queries: np.ndarray, ks: Sequence[int],
              similarity: str = "ip", chunk: int = 128) -> dict[str, float]:
    """`recalls_of` for one search's `found`."""
    return recalls_of({"found": found}, keys, queries, ks, similarity, chunk)["found"]


def recall_at_k(index: KnowledgeIndex, keys: np.ndarray, queries: np.ndarray, k: int,
                key_ids: np.ndarray | None = None) -> dict:
    """Tie-aware recall@k of `index` against brute force over `keys` (rows = fact ids `key_ids`), with
    the index's similarity (`recall_of`); `strict` is plain set overlap with the exact top-k."""
    key_ids = np.arange(len(keys)) if key_ids is None else np.asarray(key_ids)
    _, got = index.search(queries, k)
    row_of = np.full(int(max(key_ids.max(), got.max())) + 1, -1, np.int64)
    row_of[key_ids] = np.arange(len(key_ids))
    rows = np.where(got >= 0, row_of[np.where(got >= 0, got, 0)], -1)
    r = recall_of(rows, keys, queries, [k], index.similarity)
    return {"recall": r[f"recall@{k}"], "strict_recall": r[f"strict@{k}"]}
