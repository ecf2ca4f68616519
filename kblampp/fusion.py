"""KBFusionLayer: the knowledge branch and its per-token gate, fused as Y = text_out + beta * kb_out.

kb_linear_v starts at zero and the gate bias at -3, so a freshly patched model is the base model
(kb_out = 0) while every KB parameter still receives gradient once kb_linear_v moves.
"""
from __future__ import annotations

import torch
from torch import nn


class KBFusionLayer(nn.Module):
    def __init__(self, d_model: int, d_v: int, gate_bias: float = -3.0):
        super().__init__()
        self.kb_linear_v = nn.Linear(d_v, d_model)  # V~ (d_v) -> d_model
        self.kb_gate = nn.Linear(d_model, 1)  # beta_j = sigmoid(kb_gate(h_j))
        nn.init.zeros_(self.kb_linear_v.weight)
        nn.init.zeros_(self.kb_linear_v.bias)
        nn.init.normal_(self.kb_gate.weight, std=0.02)
        nn.init.constant_(self.kb_gate.bias, gate_bias)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """beta (B, T) in (0, 1) from the normalised hidden state h (B, T, d_model)."""
        return torch.sigmoid(self.kb_gate(h)).squeeze(-1)

    def forward(self, h: torch.Tensor, v_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The term to add to the text-attention output, beta * kb_linear_v(V~) (B, T, d_model), and beta."""
        beta = self.gate(h)  # (B, T)
        kb_out = self.kb_linear_v(v_tilde)  # (B, T, d_model)
        return beta.unsqueeze(-1) * kb_out, beta

    @staticmethod
    def fuse(text_out: torch.Tensor, beta: torch.Tensor, kb_out: torch.Tensor) -> torch.Tensor:
        """Y = text_out + beta * kb_out (the wrapper adds the first return of forward() instead)."""
        return text_out + beta.unsqueeze(-1) * kb_out
