"""The Milvus backend of `KnowledgeIndex` (pymilvus; Milvus Lite file or a Milvus server), same API as faiss.

Why: faiss lives in one process; a KB larger than one machine needs a distributed vector store. The
same calls (build, search, add, remove, save/load, writers) work on either backend, chosen by
`index.method: milvus` and `index.uri` (a Milvus Lite path ending in `.db`, or `http://host:19530`).
Fact ids are Milvus primary keys, so edits need no label map and removed facts are really deleted.
The vectors live in Milvus; `index_milvus/` holds `params.json` (uri, collection, similarity,
parameters, dim, the store id + N it was built for, counts), checked on load against the collection.
A Lite path inside the index folder is recorded by its name, so the store folder can move.
Edits reach Milvus at once; the manifest is committed with the store's edit (`writers`), and load
compares its row count with the collection's, so an edit interrupted between the two is detected.
Cosine is inner product on normalised keys (as in faiss), so scores mean the same on both backends.
`milvus_index_type` picks the collection's index: HNSW (default) or IVF_FLAT (the faiss `ivfflat`'s
lists and nprobe; it keeps the exact top-8 at 10^6 trained keys where an HNSW graph loses groups of
equal keys, docs/BENCHMARKS.md).
Inner product (`mips: l2`, the default, as for faiss HNSW): the collection holds each key with
the extra coordinate sqrt(M^2 - |k|^2) and is searched by L2 with unit queries (0 appended), whose
order is the inner product's; scores are the inner products with the stored keys' first coordinates.
A key added later that is longer than M goes to a second, exact (FLAT, IP) collection
`<collection>_exact`, and searches merge both. `mips: ip` (and folders saved before the option) keep
Milvus's native inner-product HNSW, which walks badly for the trained model's queries
(docs/BENCHMARKS.md). No torch here, and pymilvus is imported only when a collection is opened.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kblampp.knowledge_index import (IndexMismatchError, _as_f32, ivf_nlist, l2_form_keys, l2_form_queries,
                                     searches_ip_as_l2)
from kblampp.store_io import read_json, write_json_atomic

INDEX_TYPES = ("HNSW", "IVF_FLAT")  # the main collection's index (the exact one is FLAT)
INSERT_CHUNK = 2000  # rows per insert request (keeps one gRPC message small)
QUERY_CHUNK = 1000  # ids per `id in [...]` filter
# M of the L2 form is the longest key times this: every key keeps a positive extra coordinate (Milvus
# Lite 3.2.2 never returned a vector whose last coordinate was exactly 0: 599 of 600 keys came back).
MIPS_HEADROOM = 1.01


def _is_server(uri: str) -> bool:
    return "://" in uri


def _connect(uri: str, where: str) -> Any:
    """A MilvusClient for `uri`; a bad uri is an error naming the field."""
    if not uri:
        raise ValueError(f"{where}: uri: empty (a Milvus Lite path ending in .db, or http://host:19530)")
    if not _is_server(uri) and not uri.endswith(".db"):
        raise ValueError(f"{where}: uri: {uri!r} is neither a Milvus Lite path ending in .db nor a server URI")
    from pymilvus import MilvusClient

    if not _is_server(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return MilvusClient(uri=uri)


class MilvusIndex:
    """Fact keys in a Milvus collection (HNSW or IVF_FLAT; plus an exact one under `mips: l2`), by fact id
    (see module doc)."""

    method = "milvus"

    def __init__(self, client: Any, similarity: str, params: dict, dim: int,
                 store_id: str | None = None, n: int | None = None):
        self.client, self.similarity, self.params, self.dim = client, similarity, params, dim
        self.collection = params["collection"]
        self.mips_l2 = searches_ip_as_l2(self.method, similarity, params)
        self.exact_collection = f"{self.collection}_exact"  # keys longer than mips_norm (mips_l2 only)
        self.index_type = str(params.get("milvus_index_type", "HNSW"))  # folders saved before the option: HNSW
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"milvus_index_type: {self.index_type!r} is not one of {', '.join(INDEX_TYPES)}")
        self.store_id, self.n = store_id, n
        self.folder: Path | None = None  # the index folder last saved to or loaded from

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, keys: np.ndarray, ids: np.ndarray, similarity: str, params: dict,
               store_id: str | None, n: int | None) -> "MilvusIndex":
        """Index `keys` under fact ids `ids` in a fresh collection (an old one of that name is dropped).

        Called by `KnowledgeIndex.build(keys, "milvus", ...)`, which has checked the arguments."""
        client = _connect(str(params["uri"]), "index")
        if "mips_norm" in params:
            params = dict(params, mips_norm=float(params["mips_norm"]) * MIPS_HEADROOM)
        self = cls(client, similarity, params, keys.shape[1], store_id, n)
        if self.index_type == "IVF_FLAT":
            build = {"nlist": ivf_nlist(self.params, len(keys))}
        else:
            build = {"M": int(params["hnsw_m"]), "efConstruction": int(params["ef_construction"])}
        self._create_collection(self.collection, keys.shape[1] + int(self.mips_l2), self.index_type,
                                "L2" if self.mips_l2 else "IP", build)
        if self.mips_l2:
            self._create_collection(self.exact_collection, keys.shape[1], "FLAT", "IP", {})
        self.add(keys, ids, check_live=False)
        self.client.flush(self.collection)  # seal the rows into segments, then reload so the HNSW graphs
        self.client.release_collection(self.collection)  # are built now: Milvus Lite otherwise builds them
        self.client.load_collection(self.collection)  # in the background and searches exactly meanwhile
        return self

    def _create_collection(self, name: str, dim: int, index_type: str, metric: str, params: dict) -> None:
        from pymilvus import DataType

        if self.client.has_collection(name):
            self.client.drop_collection(name)
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("key", DataType.FLOAT_VECTOR, dim=dim)
        index_params = self.client.prepare_index_params()
        if params and not _is_server(str(self.params["uri"])):
            params = {"params": params}  # Milvus Lite reads build parameters only from a "params" entry
        index_params.add_index(field_name="key", index_type=index_type, metric_type=metric, params=params)
        self.client.create_collection(name, schema=schema, index_params=index_params, consistency_level="Strong")

    @property
    def collections(self) -> tuple[str, ...]:
        return (self.collection, self.exact_collection) if self.mips_l2 else (self.collection,)

    def _prep(self, x: np.ndarray) -> np.ndarray:
        if self.similarity == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(x, dtype=np.float32)

    # ---- edits -------------------------------------------------------------------------------
    def _live_among(self, ids: np.ndarray, collection: str | None = None) -> np.ndarray:
        """The ids of `ids` that are in the index (or in `collection` only) now."""
        found: list[int] = []
        for name in (collection,) if collection else self.collections:
            for start in range(0, len(ids), QUERY_CHUNK):
                chunk = [int(i) for i in ids[start:start + QUERY_CHUNK]]
                rows = self.client.query(name, filter=f"id in {chunk}", output_fields=["id"])
                found += [int(r["id"]) for r in rows]
        return np.array(sorted(found), dtype=np.int64)

    def _insert(self, name: str, ids: np.ndarray, x: np.ndarray) -> None:
        for start in range(0, len(ids), INSERT_CHUNK):
            rows = [{"id": int(i), "key": v} for i, v in zip(ids[start:start + INSERT_CHUNK], x[start:start + INSERT_CHUNK])]
            self.client.insert(name, rows)

    def add(self, keys: np.ndarray, ids: np.ndarray, exact: bool = False, check_live: bool = True) -> None:
        """Add keys under fact ids (an id already live must be removed first). `exact` (store and server
        edits, as for faiss): under `mips: l2` the keys go to the exact collection, so an edit is found
        however the graph would have linked it; native IP collections search unsealed rows exactly."""
        keys = _as_f32(keys, self.dim, "keys")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.shape[0] != keys.shape[0]:
            raise ValueError(f"ids: {ids.shape[0]} ids for {keys.shape[0]} keys")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"ids: fact id {int(uniq[counts > 1][0])} appears twice in one add")
        clash = self._live_among(ids) if check_live else []
        if len(clash):
            raise ValueError(f"ids: fact id {int(clash[0])} is already in the index (remove it first)")
        x = self._prep(keys)
        if self.mips_l2:  # a key longer than M has no L2 form with the same order: the exact collection
            longer = np.linalg.norm(x, axis=1) > float(self.params["mips_norm"])
            longer |= exact
            self._insert(self.exact_collection, ids[longer], x[longer])
            self._insert(self.collection, ids[~longer], l2_form_keys(x[~longer], self.params["mips_norm"]))
        else:
            self._insert(self.collection, ids, x)
        if self.n is not None and len(ids):
            self.n = max(self.n, int(ids.max()) + 1)

    def remove(self, ids) -> int:
        """Remove facts by id; returns how many were in the index."""
        wanted = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
        gone = 0
        for name in self.collections:
            found = self._live_among(wanted, name)
            if len(found):
                self.client.delete(name, ids=found.tolist())
            gone += len(found)
        return gone

    # ---- search ------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return sum(int(self.client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])
                   for name in self.collections)

    @property
    def n_live(self) -> int:
        return self.ntotal  # deleted facts leave the collection

    def search(self, queries: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (Q,k) float32, fact ids (Q,k) int64); missing slots have id -1, score -inf."""
        queries = self._prep(_as_f32(queries, self.dim, "queries"))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if self.index_type == "IVF_FLAT":
            knob = {"nprobe": int(self.params["nprobe"])}
        else:
            knob = {"ef": max(int(self.params["ef_search"]), k)}
        if not self.mips_l2:
            for row, found in self._hits(self.collection, queries, k, batch_size, {"metric_type": "IP", "params": knob}):
                ids[row, :len(found)] = [h["id"] for h in found]
                scores[row, :len(found)] = [h["distance"] for h in found]
            return scores, ids
        unit, _ = l2_form_queries(queries)
        found_ids: list[list[int]] = [[] for _ in queries]
        found_scores: list[list[float]] = [[] for _ in queries]
        for row, found in self._hits(self.collection, unit, k, batch_size, {"metric_type": "L2", "params": knob}, True):
            if found:  # scores: the inner products with the stored keys' own coordinates
                stored = np.asarray([h["entity"]["key"][:self.dim] for h in found], np.float32)
                found_ids[row] += [h["id"] for h in found]
                found_scores[row] += (stored @ queries[row]).tolist()
        for row, found in self._hits(self.exact_collection, queries, k, batch_size, {"metric_type": "IP", "params": {}}):
            found_ids[row] += [h["id"] for h in found]
            found_scores[row] += [h["distance"] for h in found]
        for row, (row_ids, row_scores) in enumerate(zip(found_ids, found_scores)):
            best = np.argsort(-np.asarray(row_scores, np.float64), kind="stable")[:k]
            ids[row, :len(best)] = np.asarray(row_ids, np.int64)[best]
            scores[row, :len(best)] = np.asarray(row_scores, np.float32)[best]
        return scores, ids

    def _hits(self, name: str, data: np.ndarray, k: int, batch_size: int, search_params: dict,
              with_keys: bool = False):
        """(row, hits) of one collection's search, in batches of `batch_size` queries."""
        fields = ["id", "key"] if with_keys else ["id"]
        for start in range(0, len(data), batch_size):
            hits = self.client.search(name, data=data[start:start + batch_size], limit=k, anns_field="key",
                                      search_params=search_params, output_fields=fields)
            yield from enumerate(hits, start=start)

    # ---- persistence -------------------------------------------------------------------------
    def params_json(self, folder: Path | None = None) -> dict:
        params = dict(self.params)
        uri = str(params["uri"])
        if folder is not None and not _is_server(uri) and Path(uri).resolve().parent == Path(folder).resolve():
            params["uri"] = Path(uri).name  # a Lite file inside the index folder moves with it
        import pymilvus

        return {"format": "kblampp-index", "method": self.method, "similarity": self.similarity,
                "dim": self.dim, "params": params, "store_id": self.store_id, "n": self.n,
                "ntotal": self.ntotal, "n_live": self.n_live, "pymilvus_version": pymilvus.__version__,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def writers(self) -> dict[str, Callable[[Path], None]]:
        """File name -> writer, so a store edit commits the manifest with its arrays (Milvus holds the keys)."""
        return {"params.json": lambda p: write_json_atomic(p, self.params_json(self.folder))}

    def save(self, folder: str | Path) -> Path:
        """Flush the collection and write `params.json` atomically (not the folder: a Lite file may live in it)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.collections:
            self.client.flush(name)
        self.folder = folder
        write_json_atomic(folder / "params.json", self.params_json(folder))
        return folder

    @classmethod
    def load(cls, folder: str | Path, expect_n: int | None = None, expect_dim: int | None = None,
             expect_store_id: str | None = None) -> "MilvusIndex":
        """Open the collection `params.json` names and check it; any disagreement is an IndexMismatchError."""
        folder = Path(folder)
        meta = read_json(folder / "params.json", "index params")
        where = f"{folder}/params.json"
        params = dict(meta["params"])
        uri = str(params.get("uri", ""))
        if uri and not _is_server(uri) and not Path(uri).is_absolute():
            params["uri"] = uri = str(folder / uri)
        if expect_store_id is not None and meta.get("store_id") != expect_store_id:
            raise IndexMismatchError(f"{where}: store_id: index was built for store {meta.get('store_id')!r}, "
                                     f"this store is {expect_store_id!r} (rebuild with offline/build_index.py)")
        if expect_n is not None and meta.get("n") != expect_n:
            raise IndexMismatchError(f"{where}: n: index covers {meta.get('n')} facts, the store has {expect_n}")
        if expect_dim is not None and meta.get("dim") != expect_dim:
            raise IndexMismatchError(f"{where}: dim: index dimension {meta.get('dim')}, the store's keys have {expect_dim}")
        if not _is_server(uri) and not Path(uri).exists():
            raise IndexMismatchError(f"{where}: uri: Milvus Lite file {uri} is missing")
        client = _connect(uri, where)
        if not client.has_collection(params["collection"]):
            raise IndexMismatchError(f"{where}: collection: {params['collection']!r} is not in Milvus at {uri}")
        fields = client.describe_collection(params["collection"])["fields"]
        mips_l2 = searches_ip_as_l2(cls.method, meta["similarity"], params)  # older folders: native IP
        dim = next(int(f["params"]["dim"]) for f in fields if f["name"] == "key") - int(mips_l2)
        if dim != meta.get("dim"):
            raise IndexMismatchError(f"{where}: dim: params say {meta.get('dim')}, the collection has {dim}")
        if mips_l2 and not client.has_collection(f"{params['collection']}_exact"):
            raise IndexMismatchError(f"{where}: collection: {params['collection']}_exact (keys longer than "
                                     f"mips_norm) is not in Milvus at {uri}")
        index = cls(client, meta["similarity"], params, dim, meta.get("store_id"), meta.get("n"))
        index.folder = folder
        if index.ntotal != meta.get("ntotal"):
            raise IndexMismatchError(f"{where}: ntotal: params say {meta.get('ntotal')}, "
                                     f"the collection has {index.ntotal}")
        return index

    def close(self) -> None:
        self.client.close()
