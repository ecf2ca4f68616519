"""KB sources for the injected layers: exact top-k on the device, or a faiss KnowledgeIndex + store.

A source answers two calls and does no file I/O:
  search(q (M, d_k), k) -> LongTensor (M, k) candidate fact ids, best first (-1 = none found)
  fetch(ids (...)) -> {"K" (..., d_k), "V" (..., d_v), "ctx_vec" (..., d_ctx), "tau_min" (...), "tau_max" (...)}
and, when the source knows them, "head_id" (...) and "rel_id" (...) long: facts sharing both are
siblings (one (head, relation)), which the time score ranks against each other.
"""
from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

FIELDS = ("K", "V", "ctx_vec", "tau_min", "tau_max")
GROUP_FIELDS = ("head_id", "rel_id")


def group_fields(rows: dict[str, Any]) -> dict[str, torch.Tensor]:
    """head_id / rel_id from a store's fetch (`entity_ids` (..., 2) = [head, tail], `rel_ids`), if there."""
    if "head_id" in rows and "rel_id" in rows:
        return {"head_id": torch.as_tensor(rows["head_id"]), "rel_id": torch.as_tensor(rows["rel_id"])}
    if "entity_ids" in rows and "rel_ids" in rows:
        return {"head_id": torch.as_tensor(rows["entity_ids"])[..., 0], "rel_id": torch.as_tensor(rows["rel_ids"])}
    return {}


@runtime_checkable
class KBSource(Protocol):
    @property
    def num_facts(self) -> int: ...

    def search(self, q: torch.Tensor, k: int) -> torch.Tensor: ...

    def fetch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]: ...


