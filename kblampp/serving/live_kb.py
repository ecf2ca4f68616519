"""The live KB behind the server: an in-memory copy of a `KBValueStore` (+ its faiss index) that
takes edits instantly, and folds logged edits into the store on disk at compaction.

Why a copy: the store commits every edit by rewriting its arrays (O(N) bytes per edit), fine offline,
too slow per request. Here an edit is encoded exactly as the store encodes it (`embed_facts`,
`compute_kv` with the store's own K/V encoder, cast through the store dtype), appended or written into
growable arrays, and applied to the in-memory `KnowledgeIndex`; the WAL makes it durable. `persist`
replays the edits since the last compaction through the store's public edit API (each edit one atomic
commit that also updates the saved index) and records the applied WAL sequence number as a store extra.

Replay is idempotent: entries at or below the recorded sequence number are skipped, and an `add`
whose indices the store already holds (a crash between an edit commit and the sequence record) is
skipped (its indices are already there); replace and delete are idempotent.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kblampp.kb_store import KBValueStore, compute_kv, embed_facts, fact_times, open_kb
from kblampp.knowledge_index import KnowledgeIndex
from kblampp.retrieval import FIELDS, IndexedKB
from kblampp.schema import fact_from_dict
from kblampp.serving.kb_log import LogEntry

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
                 extra_builders: dict[str, Callable[[list[dict]], np.ndarray]] | None = None):
        self.store_dir, self.embedder, self.method = Path(store_dir), embedder, method
        self.extra_builders = dict(extra_builders or {})
        self.pending: list[LogEntry] = []
        self._load()

    # ---- loading ------------------------------------------------------------------------------
    def _open_disk(self) -> tuple[KBValueStore, KnowledgeIndex | None]:
        store, index = open_kb(self.store_dir, self.method, embedder=self.embedder, mmap=True)
        store.extra_builders.update(self.extra_builders)
        # in a 1-fact store the (1,) seq array looks per-fact: give edits rows (a stale value only
        # means more entries are replayed, and replay is idempotent; the next persist rewrites it)
        store.extra_builders.setdefault(SEQ_EXTRA, lambda facts: np.zeros(len(facts), np.int64))
        return store, index

    def _load(self) -> None:
        store, index = self._open_disk()
        self.dtype = store.manifest["dtype"]
        self.encoder = store.encoder.eval()
        self.manifest = store.manifest
        self.arrays = {k: _Grow(np.asarray(store.arrays[name])) for k, name in _ARRAYS.items()}
        self.facts: list[dict] = [store.fact(i) for i in range(store.n)]
        if index is None:  # a store without a saved index: exact search through an in-memory flat one
            alive = np.flatnonzero(self.arrays["alive"].view())
            index = KnowledgeIndex.build(self.arrays["K"].view()[alive].astype(np.float32), "flat", "ip",
                                         ids=alive, n=store.n)
            self.index_kind = "flat (in memory, exact)"
        else:
            self.index_kind = index.method
        self.index = index
        self.similarity = index.similarity
        has_seq = SEQ_EXTRA in store.manifest.get("extra", {})
        self.applied_seq = int(np.asarray(store.read_extra(SEQ_EXTRA))[0]) if has_seq else 0
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
                "d_v": self.manifest["d_v"], "pending_changes": len(self.pending), "applied_seq": self.applied_seq}

    # ---- edits (in memory) ----------------------------------------------------------------------
    def encode(self, facts: list[dict]) -> dict[str, np.ndarray]:
        """Rows for `facts` exactly as the store would write them (store dtype round trip included)."""
        parsed = [fact_from_dict(_canonical(f)) for f in facts]
        raw = embed_facts(self.embedder, parsed, progress=False)
        tau_min, tau_max = fact_times(parsed)
        K, V = compute_kv(self.encoder, raw, tau_min, tau_max, progress=False)
        cast = lambda a: a.astype(self.dtype).astype(np.float32)  # noqa: E731
        return {"K": cast(K), "V": cast(V), "ctx_vec": cast(raw["e_c"]), "tau_min": tau_min, "tau_max": tau_max,
                "alive": np.ones(len(facts), bool), "facts": [_canonical(f) for f in facts]}

    def add(self, facts: list[dict], encoded: dict | None = None) -> list[int]:
        enc = encoded or self.encode(facts)
        first = len(self.facts)
        ids = list(range(first, first + len(facts)))
        self.index.add(enc["K"], np.array(ids))
        for key in _ARRAYS:
            self.arrays[key].append(enc[key].astype(self.arrays[key].buf.dtype))
        self.facts.extend(enc["facts"])
        return ids

    def replace(self, index: int, fact: dict, encoded: dict | None = None) -> None:
        enc = encoded or self.encode([fact])
        self.index.remove([index])
        self.index.add(enc["K"], np.array([index]))
        for key in _ARRAYS:
            self.arrays[key].view()[index] = enc[key][0]
        self.facts[index] = enc["facts"][0]

    def delete(self, index: int) -> None:
        self.index.remove([index])
        for key in ("K", "V", "ctx_vec", "alive"):
            self.arrays[key].view()[index] = 0

    def record(self, entry: LogEntry) -> None:
        """Remember a logged change for the next `persist`."""
        self.pending.append(entry)

    # ---- durability (on disk) -------------------------------------------------------------------
    def apply_to_store(self, entries: list[LogEntry]) -> None:
        """Fold logged changes into the store folder, one atomic store commit per change."""
        if not entries:
            return
        store, index = self._open_disk()
        if entries[0].seq > self.applied_seq + 1:
            raise ValueError(f"{self.store_dir}: WAL starts at seq {entries[0].seq} but the store has applied up "
                             f"to {self.applied_seq} (a change is missing)")
        for entry in entries:
            if entry.seq <= self.applied_seq:
                continue
            if entry.op == "add":
                if store.n > entry.index:  # committed before a crash (later entries may have edited it)
                    if store.n < entry.index + len(entry.facts):
                        raise ValueError(f"{self.store_dir}: WAL seq {entry.seq} adds {len(entry.facts)} facts at "
                                         f"{entry.index}, the store has {store.n} facts (half an add?)")
                    continue
                if store.n != entry.index:
                    raise ValueError(f"{self.store_dir}: WAL seq {entry.seq} adds at index {entry.index}, the "
                                     f"store has {store.n} facts (a change is missing)")
                store.add_facts(entry.facts, index=index)
            elif entry.op == "replace":
                store.replace_fact(entry.index, entry.facts[0], index=index)
            else:
                store.delete_fact(entry.index, index=index)
        store.write_extra(SEQ_EXTRA, np.array([entries[-1].seq], np.int64))

    def recover(self, entries: list[LogEntry]) -> int:
        """Start-up: fold a replayed WAL into the store on disk, reload from it; the last seq applied."""
        fresh = [e for e in entries if e.seq > self.applied_seq]
        if fresh:
            self.apply_to_store(fresh)
            self._load()
        return self.applied_seq

    def persist(self, applied_seq: int) -> None:
        """Make the store on disk hold every change up to `applied_seq`, then reload from it."""
        todo = [e for e in self.pending if e.seq <= applied_seq]
        if todo:
            self.apply_to_store(todo)
            self.applied_seq = max(self.applied_seq, todo[-1].seq)
        self.pending = [e for e in self.pending if e.seq > applied_seq]
