"""phi (context match) and g_time (time match) of the selector score s = sem + gamma*phi + eta*g_time.

Both are small, learnable and start from sensible priors: phi starts as the cosine of the question
embedding and the fact's evidence-sentence vector; g_time starts ranking a fact whose window contains
the question time above an overlapping one, and that above a disjoint one (further apart = lower).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

DAYS_PER_YEAR = 365.25
TIME_CLAMP_DAYS = 1.0e6  # +-2700 years around 1970: open ends (+-inf) become finite but far away
TIME_FEATURES = ("overlap", "coverage", "contains", "log_gap_years")


class ContextScorer(nn.Module):
    """phi_ij = normalize(e_q) W normalize(c_i), with W initialised to the identity (= cosine)."""

    def __init__(self, d_ctx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(d_ctx))

    def forward(self, e_q: torch.Tensor | None, ctx_vec: torch.Tensor) -> torch.Tensor:
        """e_q (B, d_ctx) or None; ctx_vec (B, T, K, d_ctx) -> phi (B, T, K); zero without e_q."""
        if e_q is None:
            return ctx_vec.new_zeros(ctx_vec.shape[:-1])
        u = F.normalize(e_q.to(self.weight.dtype), dim=-1) @ self.weight  # (B, d_ctx)
        c = F.normalize(ctx_vec.to(self.weight.dtype), dim=-1)  # (B, T, K, d_ctx)
        return torch.einsum("bd,btkd->btk", u, c)


def time_features(q_tau: torch.Tensor, f_min: torch.Tensor, f_max: torch.Tensor) -> torch.Tensor:
    """Features (B, T, K, 4) of question windows q_tau (B, 2) against fact windows (B, T, K), in days.

    overlap: 1 if the windows intersect; coverage: share of the question window the fact covers;
    contains: 1 if the fact window contains the whole question window; log_gap_years: log1p of the
    gap in years (0 when they intersect). An open end (+-inf) contains everything on its side.
    """
    lim = TIME_CLAMP_DAYS
    q_lo = q_tau[:, 0].float().clamp(-lim, lim)[:, None, None]  # (B, 1, 1)
    q_hi = q_tau[:, 1].float().clamp(-lim, lim)[:, None, None]
    f_lo, f_hi = f_min.float().clamp(-lim, lim), f_max.float().clamp(-lim, lim)  # (B, T, K)
    inter = torch.minimum(q_hi, f_hi) - torch.maximum(q_lo, f_lo)  # < 0: gap between windows
    overlap = (inter >= 0).float()
    coverage = inter.clamp_min(0) / (q_hi - q_lo).clamp_min(1.0)
    contains = ((f_lo <= q_lo) & (f_hi >= q_hi)).float()
    log_gap = torch.log1p((-inter).clamp_min(0) / DAYS_PER_YEAR)
    return torch.stack([overlap, coverage.clamp(0.0, 1.0), contains, log_gap], dim=-1)


class TimeScorer(nn.Module):
    """g_time = w . time_features, w learnable (init: +1, +1, +1, -1); exactly 0 for rows without time."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, 1.0, 1.0, -1.0]))

    def forward(self, q_tau: torch.Tensor | None, f_min: torch.Tensor, f_max: torch.Tensor) -> torch.Tensor:
        """q_tau (B, 2) days or None (NaN rows = no time); f_min, f_max (B, T, K) -> g (B, T, K)."""
        if q_tau is None:
            return f_min.new_zeros(f_min.shape, dtype=self.weight.dtype)
        has_time = ~torch.isnan(q_tau).any(dim=-1)  # (B,)
        q = torch.where(has_time[:, None], q_tau.float(), torch.zeros_like(q_tau, dtype=torch.float32))
        g = time_features(q, f_min, f_max).to(self.weight.dtype) @ self.weight  # (B, T, K)
        return torch.where(has_time[:, None, None], g, torch.zeros_like(g))