class TensorKB:
    """Every fact array as a tensor on one device; exact top-k by matmul.

    Used in training (K/V may come from a trainable encoder and carry grad: `fetch` keeps it, `search`
    only ranks) and for small stores. `similarity="cosine"` ranks like a cosine faiss index.
    """

    def __init__(self, K: torch.Tensor, V: torch.Tensor, ctx_vec: torch.Tensor, tau_min: torch.Tensor,
                 tau_max: torch.Tensor, similarity: str = "ip", chunk_elems: int = 1 << 24,
                 alive: torch.Tensor | None = None, head_id: torch.Tensor | None = None,
                 rel_id: torch.Tensor | None = None):
        arrays = {"K": K, "V": V, "ctx_vec": ctx_vec, "tau_min": tau_min, "tau_max": tau_max}
        n = K.shape[0] if K.dim() == 2 else -1
        for name, arr in arrays.items():
            want = 1 if name.startswith("tau") else 2
            if not isinstance(arr, torch.Tensor) or arr.dim() != want or arr.shape[0] != n:
                got = tuple(arr.shape) if isinstance(arr, torch.Tensor) else type(arr).__name__
                raise ValueError(f"TensorKB: {name}: expected a {want}-d tensor with N={n} rows, got {got}")
        if n == 0:
            raise ValueError("TensorKB: K: the knowledge base is empty")
        if similarity not in ("ip", "cosine"):
            raise ValueError(f"TensorKB: similarity: {similarity!r} is not one of ip, cosine")
        if alive is not None and (alive.dtype != torch.bool or tuple(alive.shape) != (n,)):
            raise ValueError(f"TensorKB: alive: expected a bool tensor of shape ({n},), got "
                             f"{alive.dtype} {tuple(alive.shape)}")
        self.K, self.V, self.ctx_vec, self.tau_min, self.tau_max = K, V, ctx_vec, tau_min, tau_max
        if (head_id is None) != (rel_id is None):
            raise ValueError("TensorKB: head_id and rel_id: give both or neither")
        for name, arr in (("head_id", head_id), ("rel_id", rel_id)):
            if arr is not None and tuple(arr.shape) != (n,):
                raise ValueError(f"TensorKB: {name}: expected shape ({n},), got {tuple(arr.shape)}")
        self.head_id = None if head_id is None else head_id.long().to(K.device)
        self.rel_id = None if rel_id is None else rel_id.long().to(K.device)
        self.similarity, self.chunk_elems = similarity, chunk_elems
        self.alive = None if alive is None or bool(alive.all()) else alive.to(K.device)

    @classmethod
    def from_store(cls, store: Any, device: str | torch.device = "cpu", similarity: str = "ip") -> "TensorKB":
        """Every row of a value store (`.n`, `.fetch(ids)`), deleted facts (`alive` False) never retrieved."""
        rows = store.fetch(torch.arange(int(store.n)))
        alive = rows.get("alive")
        return cls(**{name: torch.as_tensor(rows[name]).to(device) for name in FIELDS}, similarity=similarity,
                   alive=None if alive is None else torch.as_tensor(alive, dtype=torch.bool), **group_fields(rows))

    @property
    def num_facts(self) -> int:
        return self.K.shape[0]

    @torch.no_grad()
    def search(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """Exact top-k ids (M, k) by inner product (or cosine), chunked to bound the (M, N) matrix."""
        keys = self.K.detach()
        q = q.detach().to(device=keys.device, dtype=keys.dtype)
        if self.similarity == "cosine":
            keys, q = torch.nn.functional.normalize(keys, dim=-1), torch.nn.functional.normalize(q, dim=-1)
        step = max(1, self.chunk_elems // keys.shape[0])
        out = []
        for chunk in q.split(step):
            scores = chunk @ keys.T  # (m, N)
            if self.alive is None:
                out.append(torch.topk(scores, k, dim=-1, sorted=True).indices)
                continue
            top = torch.topk(scores.masked_fill(~self.alive, float("-inf")), k, dim=-1, sorted=True)
            out.append(top.indices.masked_fill(top.values == float("-inf"), -1))  # fewer live facts than k
        return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long, device=keys.device)

    def fetch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows for `ids` of any shape (ids must be >= 0); keeps autograd links to the arrays."""
        ids = ids.to(self.K.device)
        names = FIELDS + (GROUP_FIELDS if self.head_id is not None else ())
        return {name: getattr(self, name)[ids] for name in names}


class IndexedKB:
    """A faiss `KnowledgeIndex` (`.search(np (Q,d) float32, k) -> (scores, ids)`) plus a value store
    whose `.fetch(ids)` returns the FIELDS as tensors (or arrays); results land on the query's device."""

    def __init__(self, index: Any, store: Any):
        for obj, attr, what in ((index, "search", "index"), (store, "fetch", "store")):
            if not callable(getattr(obj, attr, None)):
                raise TypeError(f"IndexedKB: {what} {type(obj).__name__} has no .{attr}()")
        self.index, self.store = index, store

    @property
    def num_facts(self) -> int:
        total = getattr(self.index, "ntotal", None)
        return int(total) if total is not None else len(self.store)

    def search(self, q: torch.Tensor, k: int) -> torch.Tensor:
        queries = np.ascontiguousarray(q.detach().float().cpu().numpy(), dtype=np.float32)
        _, ids = self.index.search(queries, k)
        return torch.as_tensor(np.asarray(ids, dtype=np.int64)).to(q.device)

    def fetch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = self.store.fetch(ids.cpu())
        missing = [name for name in FIELDS if name not in rows]
        if missing:
            raise KeyError(f"IndexedKB: store.fetch() returned no {', '.join(missing)}")
        out = {name: torch.as_tensor(rows[name]).to(ids.device) for name in FIELDS}
        return {**out, **{name: t.to(ids.device) for name, t in group_fields(rows).items()}}


def random_tensor_kb(n: int, d_k: int, d_v: int, d_ctx: int, seed: int = 0,
                     device: str | torch.device = "cpu") -> TensorKB:
    """A random KB of `n` facts (a third open-ended in time) for tests and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.rand(n, generator=gen) * 20000.0  # 1970 .. ~2024 in days
    end = start + torch.rand(n, generator=gen) * 3650.0
    open_end = torch.rand(n, generator=gen) < 1 / 3
    end = torch.where(open_end, torch.full_like(end, math.inf), end)
    tensors = dict(K=torch.randn(n, d_k, generator=gen) / math.sqrt(d_k), V=torch.randn(n, d_v, generator=gen),
                   ctx_vec=torch.randn(n, d_ctx, generator=gen), tau_min=start, tau_max=end)
    return TensorKB(**{name: t.to(device) for name, t in tensors.items()})
