"""Stage A, phase 1: contrastive retrieval pre-training on cached inject-layer states.

For each training question, the query at the last prompt token (`kb_linear_q(h) + kb_query_ctx(e_q)`)
is scored against ALL keys with the full fixed formula s = sem + gamma*phi + eta*g_time, and an
InfoNCE loss (softmax of s / temperature, as alpha uses) makes the supporting fact win; an extra
softmax over [answer fact, mined hard negatives] sharpens the hard cases. Keys are recomputed every
step from the raw embeddings through the trainable key MLP (N is thousands: cheap). No LLM forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kblampp.config import KBConfig
from kblampp.data import batch_schedule
from kblampp.injection_wrapper import KBInjection
from kblampp.scorers import kinds_from_windows, time_active
from kblampp.training.facts import FactTable
from kblampp.training.losses import hard_negative_nce, info_nce, positive_mask, topk_hits
from kblampp.training.loop import Phase

QUERY_PARTS = ("kb_linear_q", "kb_query_ctx", "kb_context_scorer", "kb_time_scorer")


@dataclass
class RetrievalData:
    """Cached per-question inputs: hidden[layer] (n, d_model) at the last prompt token, e_q (n, d_ctx),
    tau (n, 2) NaN = no time, answer (n,), supporting (n, S) -1 padded, hard (n, H) -1 padded,
    time_kind (n,) long index into TIME_KINDS (None = read from the window)."""

    hidden: dict[int, torch.Tensor]
    e_q: torch.Tensor
    tau: torch.Tensor
    answer: torch.Tensor
    supporting: torch.Tensor
    qtypes: list[str]
    hard: torch.Tensor
    time_kind: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.e_q.shape[0])

    def concat(self, other: "RetrievalData") -> "RetrievalData":
        """These questions, then `other`'s (same inject layers; -1 padded id lists widened to fit)."""
        if set(self.hidden) != set(other.hidden):
            raise ValueError(f"RetrievalData.concat: layers {sorted(self.hidden)} and {sorted(other.hidden)} differ")
        if (self.time_kind is None) != (other.time_kind is None):
            raise ValueError("RetrievalData.concat: one side has time kinds, the other not")
        kinds = None if self.time_kind is None else torch.cat([self.time_kind, other.time_kind])
        return RetrievalData({k: torch.cat([v, other.hidden[k]]) for k, v in self.hidden.items()},
                             torch.cat([self.e_q, other.e_q]), torch.cat([self.tau, other.tau]),
                             torch.cat([self.answer, other.answer]), _cat_padded(self.supporting, other.supporting),
                             self.qtypes + other.qtypes, _cat_padded(self.hard, other.hard), kinds)

    def to(self, device: torch.device | str) -> "RetrievalData":
        return RetrievalData({k: v.to(device) for k, v in self.hidden.items()}, self.e_q.to(device),
                             self.tau.to(device), self.answer.to(device), self.supporting.to(device), self.qtypes,
                             self.hard.to(device), None if self.time_kind is None else self.time_kind.to(device))


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of a then b, (n_a + n_b, max width), padded with -1."""
    width = max(a.shape[1], b.shape[1])
    out = torch.full((a.shape[0] + b.shape[0], width), -1, dtype=a.dtype, device=a.device)
    out[:a.shape[0], :a.shape[1]] = a
    out[a.shape[0]:, :b.shape[1]] = b.to(a.device)
    return out


def full_scores(kb: KBInjection, h: torch.Tensor, e_q: torch.Tensor, tau: torch.Tensor, keys: torch.Tensor,
                ctx_vec: torch.Tensor, tau_min: torch.Tensor, tau_max: torch.Tensor,
                time_kind: torch.Tensor | None = None, siblings: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sem, s), both (B, N): s = sem + gamma*phi + eta*g_time of each row's query against every fact.

    The model searches candidates by sem alone (the ANN over keys) and weighs them by s, so both count.
    g_time ranks each fact among `siblings` (N, L) (-1 padded; `FactTable.sibling_index`): every fact of
    its (head, relation), which the model's retrieved set holds when the search finds the group.

    phi is the ContextScorer's own formula (normalize(e_q) W normalize(c)) written as one matmul, so
    the (B, N, d_ctx) tensor the candidate-wise scorer would build is never materialised."""
    B, N = h.shape[0], keys.shape[0]
    q = kb.query(h.unsqueeze(1), e_q)  # (B, 1, d_k)
    sem = kb.sem(q, keys).squeeze(1)  # (B, N)
    scorer = kb.kb_context_scorer
    u = F.normalize(e_q.to(scorer.weight.dtype), dim=-1) @ scorer.weight
    phi = u @ F.normalize(ctx_vec.to(scorer.weight.dtype), dim=-1).T  # (B, N)
    kind = kinds_from_windows(tau) if time_kind is None else time_kind.to(tau.device)
    timed = torch.nonzero(time_active(tau, kind)).squeeze(1)  # g_time is exactly 0 for the others
    g = phi.new_zeros(B, N)
    if len(timed):
        lo, hi = tau_min.to(h.device), tau_max.to(h.device)
        f_min, f_max = lo.view(1, 1, N).expand(len(timed), 1, N), hi.view(1, 1, N).expand(len(timed), 1, N)
        g_t = kb.kb_time_scorer(tau[timed], f_min, f_max, time_kind=kind[timed], sibling_index=siblings)
        g = g.index_copy(0, timed, g_t.squeeze(1).to(g.dtype))
    sel = kb.kb_selector
    return sem, sem + sel.gamma * phi + sel.eta * g


