"""Multi-hop through the inject layers (issue 11): which layer's candidates answer, and how the fused
value of one inject layer reaches the next one's query.

With inject layers l_1 < l_2 < ..., layer l_j's query reads its own normalised state, which carries
beta * kb_linear_v(V~) of every earlier inject layer through the residual stream; so the bridge entity
copied into V~ at hop j reaches the query of hop j+1 (Q = kb_linear_q(h) + kb_query_ctx(e_q), unchanged).
The answer head copies from one layer: `KBHopChoice` picks it from the model's own state at the last
prompt token (the last inject layer's normalised input, which has read every hop, and each hop's
max alpha) — not from the question type.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from kblampp import hf_arch


class KBHopChoice(nn.Module):
    """logits over the inject layers (B, H) = w . [LayerNorm(h_last), max_alpha_1..H] + b.

    Starts by answering from the first hop (bias 2 on it, weights 0): a freshly added choice is the
    one-layer model."""

    def __init__(self, d_model: int, n_hops: int):
        super().__init__()
        if n_hops < 2:
            raise ValueError(f"KBHopChoice needs at least 2 inject layers, got {n_hops}")
        self.n_hops = n_hops
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.proj = nn.Linear(d_model + n_hops, n_hops)
        nn.init.zeros_(self.proj.weight)
        with torch.no_grad():
            self.proj.bias.zero_()
            self.proj.bias[0] = 2.0

    def forward(self, hidden: torch.Tensor, max_alpha: torch.Tensor) -> torch.Tensor:
        """hidden (B, d_model) normalised state of the last inject layer; max_alpha (B, H) -> logits (B, H)."""
        h = self.norm(hidden.to(self.proj.weight.dtype))
        return self.proj(torch.cat([h, max_alpha.to(h.dtype)], dim=-1))


def is_entity_chain(supporting: Sequence[int], qtype: str, head_of: Any, tail_of: Any) -> bool:
    """Whether a question's supporting facts are hops the layers must take in order: a multi-hop
    question, or any other whose facts link tail -> head (a relative question about the organiser of an
    event); succession and "when X was CEO" questions share no entity and answer from the first hop."""
    sup = [int(f) for f in supporting if int(f) >= 0]
    if qtype == "multi-hop":
        return len(sup) > 1
    return len(sup) > 1 and all(tail_of(a) == head_of(b) for a, b in zip(sup, sup[1:]))


def hop_candidates(records: dict[int, list[Any]], layers: Sequence[int], call: int = 0, position: int = -1
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked per hop at one position of one forward call: alpha (B, H, K), cand_ids (B, H, K) and the
    last inject layer's normalised state (B, d_model)."""
    recs = [records[int(layer)][call] for layer in layers]
    alpha = torch.stack([r.alpha[:, position] for r in recs], dim=1)
    cands = torch.stack([r.cand_ids[:, position] for r in recs], dim=1)
    return alpha, cands, recs[-1].hidden[:, position]


def choose_hop(choice: KBHopChoice | None, alpha: torch.Tensor, cands: torch.Tensor, hidden: torch.Tensor,
               forced: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha (B, K), cand_ids (B, K), hop (B,), p_hop (B, H)) of the answering hop per row.

    `forced` answers every row from that hop (0 = the first layer: today's one-layer head); with no
    `choice` module the first hop answers."""
    B, H, _ = alpha.shape
    if forced is not None or choice is None:
        hop = torch.full((B,), 0 if forced is None else int(forced), dtype=torch.long, device=alpha.device)
        p_hop = nn.functional.one_hot(hop, H).to(alpha.dtype)
    else:
        logits = choice(hidden, alpha.max(-1).values)  # (B, H)
        p_hop = torch.softmax(logits.float(), dim=-1)
        hop = p_hop.argmax(-1)  # (B,)
    rows = torch.arange(B, device=alpha.device)
    return alpha[rows, hop], cands[rows, hop], hop, p_hop


def next_inject_input(backbone: nn.Module, layer: int, residual: torch.Tensor, attn_out: torch.Tensor,
                      kb_delta: torch.Tensor) -> torch.Tensor:
    """Residual stream leaving decoder layer `layer` at one position: (residual + attention + KB term)
    through the rest of the layer. Exact for the last prompt token at the first inject layer, whose
    attention reads only states below the injection; training uses it to carry hop j's fused value
    into hop j+1's query without running the model."""
    return hf_arch.after_attention(backbone, layer, residual + attn_out + kb_delta)
