"""The live KB behind the server: an in-memory copy of a `KBValueStore` (+ its faiss index) that
takes edits instantly, and folds logged edits into the store on disk at compaction.

Why a copy: the store's per-edit API rewrites its arrays (O(N) bytes per edit), fine offline, too
slow per request. Here an edit is encoded exactly as the store encodes it (`embed_facts`,
`compute_kv` with the store's own K/V encoder, cast through the store dtype), appended or written into
growable arrays, and its key goes into the index's exact segment (searched by brute force, so an
edited fact is always reachable; see `kblampp.knowledge_index`); the WAL makes it durable.

`persist` (compaction) writes every change since the last one in ONE store commit
(`KBValueStore.apply_changes`: each array written once, from the rows already encoded here) together
with the index and the applied WAL sequence number, so the store is either before or after the whole
batch. The ANN index is rebuilt over the live keys when the exact segment plus dead entries pass
`rebuild_fraction` of the live facts, else saved as it is.

Start-up replays the WAL into memory (all new facts embedded in one batch). Entries at or below the
store's recorded sequence number are skipped, and an `add` whose indices the store already holds
(stores compacted edit by edit by older versions) is skipped; replace and delete are idempotent.
A read-only KB reads the store under the shared commit lock and never writes.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kblampp.kb_store import KBValueStore, compute_kv, embed_facts, fact_times, open_kb
from kblampp.knowledge_index import KnowledgeIndex, apply_search_params
from kblampp.retrieval import FIELDS, IndexedKB
from kblampp.schema import fact_from_dict, fact_key
from kblampp.serving.kb_log import LogEntry
from kblampp.store_io import acquire_writer, commit_lock, release_writer

SEQ_EXTRA = "serving_applied_seq"
_ARRAYS = {"K": "K.npy", "V": "V.npy", "ctx_vec": "meta/ctx_vec.npy", "tau_min": "meta/tau_min.npy",
           "tau_max": "meta/tau_max.npy", "alive": "meta/alive.npy"}


class _Grow:
    """A numpy array with amortised O(1) row appends."""

    def __init__(self, data: np.ndarray):
        self.n = len(data)
        self.buf = np.array(data, copy=True)

    def view(self) -> np.ndarray:
        return self.buf[:self.n]

    def append(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self.buf):
            grown = np.zeros((max(need, 2 * len(self.buf), 16), *self.buf.shape[1:]), self.buf.dtype)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:need] = rows
        self.n = need


def _canonical(fact: dict) -> dict:
    return json.loads(json.dumps(fact, ensure_ascii=False, sort_keys=True))


class StoreLiveKB:
    """In-memory live KB over a store folder; see the module doc."""

    def __init__(self, store_dir: str | Path, embedder: Any, method: str | None = None,
                 extra_builders: dict[str, Callable[[list[dict]], np.ndarray]] | None = None,
                 read_only: bool = False, rebuild_fraction: float = 0.1, index_cfg: Any | None = None):
        self.store_dir, self.embedder, self.method = Path(store_dir), embedder, method
        self.index_cfg = index_cfg  # search-time settings (efSearch, nprobe) applied to every index loaded
        self.extra_builders = dict(extra_builders or {})
        self.read_only, self.rebuild_fraction = read_only, rebuild_fraction
        self.pending: list[LogEntry] = []
        self.changed: dict[int, dict | None] = {}  # index -> encoded rows of its new fact (None: deleted)
        self._writer = False
        if not read_only:
            acquire_writer(self.store_dir)  # before anything is replayed: one writer per store
            self._writer = True
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Drop this KB's hold on the store's writer lock (idempotent)."""
        if self._writer:
            self._writer = False
            release_writer(self.store_dir)

    # ---- loading ------------------------------------------------------------------------------
    def _open_disk(self) -> tuple[KBValueStore, KnowledgeIndex | None]:
        store, index = open_kb(self.store_dir, self.method, embedder=self.embedder, mmap=True, read_only=self.read_only)
        if index is not None and self.index_cfg is not None:
            apply_search_params(index, self.index_cfg)
        store.extra_builders.update(self.extra_builders)
        # in a 1-fact store an old (1,) seq array looks per-fact: give edits rows (the commit rewrites it)
        store.extra_builders.setdefault(SEQ_EXTRA, lambda facts: np.zeros(len(facts), np.int64))
        return store, index

    def _load(self) -> None:
        shared = commit_lock(self.store_dir, exclusive=False) if self.read_only else contextlib.nullcontext()
        with shared:  # a read-only KB must not see a writer's commit half applied
            store, index = self._open_disk()
            self.arrays = {k: _Grow(np.asarray(store.arrays[name])) for k, name in _ARRAYS.items()}
            self.facts: list[dict] = [store.fact(i) for i in range(store.n)]
        self.dtype = store.manifest["dtype"]
        self.encoder = store.encoder.eval()
        self.manifest = store.manifest
        if index is None:  # a store without a saved index: exact search through an in-memory flat one
            alive = np.flatnonzero(self.arrays["alive"].view())
            index = KnowledgeIndex.build(self.arrays["K"].view()[alive].astype(np.float32), "flat", "ip",
                                         ids=alive, n=store.n)
            self.index_kind, self.saved_index = "flat (in memory, exact)", False
        else:
            self.index_kind, self.saved_index = index.method, True
        self.index = index
        self.similarity = index.similarity
        has_seq = SEQ_EXTRA in store.manifest.get("extra", {})
        self.applied_seq = int(np.asarray(store.read_extra(SEQ_EXTRA)).reshape(-1)[0]) if has_seq else 0
        self.disk_n = store.n
        alive = self.arrays["alive"].view()
        self._by_key = {fact_key(f): i for i, f in enumerate(self.facts) if alive[i]}  # duplicate checks
        self.source = IndexedKB(index, self)

    # ---- reading (the engine and the model's KB source) ---------------------------------------
    def num_slots(self) -> int:
        return len(self.facts)

    def num_live(self) -> int:
        return int(self.arrays["alive"].view().sum())

    def get(self, index: int) -> dict | None:
        if not 0 <= index < len(self.facts) or not self.arrays["alive"].view()[index]:
            return None
        return self.facts[index]

    def find(self, fact: dict) -> int | None:
        """The index of a live fact equal to `fact` (same canonical JSON), or None."""
        return self._by_key.get(fact_key(_canonical(fact)))

    def fetch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = torch.as_tensor(ids, dtype=torch.long).reshape(-1).numpy()
        out = {}
        for key in FIELDS:
            rows = self.arrays[key].view()[flat]
            out[key] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).reshape(*ids.shape, *rows.shape[1:])
        return out

    def stats(self) -> dict:
        return {"index_type": self.index_kind, "similarity": self.similarity, "store": str(self.store_dir),
                "embedding_model": self.manifest["embedding_model"], "d_k": self.manifest["d_k"],
                "d_v": self.manifest["d_v"], "pending_changes": len(self.pending), "applied_seq": self.applied_seq,
                "exact_segment": len(self.index.exact_ids), "read_only": self.read_only}

    # ---- edits (in memory) ----------------------------------------------------------------------
    def encode(self, facts: list[dict]) -> dict[str, Any]:
        """Rows for `facts` exactly as the store would write them (store dtype round trip included)."""
        parsed = [fact_from_dict(_canonical(f)) for f in facts]
        raw = embed_facts(self.embedder, parsed, progress=False)
        tau_min, tau_max = fact_times(parsed)
        K, V = compute_kv(self.encoder, raw, tau_min, tau_max, progress=False)
        cast = lambda a: a.astype(self.dtype).astype(np.float32)  # noqa: E731
        return {"K": cast(K), "V": cast(V), "ctx_vec": cast(raw["e_c"]), "tau_min": tau_min, "tau_max": tau_max,
                "alive": np.ones(len(facts), bool), "raw": raw, "facts": [_canonical(f) for f in facts]}

    def _remember(self, ids: list[int], enc: dict, rows: slice) -> None:
        """Keep the encoded rows of edited facts for the next compaction (nothing is embedded twice)."""
        for j, i in zip(range(rows.start, rows.stop), ids):
            self.changed[i] = {"K": enc["K"][j], "V": enc["V"][j], "tau_min": enc["tau_min"][j],
                               "tau_max": enc["tau_max"][j], "raw": {k: v[j] for k, v in enc["raw"].items()}}

    def add(self, facts: list[dict], encoded: dict | None = None, rows: slice | None = None) -> list[int]:
        enc = encoded or self.encode(facts)
        rows = rows or slice(0, len(facts))
        first = len(self.facts)
        ids = list(range(first, first + len(facts)))
        self.index.add(enc["K"][rows], np.array(ids), exact=True)
        for key in _ARRAYS:
            self.arrays[key].append(enc[key][rows].astype(self.arrays[key].buf.dtype))
        self.facts.extend(enc["facts"][rows])
        self._by_key.update({fact_key(f): i for i, f in zip(ids, enc["facts"][rows])})
        self._remember(ids, enc, rows)
        return ids

    def replace(self, index: int, fact: dict, encoded: dict | None = None, row: int = 0) -> None:
        enc = encoded or self.encode([fact])
        self.index.remove([index])
        self.index.add(enc["K"][row:row + 1], np.array([index]), exact=True)
        for key in _ARRAYS:
            self.arrays[key].view()[index] = enc[key][row]
        self._forget(index)
        self.facts[index] = enc["facts"][row]
        self._by_key[fact_key(self.facts[index])] = index
        self._remember([index], enc, slice(row, row + 1))

    def _forget(self, index: int) -> None:
        key = fact_key(self.facts[index])
        if self._by_key.get(key) == index:
            del self._by_key[key]

    def delete(self, index: int) -> None:
        self._forget(index)
        self.index.remove([index])
        for key in ("K", "V", "ctx_vec", "alive"):
            self.arrays[key].view()[index] = 0
        if index < self.disk_n and index not in self.changed:
            self.changed[index] = None  # the stored record stays; only its rows and `alive` change

    def record(self, entry: LogEntry) -> None:
        """Remember a logged change for the next `persist`."""
        self.pending.append(entry)

    # ---- durability (on disk) -------------------------------------------------------------------
    def recover(self, entries: list[LogEntry]) -> int:
        """Start-up: apply the WAL entries the store lacks, in memory (new facts embedded in one
        batch); they become pending changes for the next `persist`. Returns the last seq applied."""
        fresh = [e for e in entries if e.seq > self.applied_seq]
        if fresh and fresh[0].seq != self.applied_seq + 1:
            raise ValueError(f"{self.store_dir}: WAL resumes at seq {fresh[0].seq} but the store has applied up "
                             f"to {self.applied_seq} (a change is missing)")
        todo, n = [], len(self.facts)
        for entry in fresh:
            if entry.op == "add" and entry.index < n:  # already in the store (edit-by-edit compaction)
                if n < entry.index + len(entry.facts):
                    raise ValueError(f"{self.store_dir}: WAL seq {entry.seq} adds {len(entry.facts)} facts at "
                                     f"{entry.index}, the store has {n} facts (half an add?)")
                continue
            if entry.op == "add":
                if entry.index != n:
                    raise ValueError(f"{self.store_dir}: WAL seq {entry.seq} adds at index {entry.index}, the "
                                     f"store has {n} facts (a change is missing)")
                n += len(entry.facts)
            elif not 0 <= entry.index < n:
                raise ValueError(f"{self.store_dir}: WAL seq {entry.seq} {entry.op}s fact {entry.index}, "
                                 f"the store has {n} facts")
            todo.append(entry)
        facts = [f for e in todo for f in e.facts]
        enc = self.encode(facts) if facts else None
        at = 0
        for entry in todo:
            if entry.op == "add":
                self.add(entry.facts, enc, slice(at, at + len(entry.facts)))
            elif entry.op == "replace":
                self.replace(entry.index, entry.facts[0], enc, at)
            else:
                self.delete(entry.index)
            at += len(entry.facts)
            self.record(entry)
        return fresh[-1].seq if fresh else self.applied_seq

    def persist(self, applied_seq: int) -> None:
        """Compaction: make the store on disk hold every change up to `applied_seq` in one commit."""
        if self.read_only:
            raise RuntimeError(f"{self.store_dir}: a read-only KB never writes the store")
        if not self.changed and applied_seq <= self.applied_seq:
            return
        store, _ = self._open_disk()
        order = sorted(self.changed)
        changes = [(i, self.facts[i] if self.changed[i] is not None else None, bool(self.arrays["alive"].view()[i]))
                   for i in order]
        rows = [self.changed[i] for i in order if self.changed[i] is not None]
        encoded = {k: np.stack([r[k] for r in rows]) if rows else None for k in ("K", "V", "tau_min", "tau_max")}
        encoded["raw"] = {k: np.stack([r["raw"][k] for r in rows]) for k in rows[0]["raw"]} if rows else {}
        index = self.index
        if index.needs_rebuild(self.rebuild_fraction):
            alive = np.flatnonzero(self.arrays["alive"].view())
            with contextlib.suppress(ValueError):  # e.g. too few keys left to train IVF-PQ: keep the segment
                index = index.rebuilt(self.arrays["K"].view()[alive], alive)
        store.apply_changes(changes, encoded, index if self.saved_index else None,
                            extras={SEQ_EXTRA: np.array(applied_seq, np.int64)})
        self.index, self.source = index, IndexedKB(index, self)
        self.applied_seq, self.disk_n, self.changed = max(self.applied_seq, applied_seq), len(self.facts), {}
        self.pending = [e for e in self.pending if e.seq > applied_seq]