@torch.no_grad()
def init_query_from_keys(kb: KBInjection, key_encoder: Any, scale: float) -> None:
    """Start the query where the keys start: kb_query_ctx(e_q) = scale * (the key MLP's linear map of a
    sentence embedding), kb_linear_q(h) = 0. The first retrieval is then the sentence-embedding match of
    the question with each fact's head and relation (zero-shot, so it holds for unseen entities), and
    training refines it instead of starting from a random projection."""
    base = key_encoder.kb_key_mlp.base.weight  # (d_k, 2 d_ctx) = [proj, proj] / 2 at init
    d_ctx = base.shape[1] // 2
    kb.kb_query_ctx.weight.copy_((base[:, :d_ctx] + base[:, d_ctx:]) * scale)
    kb.kb_linear_q.weight.zero_()
    kb.kb_linear_q.bias.zero_()


def query_parameters(kb: KBInjection, prefix: str) -> dict[str, torch.nn.Parameter]:
    """The query/scorer side of one inject layer (not the value path), by holder name."""
    return {f"{prefix}.{n}": p for n, p in kb.named_parameters() if n.split(".")[0] in QUERY_PARTS}


def train_dev_eval(evaluate: Any, train: Any, dev: Any, max_rows: int) -> dict[str, Any]:
    """A phase's eval metrics: {"train": ..., "dev": ...} on the first `max_rows` questions of each."""
    out: dict[str, Any] = {"train": evaluate(train, max_rows)}
    if dev is not None:
        out["dev"] = evaluate(dev, max_rows)
    return out


