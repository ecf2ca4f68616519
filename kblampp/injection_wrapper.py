"""Knowledge injection by module replacement (peft-tuner style; SPEC section 6).

Each chosen layer's `self_attn` becomes a `KBAttentionWrapper` that keeps the original as `base_layer`,
calls it unchanged with all its arguments and adds `beta * kb_linear_v(V~)` to its output (element 0).
The knowledge branch (`KBInjection`) reads the same normalised hidden state the attention receives:
Q = kb_linear_q(h) + kb_query_ctx(e_q), top-k retrieval, sem/phi/g_time, selector, gated fusion.
All retrieving tokens of all rows go through one search and one fetch; nothing is recorded unless
asked. Which positions retrieve is the request's `retrieval_positions` (every position, or only the
last prompt token, whose candidates the answer head reads); the others get base_layer's output as is.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from kblampp import hf_arch
from kblampp.fusion import KBFusionLayer
from kblampp.kb_context import ContextHolder, KBContext, LayerRecord
from kblampp.scorers import ContextScorer, TimeScorer
from kblampp.selector import KBSelector, Selection


def force_candidates(ids: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: every forced id (B, F; -1 = padding) appears among the candidates (B, T, K),
    replacing the lowest-ranked retrieved ones that are not forced themselves."""
    B, T, K = ids.shape
    f = forced.to(ids.device)[:, None, :].expand(B, T, forced.shape[-1])  # (B, T, F)
    f_ok = f >= 0
    dup = ((ids[..., :, None] == f[..., None, :]) & f_ok[..., None, :]).any(-1)  # (B, T, K) already forced
    rank = -torch.arange(K, device=ids.device, dtype=torch.float32).expand(B, T, K)  # keep retrieval order
    p_ids = rank.masked_fill(dup, float("-inf"))
    p_f = torch.where(f_ok, 1.0, float("-inf"))  # forced first
    pick = torch.topk(torch.cat([p_f, p_ids], -1), K, dim=-1).indices  # (B, T, K)
    return torch.cat([f, ids], -1).gather(-1, pick)


