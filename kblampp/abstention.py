"""Knowing when the KB has no answer: a small learned decision over the model's own signals.

At the last prompt token of the first inject layer (where the answer head reads its pointer) the
model has: the alpha distribution over its K_top candidates, each candidate's score parts
(sem, phi, g_time), the candidates' time windows against the question's, and the copy gate's state.
`abstention_features` turns these into a few numbers; `KBAbstainHead` (registered on the model as
`kb_abstain`, trained in a Stage A phase on cached signals with unanswerable training questions as
positives) maps them to p(unanswerable); the threshold calibrated on dev is a buffer of the head and
a config key (`abstention.threshold`) overrides it. An abstaining row writes `abstain_answer`
("unknown") through `AbstainLogitsProcessor`, in the same generate() call evaluation and serving use.

`near_misses` explains an abstention: the candidate facts with the reason each one does not answer
the question (entity not found, relation missing, window outside the question's time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor

ABSTAIN_FEATURES = ("max_alpha", "alpha_entropy", "top_sem", "top_phi", "top_g_time", "top_score", "score_margin",
                    "max_sem", "sem_spread", "max_phi", "any_time_ok", "top_time_ok", "time_ok_mass",
                    "best_sem_time_ok", "sem_lost_to_time", "has_time", "copy_gate")
REASONS = {"entity_missing": "entity not found in the KB",
           "relation_missing": "the KB has no such relation for this entity",
           "time_outside": "the fact's time window is outside the question's time"}


class AbstainSignals(NamedTuple):
    """The model's own signals at one position per row (K = K_top candidates)."""

    alpha: torch.Tensor  # (B, K)
    cand_ids: torch.Tensor  # (B, K), -1 = no candidate
    parts: torch.Tensor  # (B, K, 3) sem, phi, g_time
    windows: torch.Tensor  # (B, K, 2) candidate windows in days
    tau: torch.Tensor  # (B, 2) question window in days, NaN rows = no time
    copy_gate: torch.Tensor  # (B,) the copy gate at the first answer step (0 without a gate)


