"""Training losses and retrieval metrics (pure tensor functions, no model knowledge).

Conventions: `supporting` is (B, S) fact ids padded with -1; question windows `tau` are (B, 2) with
NaN rows for questions without a time; candidate windows are (B, K) tau_min / tau_max.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE on labelled (answer) positions: logits (B,T,V) predict labels shifted by one."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    gold = labels[:, 1:].reshape(-1)
    if not (gold != IGNORE_INDEX).any():
        raise ValueError("answer_ce: no labelled answer tokens in the batch")
    return F.cross_entropy(pred, gold, ignore_index=IGNORE_INDEX)


def nll_from_log_probs(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of labelled positions from (B,T,V) next-token log-probs (the answer head's mixture)."""
    gold = labels[:, 1:]
    mask = gold != IGNORE_INDEX
    picked = log_probs[:, :-1].gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum().clamp(min=1)


def positive_mask(num_facts: int, supporting: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: True at each row's supporting fact ids (padding -1 ignored)."""
    mask = torch.zeros(supporting.shape[0], num_facts + 1, dtype=torch.bool, device=supporting.device)
    ids = torch.where(supporting >= 0, supporting, torch.full_like(supporting, num_facts))
    mask.scatter_(1, ids, True)
    return mask[:, :num_facts]


def info_nce(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Multi-positive InfoNCE over all columns: -log(sum_pos exp(s) / sum_all exp(s)), mean over rows.

    scores (B, N) already include the temperature; positives (B, N) bool with >= 1 True per row."""
    if not positives.any(dim=1).all():
        raise ValueError("info_nce: a row has no positive")
    scores = scores.float()
    pos = scores.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
    return (scores.logsumexp(dim=1) - pos).mean()


def hard_negative_nce(scores: torch.Tensor, pos_ids: torch.Tensor, neg_ids: torch.Tensor) -> torch.Tensor:
    """InfoNCE restricted to [positive, hard negatives] (neg_ids (B, H), -1 padded): sharper gradient."""
    cols = torch.cat([pos_ids.unsqueeze(1), neg_ids.clamp(min=0)], dim=1)
    picked = scores.gather(1, cols).float()
    valid = torch.cat([torch.ones_like(pos_ids.unsqueeze(1), dtype=torch.bool), neg_ids >= 0], dim=1)
    picked = picked.masked_fill(~valid, float("-inf"))
    return (picked.logsumexp(dim=1) - picked[:, 0]).mean()


def alpha_support_loss(alpha: torch.Tensor, cand_ids: torch.Tensor, supporting: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, int]:
    """-log(alpha mass on supporting candidates), over rows where one is among the candidates.

    alpha, cand_ids (B, K); returns (loss, number of rows used); 0 with no grad path when none."""
    hit = (cand_ids.unsqueeze(-1) == supporting.unsqueeze(1)) & (supporting.unsqueeze(1) >= 0)
    on_support = hit.any(-1) & (cand_ids >= 0)
    rows = on_support.any(dim=1)
    if not rows.any():
        return alpha.sum() * 0.0, 0
    mass = (alpha * on_support).sum(dim=1)[rows]
    return -(mass + eps).log().mean(), int(rows.sum())


def window_mismatch(cand_min: torch.Tensor, cand_max: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: candidate window disjoint from the row's question window (False without a time)."""
    q_min, q_max = tau[:, :1], tau[:, 1:]
    timed = ~torch.isnan(tau).any(dim=1, keepdim=True)
    return timed & ((cand_max < q_min) | (cand_min > q_max))


def time_penalty(alpha: torch.Tensor, cand_min: torch.Tensor, cand_max: torch.Tensor, tau: torch.Tensor,
                 cand_ids: torch.Tensor | None = None, supporting: torch.Tensor | None = None) -> torch.Tensor:
    """Mean alpha mass given to time-mismatched candidates, over rows that have a question time.

    With cand_ids and supporting given, supporting facts are never penalised (a chain may need one)."""
    timed = ~torch.isnan(tau).any(dim=1)
    if not timed.any():
        return alpha.sum() * 0.0
    bad = window_mismatch(cand_min, cand_max, tau)
    if cand_ids is not None and supporting is not None:
        is_sup = ((cand_ids.unsqueeze(-1) == supporting.unsqueeze(1)) & (supporting.unsqueeze(1) >= 0)).any(-1)
        bad = bad & ~is_sup
    return (alpha * bad).sum(dim=1)[timed].mean()


@torch.no_grad()
def topk_hits(scores: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 8)) -> dict[int, int]:
    """How many rows have `target` (B,) within their top-k scores, for each k."""
    out = {}
    gold = scores.gather(1, target.unsqueeze(1))
    rank = (scores > gold).sum(dim=1)  # 0 = best; ties count in the target's favour
    for k in ks:
        out[k] = int((rank < k).sum())
    return out


@torch.no_grad()
def recall_at_k(scores: torch.Tensor, supporting: torch.Tensor, k: int) -> float:
    """Sum over rows of the fraction of supporting facts within the top-k (divide by rows for the mean)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    hit = (supporting.unsqueeze(-1) == top.unsqueeze(1)).any(-1) & (supporting >= 0)
    count = (supporting >= 0).sum(dim=1).clamp(min=1)
    return float((hit.sum(dim=1) / count).sum())
