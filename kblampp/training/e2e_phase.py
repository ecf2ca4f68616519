"""Stage A, end to end: real retrieval, and the loss the design calls for

    L = CE(answer-head mixture) + w_inj * CE(pure injection path, gate-open LM logits)
        + w_ret * InfoNCE(full score over all keys, at the last prompt token).

The mixture CE trains the copy gate (and, through the LM logits, the injection path); the retrieval
term keeps the query/key side on its contrastive signal, computed from the layer's recorded state at
the last prompt token (the same state the cache holds). Records give alpha detached, so CE alone
never moves retrieval - which is why the retrieval term is there (SPEC section 7).
"""
from __future__ import annotations

from typing import Any

import torch

from kblampp.answer_head import teacher_forced_copy_log_probs
from kblampp.data import QADataset, batch_schedule
from kblampp.training.common import StageModules, answer_tokens
from kblampp.training.losses import answer_ce, info_nce, positive_mask
from kblampp.training.loop import Phase
from kblampp.training.retrieval_phase import full_scores


def mixture_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean -log p of `targets` (B, T; negative = not an answer position) under log_probs (B, T, V)."""
    mask = targets >= 0
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum().clamp(min=1)


def last_prompt_retrieval_loss(mods: StageModules, batch: dict[str, torch.Tensor], ctx: Any,
                               keys: torch.Tensor, positives: str, columns: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of s / temperature over all keys (or the `columns` facts) for each inject layer, at each
    row's last prompt token."""
    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    table = mods.table
    sup = batch["supporting"] if positives == "all" else batch["answer_fact"].unsqueeze(1)
    pos = positive_mask(table.num_facts, sup)
    total: torch.Tensor | float = 0.0
    for layer, kb in mods.layer_modules().items():
        h = ctx.records[layer][0].hidden[rows, batch["last_prompt_pos"]]
        _, s = full_scores(kb, h, batch["e_q"], batch["tau"], keys, table.ctx_vec, table.tau_min, table.tau_max,
                           batch.get("time_kind"), mods.siblings)
        logits = s / mods.cfg.temperature
        if columns is not None:
            logits = logits.masked_fill(~columns, float("-inf"))
        total = total + info_nce(logits, pos)
    return total


def answer_losses(mods: StageModules, batch: dict[str, torch.Tensor], kb: Any,
                  tail_table: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
    """One teacher-forced forward with real retrieval: the answer head's mixture NLL and the pure
    injection CE on the answer tokens, plus the forward's KBContext (records) for further losses."""
    out, ctx = mods.forward(batch, kb, record=True)
    targets = answer_tokens(batch["labels"])
    record = ctx.records[mods.first_layer][0]
    logp = teacher_forced_copy_log_probs(out.logits, record, batch["last_prompt_pos"], targets, tail_table,
                                         mods.model.kb_copy_gate)
    return {"mixture": mixture_nll(logp, targets), "injection": answer_ce(out.logits, batch["labels"])}, ctx


class E2ETrainer:
    def __init__(self, mods: StageModules, train: QADataset, tail_table: torch.Tensor, rank: int = 0, world: int = 1,
                 name: str = "e2e"):
        self.mods, self.train, self.tail_table, self.rank, self.world = mods, train, tail_table, rank, world
        self.cfg, self.name = mods.cfg, name
        self.columns: torch.Tensor | None = None  # the retrieval phase's training columns, if restricted

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """mixture, injection and retrieval losses of one batch (plus the forward's context)."""
        mods, sa = self.mods, self.cfg.stage_a
        kb = mods.tensor_kb(grad=True)
        parts, ctx = answer_losses(mods, batch, kb, self.tail_table)
        parts["retrieval"] = last_prompt_retrieval_loss(mods, batch, ctx, kb.K, sa.retrieval_positives, self.columns)
        return parts

    def step(self, micro: int) -> tuple[torch.Tensor, dict[str, float], int]:
        rows = batch_schedule(len(self.train), self.cfg.batch_size, micro, self.cfg.seed + 3, self.rank, self.world)
        batch = self.mods.batch(self.train, rows)
        parts = self.losses(batch)
        sa = self.cfg.stage_a
        loss = parts["mixture"] + sa.e2e_injection_weight * parts["injection"] + sa.e2e_retrieval_weight * parts["retrieval"]
        return loss, {k: float(v.detach()) for k, v in parts.items()}, int(batch["attention_mask"].sum())

    def phase(self, params: dict[str, torch.nn.Parameter], steps: int, lr: float) -> Phase:
        return Phase(name=self.name, params=params, step_fn=self.step, steps=steps, lr=lr,
                     grad_accum=max(1, self.cfg.grad_accum))