def windows_overlap(tau: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: a candidate's window meets the question's window; True where the question has no time."""
    has_time = ~torch.isnan(tau).any(dim=-1, keepdim=True)  # (B, 1)
    lo, hi = tau[:, None, 0].to(windows.dtype), tau[:, None, 1].to(windows.dtype)  # (B, 1)
    meets = (windows[..., 0] <= hi) & (windows[..., 1] >= lo)  # (B, K); open ends are +-inf
    return meets | ~has_time


def abstention_features(s: AbstainSignals, gamma: float, eta: float) -> torch.Tensor:
    """(B, len(ABSTAIN_FEATURES)) float32, in that order. The top candidate is the highest-alpha one."""
    valid = s.cand_ids >= 0  # (B, K)
    alpha = s.alpha.float().masked_fill(~valid, 0.0)
    parts = s.parts.float()
    n_valid = valid.sum(-1).clamp_min(1).float()  # (B,)
    entropy = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1) / n_valid.log().clamp_min(1e-6)  # (B,) in [0, 1]
    top = alpha.argmax(-1, keepdim=True)  # (B, 1)
    top_parts = parts.gather(1, top.unsqueeze(-1).expand(-1, 1, 3)).squeeze(1)  # (B, 3)
    score = parts[..., 0] + gamma * parts[..., 1] + eta * parts[..., 2]  # (B, K) the selector's s
    score = score.masked_fill(~valid, float("-inf"))
    best2 = score.topk(min(2, score.shape[-1]), dim=-1).values  # (B, <=2)
    margin = (best2[:, 0] - best2[:, -1]) if best2.shape[-1] > 1 else torch.zeros_like(best2[:, 0])
    time_ok = windows_overlap(s.tau.float(), s.windows.float()) & valid  # (B, K)
    has_time = (~torch.isnan(s.tau).any(-1)).float()
    sem = parts[..., 0].masked_fill(~valid, float("-inf"))
    sem_mean = (parts[..., 0] * valid).sum(-1) / n_valid  # (B,)
    phi = parts[..., 1].masked_fill(~valid, float("-inf"))
    # the semantically best candidate (the asked head and relation) and how much match the time costs
    best_sem_ok = time_ok.gather(1, sem.argmax(-1, keepdim=True)).squeeze(1).float()
    sem_ok = sem.masked_fill(~time_ok, float("-inf"))
    sem_floor = parts[..., 0].masked_fill(~valid, float("inf")).min(-1).values  # no fitting candidate: the worst
    feats = [alpha.max(-1).values, entropy, top_parts[:, 0], top_parts[:, 1], top_parts[:, 2], best2[:, 0],
             margin.nan_to_num(0.0), sem.max(-1).values, sem.max(-1).values - sem_mean, phi.max(-1).values,
             time_ok.any(-1).float(), time_ok.gather(1, top).squeeze(1).float(), (alpha * time_ok).sum(-1),
             best_sem_ok, sem.max(-1).values - sem_ok.max(-1).values.clamp_min(sem_floor), has_time,
             s.copy_gate.float()]
    return torch.stack(feats, dim=-1).nan_to_num(0.0, posinf=0.0, neginf=0.0)


def signals_from_record(record: Any, tau: torch.Tensor, gate: nn.Module | None, pos: int = -1) -> AbstainSignals:
    """Signals at position `pos` of a LayerRecord (the prefill's last prompt token by default); the
    copy gate is evaluated as the answer head does at its first step (hidden state, max alpha)."""
    if record.parts is None or record.windows is None:
        raise ValueError("the KB record has no score parts / windows (recorded by KBInjection.forward)")
    alpha, hidden = record.alpha[:, pos], record.hidden[:, pos]
    g = torch.zeros(alpha.shape[0], device=alpha.device)
    if gate is not None:
        g = gate(hidden.to(next(gate.parameters()).device), alpha.max(-1).values).to(alpha.device)
    return AbstainSignals(alpha, record.cand_ids[:, pos], record.parts[:, pos], record.windows[:, pos],
                          tau.to(alpha.device), g)


class KBAbstainHead(nn.Module):
    """p(unanswerable) = sigmoid(MLP((features - mean) / std)); mean/std are fitted on the training
    signals, `threshold` is calibrated on dev (both buffers, so the checkpoint carries them)."""

    def __init__(self, hidden: int = 32, n_features: int = len(ABSTAIN_FEATURES)):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("threshold", torch.tensor(0.5))
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def fit_scaling(self, features: torch.Tensor) -> None:
        with torch.no_grad():
            self.mean.copy_(features.mean(0))
            self.std.copy_(features.std(0).clamp_min(1e-4))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.mean.device) - self.mean) / self.std  # (B, F)
        return self.net(x).squeeze(-1)  # (B,)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(features))


def head_from_tensors(tensors: dict[str, torch.Tensor], prefix: str = "kb_abstain.") -> KBAbstainHead | None:
    """A head shaped like the checkpoint's (`prefix`net.0.weight gives the width), or None if absent."""
    w = tensors.get(f"{prefix}net.0.weight")
    return None if w is None else KBAbstainHead(hidden=int(w.shape[0]), n_features=int(w.shape[1]))


@dataclass
class Abstainer:
    """The decision as the generation path uses it: head + copy gate + selector weights + threshold."""

    head: KBAbstainHead
    gate: nn.Module | None
    gamma: float
    eta: float
    threshold: float

    def probability(self, signals: AbstainSignals) -> torch.Tensor:
        return self.head(abstention_features(signals, self.gamma, self.eta))

    def decide(self, signals: AbstainSignals) -> tuple[torch.Tensor, torch.Tensor]:
        """(abstain (B,) bool, p (B,)): abstain where p(unanswerable) >= threshold."""
        p = self.probability(signals)
        return p >= self.threshold, p


def model_abstainer(model: Any, threshold: float | None = None) -> Abstainer | None:
    """The model's decision (None when it has no `kb_abstain`); `threshold` overrides the calibrated one."""
    head = getattr(model, "kb_abstain", None)
    if head is None:
        return None
    sel = model.kb_layers[str(model.inject_layers[0])].kb_selector
    t = float(head.threshold) if threshold is None else float(threshold)
    return Abstainer(head, getattr(model, "kb_copy_gate", None), sel.gamma, sel.eta, t)


class AbstainLogitsProcessor(LogitsProcessor):
    """Rows the decision abstains on write exactly `answer_ids` then `stop_id`; others are untouched.

    Decided once, at the prefill call, from the first inject layer's record (the last prompt token);
    put it after the answer head's processor so it has the last word. `abstained` / `p` hold the
    decision per row afterwards."""

    def __init__(self, abstainer: Abstainer, ctx: Any, layer_idx: int, answer_ids: Sequence[int], stop_id: int):
        if not answer_ids:
            raise ValueError("abstain_answer tokenizes to nothing")
        self.abstainer, self.ctx, self.layer_idx = abstainer, ctx, layer_idx
        self.answer_ids, self.stop_id = list(answer_ids), int(stop_id)
        self.abstained: torch.Tensor | None = None
        self.p: torch.Tensor | None = None
        self._prompt_len = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.abstained is None:  # the prefill call
            records = getattr(self.ctx, "records", {}).get(self.layer_idx)
            if not records:
                raise RuntimeError(f"AbstainLogitsProcessor: no KB records at layer {self.layer_idx}")
            tau = self.ctx.rows(self.ctx.tau, records[-1].alpha.shape[0])
            if tau is None:
                tau = torch.full((records[-1].alpha.shape[0], 2), math.nan)
            abstained, p = self.abstainer.decide(signals_from_record(records[-1], tau, self.abstainer.gate))
            self.abstained, self.p = abstained.cpu(), p.cpu()
            self._prompt_len = input_ids.shape[1]
        rows = self.abstained.repeat_interleave(scores.shape[0] // self.abstained.shape[0]).to(scores.device)
        if not bool(rows.any()):
            return scores
        step = input_ids.shape[1] - self._prompt_len
        token = self.answer_ids[step] if step < len(self.answer_ids) else self.stop_id
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return torch.where(rows.unsqueeze(-1), forced, scores)


def answer_token_ids(tokenizer: Any, abstain_answer: str) -> list[int]:
    """The abstain answer as written right after the assistant header (as tails are)."""
    if not abstain_answer.strip():
        raise ValueError("abstain_answer: empty string")
    return list(tokenizer(abstain_answer, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------- calibration
def prf(abstained: np.ndarray, unanswerable: np.ndarray) -> dict[str, float]:
    """Abstention precision / recall / F1 (positives = unanswerable questions)."""
    tp = float((abstained & unanswerable).sum())
    p = tp / max(float(abstained.sum()), 1.0)
    r = tp / max(float(unanswerable.sum()), 1.0)
    return {"precision": p, "recall": r, "f1": 0.0 if p + r == 0 else 2 * p * r / (p + r)}


def calibrate_threshold(score: np.ndarray, unanswerable: np.ndarray, answer_ok: np.ndarray,
                        max_answerable_loss: float) -> tuple[float, dict[str, float]]:
    """Abstain where score >= t: the t with the best abstention F1 among those that abstain on at most
    `max_answerable_loss` (a share of the answerable questions) of the answerable questions answered
    right (`answer_ok`); ties go to the lower t. No admissible t with abstentions: a t above every score."""
    unanswerable = np.asarray(unanswerable, bool)
    ok = np.asarray(answer_ok, bool) & ~unanswerable
    n_ans = max(int((~unanswerable).sum()), 1)
    never = float(np.max(score)) + 1.0 if len(score) else 1.0
    best_t, best = never, {"precision": 0.0, "recall": 0.0, "f1": -1.0}
    for t in np.unique(np.concatenate([score, [never]])):
        abst = score >= t
        if (abst & ok).sum() / n_ans > max_answerable_loss:
            continue
        m = prf(abst, unanswerable)
        if m["f1"] > best["f1"]:  # unique() is ascending: the first best is the lowest t
            best_t, best = float(t), m
    abst = score >= best_t
    return best_t, {**best, "abstained_answerable_right": float((abst & ok).sum() / n_ans),
                    "abstained_answerable": float((abst & ~unanswerable).sum() / n_ans)}


# ---------------------------------------------------------------------------------------- explanations
def _words(text: str) -> str:
    from kblampp.metrics import normalize_answer

    return f" {normalize_answer(text)} "


def miss_reason(question: str, tau: tuple[float, float] | None, head: str, window_days: tuple[float, float]) -> str:
    """Why a candidate fact does not answer the question: its head is not named in the question
    (entity_missing), else its window misses the question's time (time_outside), else relation_missing."""
    if _words(head).strip() and _words(head) not in _words(question):
        return "entity_missing"
    if tau is not None and not (math.isnan(tau[0]) or math.isnan(tau[1])):
        lo, hi = window_days
        if hi < tau[0] or lo > tau[1]:
            return "time_outside"
    return "relation_missing"


def near_misses(question: str, tau: tuple[float, float] | None, candidates: Sequence[dict],
                limit: int = 5) -> list[dict]:
    """The candidates (evidence dicts with head, relation, tail, time_window [start, end], alpha; highest
    alpha first) with `reason` / `why` added, at most `limit`."""
    from kblampp.timewin import window_days

    out = []
    for cand in list(candidates)[:limit]:
        start, end = cand.get("time_window") or [None, None]
        reason = miss_reason(question, tau, cand["head"], window_days(start, end))
        out.append({**cand, "reason": reason, "why": REASONS[reason]})
    return out


def abstain_reason(misses: Sequence[dict]) -> str:
    """The question's reason: the most specific one among its near misses (a fact about the asked
    entity outside the asked time > the entity present without the relation > the entity absent)."""
    found = {m["reason"] for m in misses}
    for reason in ("time_outside", "relation_missing"):
        if reason in found:
            return reason
    return "entity_missing"