class RetrievalTrainer:
    """Owns the phase's tensors; `step(micro)` is the Phase step function, `evaluate` the metrics."""

    def __init__(self, cfg: KBConfig, layers: dict[int, KBInjection], table: FactTable, train: RetrievalData,
                 dev: RetrievalData | None = None, key_encoder: Any = None, fixed_keys: torch.Tensor | None = None,
                 rank: int = 0, world: int = 1):
        if key_encoder is None and fixed_keys is None:
            raise ValueError("RetrievalTrainer: give a key encoder (trainable keys) or fixed_keys")
        self.cfg, self.sa = cfg, cfg.stage_a
        self.layers, self.table, self.train, self.dev = layers, table, train, dev
        self.key_encoder, self.fixed_keys, self.rank, self.world = key_encoder, fixed_keys, rank, world
        self.temperature = cfg.temperature
        self.columns: torch.Tensor | None = None  # (N,) bool: facts the training softmax runs over

    def restrict_negatives(self, mask: torch.Tensor | None) -> None:
        """Train the softmax over these facts only. A trainable key MLP would otherwise learn that
        facts no training question ever asks about (a held-out world) are always wrong."""
        if mask is not None:
            need = self.train.answer if self.sa.retrieval_positives == "answer" else self.train.supporting[self.train.supporting >= 0]
            if not bool(mask[need].all()):
                raise ValueError("restrict_negatives: a training positive lies outside the training columns")
        self.columns = mask

    def keys(self) -> torch.Tensor:
        if self.key_encoder is not None:
            return self.key_encoder.encode_keys(self.table.e_h, self.table.e_r)
        return self.fixed_keys

    def scores(self, layer: int, data: RetrievalData, rows: torch.Tensor, keys: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.table
        if getattr(self, "_siblings", None) is None:
            self._siblings = t.sibling_index()
        kind = None if data.time_kind is None else data.time_kind[rows]
        return full_scores(self.layers[layer], data.hidden[layer][rows], data.e_q[rows], data.tau[rows], keys,
                           t.ctx_vec, t.tau_min, t.tau_max, kind, self._siblings)

    def step(self, micro: int) -> tuple[torch.Tensor, dict[str, float], int]:
        rows = torch.tensor(batch_schedule(len(self.train), self.sa.retrieval_batch, micro, self.cfg.seed,
                                           self.rank, self.world), dtype=torch.long, device=self.train.e_q.device)
        keys = self.keys()
        d, n = self.train, self.table.num_facts
        if self.sa.retrieval_positives == "all":
            pos = positive_mask(n, d.supporting[rows])
        elif self.sa.retrieval_positives == "answer":
            pos = positive_mask(n, d.answer[rows].unsqueeze(1))
        else:
            raise ValueError(f"stage_a.retrieval_positives: {self.sa.retrieval_positives!r} is not answer|all")
        total: torch.Tensor | float = 0.0
        hits1 = 0
        for layer in self.layers:
            sem, s = self.scores(layer, d, rows, keys)
            logits, sem_logits = s / self.temperature, sem / self.temperature
            if self.columns is not None:
                logits = logits.masked_fill(~self.columns, float("-inf"))
                sem_logits = sem_logits.masked_fill(~self.columns, float("-inf"))
            loss = info_nce(logits, pos)
            if self.sa.sem_weight > 0:  # the search must put the answer's (head, relation) group in the top-K
                same_hr = self.table.same_head_relation(d.answer[rows])  # (B, N)
                loss = loss + self.sa.sem_weight * info_nce(sem_logits, same_hr | pos)
            if self.sa.hard_negative_weight > 0 and d.hard.shape[1] > 0:
                loss = loss + self.sa.hard_negative_weight * hard_negative_nce(logits, d.answer[rows], d.hard[rows])
            total = total + loss
            hits1 += topk_hits(logits.detach(), d.answer[rows], (1,))[1]
        return total, {"batch_top1": hits1 / (len(rows) * len(self.layers))}, len(rows)

    @torch.no_grad()
    def candidates(self, layer: int, data: RetrievalData, rows: torch.Tensor, keys: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the model does at the last prompt token: top-K_top by sem (exact search), alpha =
        softmax(s / temperature) over them. Returns (cand_ids, alpha, s over all facts), (B, K)."""
        sem, s = self.scores(layer, data, rows, keys)
        k = min(self.cfg.K_top, self.table.num_facts)
        cand = sem.topk(k, dim=1).indices
        alpha = torch.softmax(s.gather(1, cand) / self.temperature, dim=1)
        return cand, alpha, s

    @torch.no_grad()
    def evaluate(self, data: RetrievalData, max_rows: int = 0, chunk: int = 256) -> dict[str, float]:
        """As the model retrieves (first inject layer): recall@K_top of the supporting facts and of the
        answer fact among the sem top-K candidates, top-alpha = answer fact / = a supporting fact;
        plus the answer fact's rank under s over all facts (top1_all). Overall and per question type."""
        n = len(data) if max_rows <= 0 else min(max_rows, len(data))
        keys = self.keys().detach()
        layer = next(iter(self.layers))
        k = min(self.cfg.K_top, self.table.num_facts)
        per_row = []
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(n, start + chunk), device=data.e_q.device)
            cand, alpha, s = self.candidates(layer, data, rows, keys)
            gold, sup = data.answer[rows], data.supporting[rows]
            rank_all = (s > s.gather(1, gold.unsqueeze(1))).sum(dim=1)
            hit = (sup.unsqueeze(-1) == cand.unsqueeze(1)).any(-1) & (sup >= 0)
            recall = hit.sum(dim=1) / (sup >= 0).sum(dim=1).clamp(min=1)
            top = cand.gather(1, alpha.argmax(dim=1, keepdim=True))
            top_is_sup = ((top == sup) & (sup >= 0)).any(dim=1)
            per_row.append(torch.stack([
                (top.squeeze(1) == gold).float(), (cand == gold.unsqueeze(1)).any(1).float(), recall.float(),
                top_is_sup.float(), (rank_all < 1).float()], dim=1))
        table = torch.cat(per_row).cpu() if per_row else torch.zeros(0, 5)
        names = ["top1", f"answer@{k}", f"recall@{k}", "top_alpha_precision", "top1_all"]
        out: dict[str, float] = {}
        for group in ["all"] + sorted(set(data.qtypes[:n])):
            sel = [i for i in range(n) if group == "all" or data.qtypes[i] == group]
            if not sel:
                continue
            tag = "" if group == "all" else f"{group}/"
            out[f"{tag}n"] = len(sel)
            out.update({f"{tag}{name}": v for name, v in zip(names, table[sel].mean(dim=0).tolist())})
        return out

    def eval_fn(self, step: int) -> dict[str, Any]:
        return train_dev_eval(self.evaluate, self.train, self.dev, self.sa.dev_max_questions)

    def phase(self, holder_names: dict[int, str], key_encoder_name: str | None) -> Phase:
        """The Phase: query side of every inject layer (+ the key MLP when the encoder is trainable)."""
        params: dict[str, torch.nn.Parameter] = {}
        for layer, kb in self.layers.items():
            params.update(query_parameters(kb, holder_names[layer]))
        if self.key_encoder is not None and key_encoder_name is not None:
            params.update({f"{key_encoder_name}.kb_key_mlp.{n}": p
                           for n, p in self.key_encoder.kb_key_mlp.named_parameters()})
        return Phase(name="retrieval", params=params, step_fn=self.step, steps=self.sa.retrieval_steps,
                     lr=self.sa.retrieval_lr, grad_accum=1, eval_fn=self.eval_fn,
                     eval_interval=self.sa.retrieval_eval_interval, unit="q")
