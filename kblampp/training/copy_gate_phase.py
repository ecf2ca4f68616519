"""Stage A, copy-gate phase: train the answer head's gate on cached quantities.

Right after the retrieval phase the injection adds exactly zero (kb_linear_v starts at zero), so
the patched model's LM distribution is the plain backbone's. For a few hundred training questions we
cache, once: the inject layer's state at each teacher-forced answer position (the gate's input),
the plain LM's log-prob of each gold answer token, and from the trained retrieval (alpha and
candidates at the last prompt token) the pointer's probability of the gold token and its mass.
The gate then trains on p(gold) = (1 - g*mass) p_lm(gold) + g p_copy(gold) - the answer head's
mixture at the gold token - with no LLM forward per step.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from kblampp.progress import progress_bar

from kblampp import hf_arch
from kblampp.answer_head import MAX_GATE_MASS, candidate_tails, pointer_at_steps
from kblampp.data import QADataset, batch_schedule
from kblampp.training.cache import PrefixCache, common_prefix_len
from kblampp.training.loop import Phase


@torch.inference_mode()
def answer_position_cache(backbone: torch.nn.Module, dataset: QADataset, rows: Sequence[int], layer: int,
                          batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """Plain-backbone pass over prompt + answer of each row: {"hidden" (n, P, d_model) inject-layer
    state at the positions that predict answer tokens, "lm_logp" (n, P) log-prob of the gold token
    there, "gold" (n, P) the gold tokens (-1 = padding)}. P = the longest answer in `rows`."""
    attn = hf_arch.get_attention(backbone, layer)
    grabbed: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(
        lambda _m, args, kwargs: grabbed.append(hf_arch.attention_hidden_states(args, kwargs)), with_kwargs=True)
    exs = [dataset[i] for i in rows]
    P = max(len(ex.input_ids) - ex.prompt_len for ex in exs)
    d_model = hf_arch.hidden_size(backbone)
    hidden = torch.zeros(len(exs), P, d_model)
    lm_logp = torch.zeros(len(exs), P)
    gold = torch.full((len(exs), P), -1, dtype=torch.long)
    device = next(backbone.parameters()).device
    plen = common_prefix_len([ex.input_ids[:ex.prompt_len] for ex in exs])
    handle.remove()  # the shared prefix runs without the hook
    prefix = PrefixCache(backbone, exs[0].input_ids[:plen])
    handle = attn.register_forward_pre_hook(
        lambda _m, args, kwargs: grabbed.append(hf_arch.attention_hidden_states(args, kwargs)), with_kwargs=True)
    try:
        for start in progress_bar(range(0, len(exs), batch_size), desc="cache answer positions", disable=not progress):
            chunk = list(rows[start:start + batch_size])
            batch = dataset.batch(chunk)
            grabbed.clear()
            out = prefix.run(backbone, batch["input_ids"][:, plen:].to(device),
                             batch["attention_mask"][:, plen:].to(device))
            logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
            h = grabbed[0].float().cpu()
            for b in range(len(chunk)):
                ex = exs[start + b]
                pos = torch.arange(ex.prompt_len - 1, len(ex.input_ids) - 1) - plen
                tok = torch.tensor(ex.input_ids[ex.prompt_len:])
                pos = pos.to(torch.long)
                n = len(pos)
                hidden[start + b, :n] = h[b, pos]
                lm_logp[start + b, :n] = logp[b, pos, tok]
                gold[start + b, :n] = tok
    finally:
        handle.remove()
    return {"hidden": hidden, "lm_logp": lm_logp, "gold": gold}


@torch.no_grad()
def pointer_at_gold(tail_table: torch.Tensor, cand_ids: torch.Tensor, alpha: torch.Tensor, gold: torch.Tensor,
                    vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_copy of the gold token, pointer mass), both (n, P), with the answer head's own pointer."""
    steps = torch.where(gold >= 0, torch.arange(gold.shape[1], device=gold.device).expand_as(gold),
                        torch.full_like(gold, -1))
    p_gold, masses = [], []
    for s in range(0, gold.shape[0], 64):
        e = slice(s, s + 64)
        tails = candidate_tails(tail_table, cand_ids[e])
        p_copy, mass = pointer_at_steps(tails, alpha[e], gold[e].clamp(min=0), steps[e], vocab)
        p_gold.append(p_copy.gather(-1, gold[e].clamp(min=0).unsqueeze(-1)).squeeze(-1) * (gold[e] >= 0))
        masses.append(mass * (gold[e] >= 0))
    return torch.cat(p_gold), torch.cat(masses)


def mixture_gold_nll(g: torch.Tensor, mass: torch.Tensor, lm_logp: torch.Tensor, p_copy: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
    """Mean -log[(1 - g*mass) p_lm + g p_copy] at the gold token (the answer head's mixture)."""
    gm = (g * mass).clamp(0.0, MAX_GATE_MASS)
    p = (1.0 - gm) * lm_logp.exp() + g * p_copy
    nll = -torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))
    return (nll * valid).sum() / valid.sum().clamp(min=1)


class CopyGateTrainer:
    """Step function over cached (hidden, lm_logp, p_copy, mass, max_alpha) rows."""

    def __init__(self, cfg: Any, gate: torch.nn.Module, cache: dict[str, torch.Tensor], cand_ids: torch.Tensor,
                 alpha: torch.Tensor, tail_table: torch.Tensor, vocab: int, rank: int = 0, world: int = 1):
        self.cfg, self.gate, self.rank, self.world = cfg, gate, rank, world
        device = gate.proj.weight.device
        cache = {k: v.to(device) for k, v in cache.items()}
        cand_ids, alpha, tail_table = cand_ids.to(device), alpha.to(device), tail_table.to(device)
        self.hidden, self.lm_logp, gold = cache["hidden"], cache["lm_logp"], cache["gold"]
        self.valid = (gold >= 0).float()
        self.p_copy, self.mass = pointer_at_gold(tail_table, cand_ids, alpha, gold, vocab)
        self.max_alpha = alpha.max(dim=1).values

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        g = self.gate(self.hidden[rows], self.max_alpha[rows].unsqueeze(1))
        return mixture_gold_nll(g, self.mass[rows], self.lm_logp[rows], self.p_copy[rows], self.valid[rows])

    def step(self, micro: int) -> tuple[torch.Tensor, dict[str, float], int]:
        n = self.hidden.shape[0]
        rows = torch.tensor(batch_schedule(n, min(64, n), micro, self.cfg.seed + 2, self.rank, self.world),
                            device=self.hidden.device)
        return self.loss(rows), {}, len(rows)

    @torch.no_grad()
    def evaluate(self, step: int = 0) -> dict[str, float]:
        """Mixture NLL with the gate as is, against the plain LM (g = 0) and always-copy (g = 1)."""
        rows = torch.arange(self.hidden.shape[0], device=self.hidden.device)
        ones = torch.ones_like(self.mass[rows])
        return {"nll_gate": float(self.loss(rows)),
                "nll_lm_only": float(mixture_gold_nll(0 * ones, self.mass, self.lm_logp, self.p_copy, self.valid)),
                "nll_copy_always": float(mixture_gold_nll(ones, self.mass, self.lm_logp, self.p_copy, self.valid)),
                "copy_available": float((self.p_copy[:, 0] > 0).float().mean())}

    def phase(self, params: dict[str, torch.nn.Parameter]) -> Phase:
        sa = self.cfg.stage_a
        return Phase(name="copy_gate", params=params, step_fn=self.step, steps=sa.copy_gate_steps,
                     lr=sa.copy_gate_lr, eval_fn=self.evaluate, unit="q")
