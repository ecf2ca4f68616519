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
No torch here, and pymilvus is imported only when a collection is opened.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kblampp.knowledge_index import IndexMismatchError, _as_f32
from kblampp.store_io import read_json, write_json_atomic

INSERT_CHUNK = 2000  # rows per insert request (keeps one gRPC message small)
QUERY_CHUNK = 1000  # ids per `id in [...]` filter


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
    """Fact keys in one Milvus collection (HNSW, inner product), searched by fact id (see module doc)."""

    method = "milvus"

    def __init__(self, client: Any, similarity: str, params: dict, dim: int,
                 store_id: str | None = None, n: int | None = None):
        self.client, self.similarity, self.params, self.dim = client, similarity, params, dim
        self.collection = params["collection"]
        self.store_id, self.n = store_id, n
        self.folder: Path | None = None  # the index folder last saved to or loaded from

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, keys: np.ndarray, ids: np.ndarray, similarity: str, params: dict,
               store_id: str | None, n: int | None) -> "MilvusIndex":
        """Index `keys` under fact ids `ids` in a fresh collection (an old one of that name is dropped).

        Called by `KnowledgeIndex.build(keys, "milvus", ...)`, which has checked the arguments."""
        client = _connect(str(params["uri"]), "index")
        cls._create_collection(client, params, keys.shape[1])
        self = cls(client, similarity, params, keys.shape[1], store_id, n)
        self.add(keys, ids, check_live=False)
        self.client.flush(self.collection)  # seal the rows into segments, then reload so the HNSW graphs
        self.client.release_collection(self.collection)  # are built now: Milvus Lite otherwise builds them
        self.client.load_collection(self.collection)  # in the background and searches exactly meanwhile
        return self

    @staticmethod
    def _create_collection(client: Any, p: dict, dim: int) -> None:
        from pymilvus import DataType

        if client.has_collection(p["collection"]):
            client.drop_collection(p["collection"])
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("key", DataType.FLOAT_VECTOR, dim=dim)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="key", index_type="HNSW", metric_type="IP",
                               params={"M": int(p["hnsw_m"]), "efConstruction": int(p["ef_construction"])})
        client.create_collection(p["collection"], schema=schema, index_params=index_params,
                                 consistency_level="Strong")

    def _prep(self, x: np.ndarray) -> np.ndarray:
        if self.similarity == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(x, dtype=np.float32)

    # ---- edits -------------------------------------------------------------------------------
    def _live_among(self, ids: np.ndarray) -> np.ndarray:
        """The ids of `ids` that are in the collection now."""
        found: list[int] = []
        for start in range(0, len(ids), QUERY_CHUNK):
            chunk = [int(i) for i in ids[start:start + QUERY_CHUNK]]
            rows = self.client.query(self.collection, filter=f"id in {chunk}", output_fields=["id"])
            found += [int(r["id"]) for r in rows]
        return np.array(sorted(found), dtype=np.int64)

    def add(self, keys: np.ndarray, ids: np.ndarray, check_live: bool = True) -> None:
        """Add keys under fact ids (an id already live must be removed first)."""
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
        for start in range(0, len(ids), INSERT_CHUNK):
            rows = [{"id": int(i), "key": v} for i, v in zip(ids[start:start + INSERT_CHUNK], x[start:start + INSERT_CHUNK])]
            self.client.insert(self.collection, rows)
        if self.n is not None and len(ids):
            self.n = max(self.n, int(ids.max()) + 1)

    def remove(self, ids) -> int:
        """Remove facts by id; returns how many were in the index."""
        gone = self._live_among(np.unique(np.asarray(ids, dtype=np.int64).reshape(-1)))
        if len(gone):
            self.client.delete(self.collection, ids=gone.tolist())
        return len(gone)

    # ---- search ------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    @property
    def n_live(self) -> int:
        return self.ntotal  # deleted facts leave the collection

    def search(self, queries: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores (Q,k) float32, fact ids (Q,k) int64); missing slots have id -1, score -inf."""
        queries = self._prep(_as_f32(queries, self.dim, "queries"))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        search_params = {"metric_type": "IP", "params": {"ef": max(int(self.params["ef_search"]), k)}}
        for start in range(0, len(queries), batch_size):
            hits = self.client.search(self.collection, data=queries[start:start + batch_size], limit=k,
                                      anns_field="key", search_params=search_params, output_fields=["id"])
            for row, found in enumerate(hits, start=start):
                ids[row, :len(found)] = [h["id"] for h in found]
                scores[row, :len(found)] = [h["distance"] for h in found]
        return scores, ids

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
        self.client.flush(self.collection)
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
        dim = next(int(f["params"]["dim"]) for f in fields if f["name"] == "key")
        if dim != meta.get("dim"):
            raise IndexMismatchError(f"{where}: dim: params say {meta.get('dim')}, the collection has {dim}")
        index = cls(client, meta["similarity"], params, dim, meta.get("store_id"), meta.get("n"))
        index.folder = folder
        if index.ntotal != meta.get("ntotal"):
            raise IndexMismatchError(f"{where}: ntotal: params say {meta.get('ntotal')}, "
                                     f"the collection has {index.ntotal}")
        return index

    def close(self) -> None:
        self.client.close()