def only_candidates(ids: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Rows with forced ids (B, F; -1 = padding) get exactly those as candidates (the first K, -1
    padded); rows without any keep their retrieved ids (B, T, K)."""
    B, T, K = ids.shape
    f = forced.to(ids.device)[:, :K]
    f = torch.cat([f, f.new_full((B, K - f.shape[1]), -1)], -1) if f.shape[1] < K else f  # (B, K)
    has = (f >= 0).any(-1)[:, None, None]  # (B, 1, 1)
    return torch.where(has, f[:, None, :].expand(B, T, K), ids)


def drop_excluded(ids: torch.Tensor, excluded: torch.Tensor, k: int) -> torch.Tensor:
    """The first k retrieved ids (B, T, k + E) that are not excluded (B, E; -1 = padding), in
    retrieval order; -1 where fewer than k remain."""
    B, T, n = ids.shape
    ex = excluded.to(ids.device)[:, None, None, :]  # (B, 1, 1, E)
    bad = ((ids[..., None] == ex) & (ex >= 0)).any(-1) | (ids < 0)  # (B, T, n)
    order = torch.arange(n, device=ids.device).expand(B, T, n) + bad.long() * n  # kept ones first
    pick = order.argsort(-1)[..., :k]  # (B, T, k)
    return ids.gather(-1, pick).masked_fill(bad.gather(-1, pick), -1)


def join_linked(ids: torch.Tensor, linked: torch.Tensor, excluded: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The searched ids (B, T, P) followed by the linked facts (B, L; -1 = padding) they lack, and
    whether each slot is a linked fact: ((B, T, P + L) ids, (B, T, P + L) bool). A linked fact that is
    excluded (B, E) is left out; a searched one that is linked is marked, not repeated."""
    B, T, _ = ids.shape
    lk = linked.to(ids.device)[:, None, :].expand(B, T, linked.shape[-1])  # (B, T, L)
    ok = lk >= 0
    if excluded is not None:
        ex = excluded.to(ids.device)[:, None, None, :]  # (B, 1, 1, E)
        ok = ok & ~((lk[..., None] == ex) & (ex >= 0)).any(-1)
    same = (lk[..., :, None] == ids[..., None, :]) & ok[..., :, None]  # (B, T, L, P)
    new = ok & ~same.any(-1)  # (B, T, L) linked facts the search did not return
    named = torch.cat([same.any(-2), new], dim=-1)  # (B, T, P + L)
    return torch.cat([ids, lk.masked_fill(~new, -1)], dim=-1), named


def linked_first(named: torch.Tensor | None, rank: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T, k) slots to keep of (B, T, P): the linked ones (`named`) first, then the rest, each part
    by `rank` descending (a stable sort: ties keep their slot order)."""
    by_rank = rank.sort(dim=-1, descending=True, stable=True).indices
    if named is None:
        return by_rank[..., :k]
    first = named.gather(-1, by_rank).to(torch.int8).sort(dim=-1, descending=True, stable=True).indices
    return by_rank.gather(-1, first)[..., :k]


def linked_only(ids: torch.Tensor, valid: torch.Tensor, named: torch.Tensor, pinned: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and valid (B, T, P) with every slot that is not a linked fact (`named`) dropped (-1, invalid)
    in the rows that have a linked fact; rows without one, and `pinned` (B, 1, 1) rows, are unchanged."""
    keep = named | ~named.any(-1, keepdim=True)  # (B, T, P)
    if pinned is not None:
        keep = keep | pinned
    return ids.masked_fill(~keep, -1), valid & keep


def take(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x (B, T, P, ...) at the candidate slots keep (B, T, k): (B, T, k, ...)."""
    index = keep.reshape(*keep.shape, *([1] * (x.dim() - 3))).expand(*keep.shape, *x.shape[3:])
    return x.gather(2, index.to(x.device))


def same_group(rows: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """(B, T, K, K) bool: candidates i, j share a (head, relation) and both exist. From the source's
    head_id / rel_id; a source without them falls back to identical keys (K is a function of the
    head and relation embeddings only, so siblings have equal keys)."""
    if "head_id" in rows and "rel_id" in rows:
        h, r = rows["head_id"].to(valid.device), rows["rel_id"].to(valid.device)  # (B, T, K)
        same = (h.unsqueeze(-1) == h.unsqueeze(-2)) & (r.unsqueeze(-1) == r.unsqueeze(-2))
    else:
        keys = rows["K"].to(valid.device)  # (B, T, K, d_k)
        same = (keys.unsqueeze(-2) == keys.unsqueeze(-3)).all(-1)
    return same & valid.unsqueeze(-1) & valid.unsqueeze(-2)


class KBInjection(nn.Module):
    """Every KB parameter of one inject layer (all attribute names start with `kb_`)."""

    def __init__(self, layer_idx: int, d_model: int, d_k: int, d_v: int, d_ctx: int, k_top: int,
                 gamma: float, eta: float, temperature: float, gate_bias: float = -3.0, k_pool: int | None = None):
        super().__init__()
        if k_pool is not None and k_pool < k_top:
            raise ValueError(f"KBInjection: k_pool ({k_pool}) must be >= k_top ({k_top})")
        self.layer_idx, self.d_k, self.k_top = layer_idx, d_k, k_top
        self.k_pool = k_top if k_pool is None else k_pool  # searched by sem; the k_top best by s are kept
        self.links_names = False  # reads the request's linked facts (KBLaMPP sets it on the first inject layer)
        self.links_only = False  # a row with linked facts keeps only them (`name_link_only`)
        self.kb_linear_q = nn.Linear(d_model, d_k)
        self.kb_query_ctx = nn.Linear(d_ctx, d_k, bias=False)
        self.kb_context_scorer = ContextScorer(d_ctx)
        self.kb_time_scorer = TimeScorer()
        self.kb_selector = KBSelector(gamma, eta, temperature)
        self.kb_fusion = KBFusionLayer(d_model, d_v, gate_bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.kb_linear_q.weight.dtype

    def query(self, h: torch.Tensor, e_q: torch.Tensor | None) -> torch.Tensor:
        """Q (B, T, d_k) = kb_linear_q(h) + kb_query_ctx(e_q); h (B, T, d_model), e_q (B, d_ctx) or None.
        Training calls this on cached hidden states to learn retrieval without running the model."""
        q = self.kb_linear_q(h.to(self.dtype))
        if e_q is None:
            return q
        return q + self.kb_query_ctx(e_q.to(device=q.device, dtype=self.dtype)).unsqueeze(-2)

    def sem(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """sem = <Q, K> / sqrt(d_k) for q (..., d_k) against keys (N, d_k): scores over ALL keys."""
        return q @ keys.to(q.dtype).T / math.sqrt(self.d_k)

    def select(self, h: torch.Tensor, ctx: KBContext) -> tuple[Selection, torch.Tensor]:
        """Retrieve, score and mix for h (B, T, d_model): the selection and the query Q."""
        if ctx.source is None:
            raise ValueError("KBContext.source is None: give the request a TensorKB or IndexedKB")
        B, T, _ = h.shape
        e_q, tau, forced = ctx.rows(ctx.e_q, B), ctx.rows(ctx.tau, B), ctx.rows(ctx.forced_ids, B)
        kind, excluded = ctx.rows(ctx.time_kind, B), ctx.rows(ctx.excluded_ids, B)
        e_q = e_q.to(device=h.device, dtype=self.dtype) if e_q is not None else None  # (B, d_ctx)
        q = self.query(h, e_q)  # (B, T, d_k)
        n_facts = ctx.source.num_facts
        k = min(self.k_top, n_facts)
        pool = min(max(self.k_pool, k), n_facts)
        extra = 0 if excluded is None else min(excluded.shape[1], n_facts - pool)
        ids = ctx.source.search(q.reshape(B * T, -1), pool + extra).view(B, T, pool + extra).to(q.device)
        if excluded is not None:
            ids = drop_excluded(ids, excluded, pool)  # (B, T, pool)
        linked = ctx.rows(ctx.linked_ids, B) if self.links_names else None
        widened = pool > k or linked is not None  # more slots than kept: choose the k kept below
        pinned = None  # with a pool: rows with forced ids keep their first k slots, exactly as without one
        if forced is not None:
            first = only_candidates(ids[..., :k], forced) if ctx.forced_only else force_candidates(ids[..., :k], forced)
            ids = first if pool == k else torch.cat([first, ids[..., k:]], dim=-1)  # (B, T, pool)
            pinned = (forced.to(ids.device) >= 0).any(-1)[:, None, None] if widened else None  # (B, 1, 1)
        named = None
        if linked is not None:  # the facts whose head the question names join the pool, ahead of the rest
            ids, named = join_linked(ids, linked, excluded)  # (B, T, pool + L)
        valid = ids >= 0  # faiss pads with -1 when it finds fewer than asked
        valid[..., 0] = True  # keep the best slot so a position never has no candidate at all
        if pinned is not None:
            valid[..., k:] &= ~pinned
        if named is not None and self.links_only:  # rows that name a head keep the named facts only
            ids, valid = linked_only(ids, valid, named, pinned)
        rows = ctx.source.fetch(ids.clamp_min(0))
        keys = rows["K"].to(device=q.device, dtype=self.dtype)  # (B, T, pool, d_k)
        sem = torch.einsum("btd,btkd->btk", q, keys) / math.sqrt(self.d_k)  # (B, T, pool)
        phi = self.kb_context_scorer(e_q, rows["ctx_vec"].to(q.device))  # (B, T, pool)
        tau_q = tau.to(q.device) if tau is not None else None  # (B, 2) days, NaN rows = no time
        timed = tau is not None or kind is not None  # siblings only matter to a time constraint
        g_time = self.kb_time_scorer(tau_q, rows["tau_min"].to(q.device), rows["tau_max"].to(q.device),
                                     time_kind=kind, same_group=same_group(rows, valid) if timed else None)
        if widened:  # keep k: linked facts first (best sem first), then the best by s (a pool) or in search order
            if pool > k:
                rank = self.kb_selector.score(sem, phi, g_time, valid)  # (B, T, pool + L)
            else:
                order = -torch.arange(ids.shape[-1], device=q.device, dtype=sem.dtype).expand_as(sem)
                rank = torch.where(named, sem, order).masked_fill(~valid, -math.inf)  # (B, T, pool + L)
            keep = linked_first(named, rank, k)  # (B, T, k)
            if pinned is not None:
                keep = torch.where(pinned, torch.arange(k, device=keep.device).expand_as(keep), keep)
            ids, valid, sem, phi, g_time = (take(x, keep) for x in (ids, valid, sem, phi, g_time))
            rows = {name: take(x.to(q.device), keep) for name, x in rows.items()}
        values = rows["V"].to(device=q.device, dtype=self.dtype)  # (B, T, k, d_v)
        sel = self.kb_selector(sem, phi, g_time, values, ids, valid)
        if not ctx.record:  # the score parts and windows are read from records only (evidence, abstention)
            return sel, q
        windows = torch.stack([rows["tau_min"], rows["tau_max"]], dim=-1).to(q.device)  # (B, T, k, 2)
        return sel._replace(parts=torch.stack([sem, phi, g_time.to(sem.dtype)], dim=-1), windows=windows), q

    def forward(self, h: torch.Tensor, ctx: KBContext, span: slice | None = None) -> torch.Tensor:
        """The fused knowledge term beta * kb_linear_v(V~) to add to the attention output: (B, T, d_model),
        or (B, T', d_model) for the positions `span` of h (B, T, d_model) when only those retrieve."""
        x = h.to(self.dtype) if span is None else h[:, span].to(self.dtype)
        sel, q = self.select(x, ctx)
        delta, beta = self.kb_fusion(x, sel.v_tilde)
        if self.layer_idx in ctx.zero_beta_layers:  # ablation: this hop retrieves but fuses nothing
            delta, beta = torch.zeros_like(delta), torch.zeros_like(beta)
        if ctx.capture_query:  # kept with grad for a retrieval loss over all keys
            ctx.queries.setdefault(self.layer_idx, []).append(q)
        if ctx.record:
            if span is None:
                rec = LayerRecord(alpha=sel.alpha.detach(), cand_ids=sel.cand_ids.detach(), beta=beta.detach(),
                                  hidden=h.detach(), parts=sel.parts.detach(), windows=sel.windows.detach())
            else:  # every position of the call, the retrieving ones filled in
                rec = LayerRecord.without_candidates(h, sel.alpha.shape[-1], self.dtype)
                rec.alpha[:, span], rec.cand_ids[:, span], rec.beta[:, span] = sel.alpha, sel.cand_ids, beta
                rec.parts[:, span], rec.windows[:, span] = sel.parts, sel.windows
            ctx.records.setdefault(self.layer_idx, []).append(rec)
        return delta

    def record_without_retrieval(self, h: torch.Tensor, ctx: KBContext) -> None:
        """A call where no position retrieves: its record (when asked) keeps the hidden states only."""
        if ctx.record:
            k = min(self.k_top, ctx.source.num_facts) if ctx.source is not None else self.k_top
            ctx.records.setdefault(self.layer_idx, []).append(LayerRecord.without_candidates(h, k, self.dtype))


class KBAttentionWrapper(nn.Module):
    """Replaces `self_attn`: runs `base_layer` unchanged, then adds the knowledge term to element 0.

    The KB module and the context holder are plain references (not children), so the backbone's own
    parameters are unchanged apart from the `base_layer.` segment, and KBLaMPP owns the KB tensors."""

    def __init__(self, base_layer: nn.Module, kb_module: KBInjection, holder: ContextHolder, layer_idx: int):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "kb_module", kb_module)
        object.__setattr__(self, "holder", holder)
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx = self.holder.ctx
        if ctx is None or ctx.gate_closed or self.layer_idx in ctx.off_layers:  # plain layer: branch skipped
            return self.base_layer(*args, **kwargs)
        h = hf_arch.attention_hidden_states(args, kwargs)
        if ctx.retrieval_positions == "all":
            return hf_arch.add_to_attention_output(self.base_layer(*args, **kwargs), self.kb_module(h, ctx))
        span = ctx.retrieval_span(hf_arch.cached_length(kwargs, self.layer_idx), h.shape[1])  # before the cache grows
        out = self.base_layer(*args, **kwargs)
        if span.start == span.stop:  # no retrieving position in this call (a decode step)
            self.kb_module.record_without_retrieval(h, ctx)
            return out
        return hf_arch.add_to_attention_output(out, self.kb_module(h, ctx, span), span)

    def __getattr__(self, name: str) -> Any:
        """Attributes HF code reads from attention modules (layer_idx, config, ...) come from base_layer."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def patch_layers(backbone: nn.Module, kb_modules: Mapping[int, KBInjection], holder: ContextHolder) -> None:
    """Wrap `self_attn` of every layer in `kb_modules`; an already wrapped layer is an error."""
    for idx, kb in kb_modules.items():
        attn = hf_arch.get_attention(backbone, idx)
        if isinstance(attn, KBAttentionWrapper):
            raise RuntimeError(f"layer {idx} is already patched")
        hf_arch.set_attention(backbone, idx, KBAttentionWrapper(attn, kb, holder, idx))


def unpatch_layers(backbone: nn.Module, layer_indices: list[int]) -> None:
    """Put the original attention modules back (layers that are not wrapped are left alone)."""
    for idx in layer_indices:
        attn = hf_arch.get_attention(backbone, idx)
        if isinstance(attn, KBAttentionWrapper):
            hf_arch.set_attention(backbone, idx, attn.base_layer)


def is_patched(backbone: nn.Module, layer_idx: int) -> bool:
    return isinstance(hf_arch.get_attention(backbone, layer_idx), KBAttentionWrapper)
