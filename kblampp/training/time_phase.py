"""Stage A, the time part: the time score's per-kind rows, trained on cached inject-layer states.

Siblings (facts sharing a (head, relation)) have identical keys, so sem cannot tell "the CEO before
2011" from the other CEOs of the company: s differs among them only by gamma*phi + eta*g_time. For
every training question with an active time constraint whose answer fact has siblings, a softmax of
s / temperature over those siblings makes the answer fact win (cross-entropy). Only the time scorer
of each inject layer trains; queries, keys and everything else stay as they are.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kblampp.config import KBConfig
from kblampp.data import batch_schedule
from kblampp.injection_wrapper import KBInjection
from kblampp.question_time import TIME_KINDS
from kblampp.scorers import kinds_from_windows, time_active
from kblampp.training.facts import FactTable
from kblampp.training.loop import Phase
from kblampp.training.retrieval_phase import RetrievalData, full_scores


def sibling_rows(data: RetrievalData, siblings: torch.Tensor) -> torch.Tensor:
    """Indices of the questions the phase trains on: an active time constraint and an answer fact
    with at least one sibling."""
    kind = data.time_kind if data.time_kind is not None else kinds_from_windows(data.tau)
    n_sib = (siblings[data.answer] >= 0).sum(dim=1)
    return torch.nonzero(time_active(data.tau, kind) & (n_sib >= 2)).squeeze(1)


class TimeTrainer:
    """`step(micro)` is the Phase step; `evaluate` reports the answer fact's top-1 among its siblings."""

    def __init__(self, cfg: KBConfig, layers: dict[int, KBInjection], table: FactTable, train: RetrievalData,
                 keys: torch.Tensor, dev: RetrievalData | None = None, rank: int = 0, world: int = 1):
        self.cfg, self.sa, self.layers, self.table = cfg, cfg.stage_a, layers, table
        self.train, self.dev, self.keys, self.rank, self.world = train, dev, keys.detach(), rank, world
        self.siblings = table.sibling_index().to(keys.device)  # (N, L)
        self.rows = sibling_rows(train, self.siblings)

    def sibling_logits(self, layer: int, data: RetrievalData, rows: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, L) of s / temperature over each answer's siblings, -inf at padding; target (B,))."""
        t = self.table
        kind = None if data.time_kind is None else data.time_kind[rows]
        _, s = full_scores(self.layers[layer], data.hidden[layer][rows], data.e_q[rows], data.tau[rows], self.keys,
                           t.ctx_vec, t.tau_min, t.tau_max, kind, self.siblings)  # (B, N)
        cols = self.siblings[data.answer[rows]]  # (B, L)
        logits = (s.gather(1, cols.clamp_min(0)) / self.cfg.temperature).masked_fill(cols < 0, float("-inf"))
        target = (cols == data.answer[rows].unsqueeze(1)).float().argmax(dim=1)
        return logits, target

    def step(self, micro: int) -> tuple[torch.Tensor, dict[str, float], int]:
        if len(self.rows) == 0:
            raise ValueError("time phase: no training question has a time constraint and an answer with siblings")
        pick = batch_schedule(len(self.rows), self.sa.time_batch, micro, self.cfg.seed + 11, self.rank, self.world)
        rows = self.rows[torch.tensor(pick, dtype=torch.long, device=self.rows.device)]
        total: torch.Tensor | float = 0.0
        hits = 0
        for layer in self.layers:
            logits, target = self.sibling_logits(layer, self.train, rows)
            total = total + F.cross_entropy(logits.float(), target)
            hits += int((logits.argmax(dim=1) == target).sum())
        return total, {"batch_sibling_top1": hits / (len(rows) * len(self.layers))}, len(rows)

    @torch.no_grad()
    def evaluate(self, data: RetrievalData, chunk: int = 256) -> dict[str, float]:
        """Answer fact = argmax of s among its siblings (first inject layer): overall and per kind."""
        rows_all = sibling_rows(data, self.siblings)
        layer = next(iter(self.layers))
        kind = data.time_kind if data.time_kind is not None else kinds_from_windows(data.tau)
        right = []
        for start in range(0, len(rows_all), chunk):
            rows = rows_all[start:start + chunk]
            logits, target = self.sibling_logits(layer, data, rows)
            right.append(logits.argmax(dim=1) == target)
        hit = torch.cat(right).float().cpu() if right else torch.zeros(0)
        kinds = kind[rows_all].cpu()
        out: dict[str, float] = {"n": len(rows_all), "sibling_top1": float(hit.mean()) if len(hit) else 0.0}
        for k in sorted(set(kinds.tolist())):
            sel = kinds == k
            out[f"{TIME_KINDS[k]}/n"] = int(sel.sum())
            out[f"{TIME_KINDS[k]}/sibling_top1"] = float(hit[sel].mean())
        return out

    def eval_fn(self, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {"train": self.evaluate(self.train)}
        if self.dev is not None:
            out["dev"] = self.evaluate(self.dev)
        return out

    def phase(self, holder_names: dict[int, str]) -> Phase:
        params = {f"{holder_names[layer]}.kb_time_scorer.{n}": p
                  for layer, kb in self.layers.items() for n, p in kb.kb_time_scorer.named_parameters()}
        return Phase(name="time", params=params, step_fn=self.step, steps=self.sa.time_steps, lr=self.sa.time_lr,
                     grad_accum=1, eval_fn=self.eval_fn, eval_interval=self.sa.time_eval_interval, unit="q")
