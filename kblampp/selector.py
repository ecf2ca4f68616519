"""KBSelector: the plan's fixed formulas, one line each (SPEC section 1, steps 2-3)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Selection(NamedTuple):
    alpha: torch.Tensor  # (B, T, K), sums to 1 over K
    v_tilde: torch.Tensor  # (B, T, d_v)
    cand_ids: torch.Tensor  # (B, T, K), for the evidence chain
    parts: torch.Tensor | None = None  # (B, T, K, 3) sem, phi, g_time (the abstention decision reads them)
    windows: torch.Tensor | None = None  # (B, T, K, 2) candidate windows in days


class KBSelector(nn.Module):
    """s = sem + gamma*phi + eta*g_time; alpha = softmax(s / temperature); V~ = sum_i alpha_i V_i."""

    def __init__(self, gamma: float, eta: float, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"KBSelector: temperature must be > 0, got {temperature}")
        self.gamma, self.eta, self.temperature = float(gamma), float(eta), float(temperature)

    def forward(self, sem: torch.Tensor, phi: torch.Tensor, g_time: torch.Tensor, V: torch.Tensor,
                cand_ids: torch.Tensor, valid: torch.Tensor | None = None) -> Selection:
        """sem, phi, g_time (B, T, K); V (B, T, K, d_v); valid (B, T, K) bool masks missing candidates."""
        s = self.score(sem, phi, g_time, valid)  # (B, T, K)
        alpha = torch.softmax(s / self.temperature, dim=-1)  # (B, T, K)
        v_tilde = torch.einsum("btk,btkd->btd", alpha, V)  # (B, T, d_v)
        return Selection(alpha, v_tilde, cand_ids)

    def score(self, sem: torch.Tensor, phi: torch.Tensor, g_time: torch.Tensor,
              valid: torch.Tensor | None = None) -> torch.Tensor:
        """s (B, T, K) = sem + gamma*phi + eta*g_time, -inf where a candidate is missing."""
        s = sem + self.gamma * phi + self.eta * g_time  # (B, T, K)
        return s if valid is None else s.masked_fill(~valid, float("-inf"))  # a missing candidate gets no weight

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, eta={self.eta}, temperature={self.temperature}"
