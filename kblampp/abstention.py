"""Knowing when the KB has no answer: a small learned decision over the model's own signals.

At the last prompt token of an inject layer (where the answer head reads its pointer) the model has:
the alpha distribution over its K_top candidates, each candidate's score parts (sem, phi, g_time), the
candidates' time windows against the question's, the candidates' own fact fields (head and relation
ids: do they agree, does the asked entity's fact group hold a window that fits), the fusion gate beta,
the copy gate, the state the branch read, and whether each candidate's head is named in the question
(`head_named`: asked about an entity the KB lacks, the nearest facts are about other entities).
`abstention_features` turns one layer's signals into
`ABSTAIN_FEATURES` (several layers: their features side by side); `KBAbstainHead` (registered on the
model as `kb_abstain`, trained in a Stage A phase on cached signals with unanswerable training
questions as positives) maps them, plus an optional low-dimensional projection of the state, to
p(unanswerable); the threshold calibrated on dev is a buffer of the head and a config key
(`abstention.threshold`) overrides it. An abstaining row writes `abstain_answer` ("unknown") through
`AbstainLogitsProcessor`, in the same generate() call evaluation and serving use.

`near_misses` explains an abstention: the candidate facts with the reason each one does not answer
the question (entity not found, relation missing, window outside the question's time).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor

from kblampp.name_link import names_head, words

ABSTAIN_FEATURES = ("max_alpha", "alpha_entropy", "second_alpha", "top_sem", "top_phi", "top_g_time", "top_score",
                    "score_margin", "max_sem", "sem_gap", "sem_spread", "sem_lost", "max_phi", "phi_lost",
                    "any_time_ok", "top_time_ok", "time_ok_mass", "best_sem_time_ok", "best_sem_group_time_ok",
                    "top_group_time_ok", "sem_lost_to_time", "best_sem_g_time", "min_g_time", "has_time",
                    "group_mass", "head_mass", "n_heads", "n_relations", "beta", "copy_gate",
                    "top_head_named", "any_head_named", "named_mass")
REASONS = {"entity_missing": "entity not found in the KB",
           "relation_missing": "the KB has no such relation for this entity",
           "time_outside": "the fact's time window is outside the question's time"}


class AbstainSignals(NamedTuple):
    """The model's own signals at one position per row of one inject layer (K = K_top candidates)."""

    alpha: torch.Tensor  # (B, K)
    cand_ids: torch.Tensor  # (B, K), -1 = no candidate
    parts: torch.Tensor  # (B, K, 3) sem, phi, g_time
    windows: torch.Tensor  # (B, K, 2) candidate windows in days
    tau: torch.Tensor  # (B, 2) question window in days, NaN rows = no time
    copy_gate: torch.Tensor  # (B,) the copy gate at the first answer step (0 without a gate)
    beta: torch.Tensor | None = None  # (B,) fusion gate (None = 0)
    head_ids: torch.Tensor | None = None  # (B, K) the candidates' head entity ids (None: each its own)
    rel_ids: torch.Tensor | None = None  # (B, K) the candidates' relation ids
    hidden: torch.Tensor | None = None  # (B, d_model) the state the branch read
    head_named: torch.Tensor | None = None  # (B, K) bool: the candidate's head is named in the question


def windows_overlap(tau: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: a candidate's window meets the question's window; True where the question has no time."""
    has_time = ~torch.isnan(tau).any(dim=-1, keepdim=True)  # (B, 1)
    lo, hi = tau[:, None, 0].to(windows.dtype), tau[:, None, 1].to(windows.dtype)  # (B, 1)
    meets = (windows[..., 0] <= hi) & (windows[..., 1] >= lo)  # (B, K); open ends are +-inf
    return meets | ~has_time


def _pick(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, K) at idx (B,) -> (B,)."""
    return x.gather(1, idx.unsqueeze(1)).squeeze(1)


def _layer_features(s: AbstainSignals, gamma: float, eta: float) -> torch.Tensor:
    """(B, len(ABSTAIN_FEATURES)) for one layer. The top candidate is the highest-alpha one; the
    best-sem one stands for the asked head and relation; a group = candidates sharing head and relation."""
    valid = s.cand_ids >= 0  # (B, K)
    alpha = s.alpha.float().masked_fill(~valid, 0.0)
    parts = s.parts.float()
    n_valid = valid.sum(-1).clamp_min(1).float()  # (B,)
    entropy = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1) / n_valid.log().clamp_min(1e-6)  # (B,) in [0, 1]
    top = alpha.argmax(-1)  # (B,)
    second = alpha.topk(min(2, alpha.shape[-1]), dim=-1).values[:, -1]  # (B,)
    sem_raw, phi_raw, g = parts[..., 0], parts[..., 1], parts[..., 2]  # (B, K) each
    score = (sem_raw + gamma * phi_raw + eta * g).masked_fill(~valid, float("-inf"))  # (B, K) the selector's s
    best2 = score.topk(min(2, score.shape[-1]), dim=-1).values  # (B, <=2)
    margin = best2[:, 0] - best2[:, -1]
    sem = sem_raw.masked_fill(~valid, float("-inf"))
    sem2 = sem.topk(min(2, sem.shape[-1]), dim=-1).values  # (B, <=2)
    sem_mean = (sem_raw * valid).sum(-1) / n_valid  # (B,)
    phi = phi_raw.masked_fill(~valid, float("-inf"))
    time_ok = windows_overlap(s.tau.float(), s.windows.float()) & valid  # (B, K)
    has_time = (~torch.isnan(s.tau).any(-1)).float()
    best = sem.argmax(-1)  # (B,) the asked head and relation, as the model reads them
    heads = s.cand_ids if s.head_ids is None else s.head_ids.to(s.cand_ids.device)
    rels = s.cand_ids if s.rel_ids is None else s.rel_ids.to(s.cand_ids.device)
    same_head_top = heads == _pick(heads, top).unsqueeze(1)  # (B, K)
    group_top = same_head_top & (rels == _pick(rels, top).unsqueeze(1)) & valid
    group_best = (heads == _pick(heads, best).unsqueeze(1)) & (rels == _pick(rels, best).unsqueeze(1)) & valid
    sem_ok = sem.masked_fill(~time_ok, float("-inf"))
    sem_floor = sem_raw.masked_fill(~valid, float("inf")).min(-1).values  # no fitting candidate: the worst
    n_distinct = (lambda ids: torch.tensor([len(set(row[m].tolist())) for row, m in zip(ids.cpu(), valid.cpu())],
                                           dtype=torch.float32, device=alpha.device))
    beta = torch.zeros_like(entropy) if s.beta is None else s.beta.float().to(alpha.device)
    feats = [alpha.max(-1).values, entropy, second, _pick(sem_raw, top), _pick(phi_raw, top), _pick(g, top),
             best2[:, 0], margin, sem2[:, 0], sem2[:, 0] - sem2[:, -1], sem2[:, 0] - sem_mean,
             sem2[:, 0] - _pick(sem_raw, top), phi.max(-1).values, phi.max(-1).values - _pick(phi_raw, top),
             time_ok.any(-1).float(), _pick(time_ok.float(), top), (alpha * time_ok).sum(-1),
             _pick(time_ok.float(), best), (group_best & time_ok).any(-1).float(), (group_top & time_ok).any(-1).float(),
             sem2[:, 0] - sem_ok.max(-1).values.clamp_min(sem_floor), _pick(g, best),
             g.masked_fill(~valid, float("inf")).min(-1).values, has_time,
             (alpha * group_top).sum(-1), (alpha * same_head_top).sum(-1), n_distinct(heads), n_distinct(rels),
             beta, s.copy_gate.float().to(alpha.device)]
    named = torch.zeros_like(valid) if s.head_named is None else s.head_named.to(valid.device) & valid  # (B, K)
    feats += [_pick(named.float(), top), named.any(-1).float(), (alpha * named).sum(-1)]
    return torch.stack(feats, dim=-1).nan_to_num(0.0, posinf=0.0, neginf=0.0)


def abstention_features(signals: AbstainSignals | Sequence[AbstainSignals], gamma: float, eta: float) -> torch.Tensor:
    """(B, L * len(ABSTAIN_FEATURES)) float32: each given layer's `ABSTAIN_FEATURES`, layers side by side."""
    layers = [signals] if isinstance(signals, AbstainSignals) else list(signals)
    if not layers:
        raise ValueError("abstention_features: no layer signals")
    return torch.cat([_layer_features(s, gamma, eta) for s in layers], dim=-1)


def signals_from_record(record: Any, tau: torch.Tensor, gate: nn.Module | None, pos: int = -1,
                        source: Any = None) -> AbstainSignals:
    """Signals at position `pos` of a LayerRecord (the prefill's last prompt token by default); the
    copy gate is evaluated as the answer head does at its first step (hidden state, max alpha); the
    candidates' head / relation ids come from `source.fetch` when it has them."""
    from kblampp.retrieval import group_fields

    if record.parts is None or record.windows is None:
        raise ValueError("the KB record has no score parts / windows (recorded by KBInjection.forward)")
    alpha, hidden, cand = record.alpha[:, pos], record.hidden[:, pos], record.cand_ids[:, pos]
    g = torch.zeros(alpha.shape[0], device=alpha.device)
    if gate is not None:
        g = gate(hidden.to(next(gate.parameters()).device), alpha.max(-1).values).to(alpha.device)
    ids = group_fields(source.fetch(cand.clamp_min(0))) if source is not None else {}
    return AbstainSignals(alpha, cand, record.parts[:, pos], record.windows[:, pos], tau.to(alpha.device), g,
                          beta=record.beta[:, pos], head_ids=ids.get("head_id"), rel_ids=ids.get("rel_id"),
                          hidden=hidden)


class KBAbstainHead(nn.Module):
    """p(unanswerable) = sigmoid(net((x - mean) / std)), x = [features, (state - state_mean) @ state_proj].

    `net` is linear (hidden = 0) or one tanh hidden layer. The state projection (the training states'
    top `state_dims` principal directions; 0 = KB signals only) lets the decision read the question as
    the model holds it; mean/std and the projection are fitted on the training signals, `threshold`
    is calibrated on dev (all buffers, so the checkpoint carries them)."""

    def __init__(self, hidden: int = 0, n_features: int = len(ABSTAIN_FEATURES), state_dims: int = 0,
                 d_state: int = 0):
        super().__init__()
        if state_dims > 0 and d_state <= 0:
            raise ValueError("KBAbstainHead: state_dims > 0 needs d_state (the model's hidden size)")
        n_in = n_features + state_dims
        self.n_features, self.state_dims = n_features, state_dims
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("std", torch.ones(n_in))
        self.register_buffer("threshold", torch.tensor(0.5))
        self.register_buffer("state_mean", torch.zeros(d_state if state_dims > 0 else 0))
        self.register_buffer("state_proj", torch.zeros(d_state if state_dims > 0 else 0, state_dims))
        self.net = (nn.Sequential(nn.Linear(n_in, 1)) if hidden <= 0 else
                    nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, 1)))

    def fit_state(self, states: torch.Tensor) -> None:
        """The projection onto the states' top principal directions (SVD of the centred states)."""
        if self.state_dims <= 0:
            return
        with torch.no_grad():
            x = states.float().to(self.state_mean.device)
            self.state_mean.copy_(x.mean(0))
            _, _, vh = torch.linalg.svd(x - self.state_mean, full_matrices=False)  # vh (min(n, d), d)
            k = min(self.state_dims, vh.shape[0])  # fewer states than directions: the rest stay 0
            self.state_proj.zero_()
            self.state_proj[:, :k] = vh[:k].T

    def inputs(self, features: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_features + state_dims) before standardising."""
        x = features.to(self.mean.device).float()
        if self.state_dims <= 0:
            return x
        if states is None:
            raise ValueError("kb_abstain reads the question state (state_dims > 0) but none was given")
        z = (states.to(self.mean.device).float() - self.state_mean) @ self.state_proj  # (B, state_dims)
        return torch.cat([x, z], dim=-1)

    def fit_scaling(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.mean.copy_(x.mean(0))
            self.std.copy_(x.std(0).clamp_min(1e-4))

    def logits(self, features: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        x = (self.inputs(features, states) - self.mean) / self.std  # (B, F)
        return self.net(x).squeeze(-1)  # (B,)

    def forward(self, features: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(features, states))


def head_from_tensors(tensors: dict[str, torch.Tensor], prefix: str = "kb_abstain.") -> KBAbstainHead | None:
    """A head shaped like the checkpoint's (widths from its tensors), or None if absent."""
    w = tensors.get(f"{prefix}net.0.weight")
    if w is None:
        return None
    proj = tensors.get(f"{prefix}state_proj")
    state_dims = 0 if proj is None or proj.numel() == 0 else int(proj.shape[1])
    n_features = int(tensors[f"{prefix}mean"].shape[0]) - state_dims
    if n_features % len(ABSTAIN_FEATURES):  # an older feature set: the run loads without a decision
        warnings.warn(f"kb_abstain in the checkpoint reads {n_features} features, not a multiple of the "
                      f"{len(ABSTAIN_FEATURES)} per inject layer of this version; it is not loaded (retrain it "
                      "with train/train_abstention.py)", stacklevel=2)
        return None
    hidden = 0 if f"{prefix}net.2.weight" not in tensors else int(w.shape[0])
    return KBAbstainHead(hidden=hidden, n_features=n_features, state_dims=state_dims,
                         d_state=0 if state_dims == 0 else int(proj.shape[0]))


@dataclass
class Abstainer:
    """The decision as the generation path uses it: head + copy gate + selector weights + threshold."""

    head: KBAbstainHead
    gate: nn.Module | None
    gamma: float
    eta: float
    threshold: float

    def probability(self, signals: AbstainSignals | Sequence[AbstainSignals]) -> torch.Tensor:
        layers = [signals] if isinstance(signals, AbstainSignals) else list(signals)
        return self.head(abstention_features(layers, self.gamma, self.eta), layers[0].hidden)

    def decide(self, signals: AbstainSignals | Sequence[AbstainSignals]) -> tuple[torch.Tensor, torch.Tensor]:
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


def decision_layers(model: Any) -> list[int]:
    """The inject layers whose records the model's decision reads (the first len(features) / per-layer)."""
    head = model.kb_abstain
    n = max(1, head.n_features // len(ABSTAIN_FEATURES))
    if n > len(model.inject_layers):
        raise ValueError(f"kb_abstain reads {n} inject layers, the model has {len(model.inject_layers)}")
    return [int(i) for i in model.inject_layers[:n]]


class AbstainLogitsProcessor(LogitsProcessor):
    """Rows the decision abstains on write exactly `answer_ids` then `stop_id`; others are untouched.

    Decided once, at the prefill call, from the records of `layer_idx` (one inject layer or several, in
    the order the decision was trained on) at the last prompt token; `name_check(cand_ids) -> (B, K)
    bool` says which candidates' heads the rows' questions name (`head_named`; None: no name signal).
    Put it after the answer head's processor so it has the last word. `abstained` / `p` hold the decision per row afterwards."""

    def __init__(self, abstainer: Abstainer, ctx: Any, layer_idx: int | Sequence[int], answer_ids: Sequence[int],
                 stop_id: int, name_check: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not answer_ids:
            raise ValueError("abstain_answer tokenizes to nothing")
        self.abstainer, self.ctx, self.name_check = abstainer, ctx, name_check
        self.layers = [int(layer_idx)] if isinstance(layer_idx, int) else [int(i) for i in layer_idx]
        self.answer_ids, self.stop_id = list(answer_ids), int(stop_id)
        self.abstained: torch.Tensor | None = None
        self.p: torch.Tensor | None = None
        self._prompt_len = 0

    def signals(self) -> list[AbstainSignals]:
        """Each layer's signals from its prefill record (the last one written before the first step)."""
        out = []
        for layer in self.layers:
            records = getattr(self.ctx, "records", {}).get(layer)
            if not records:
                raise RuntimeError(f"AbstainLogitsProcessor: no KB records at layer {layer}")
            n = records[-1].alpha.shape[0]
            tau = self.ctx.rows(self.ctx.tau, n)
            tau = torch.full((n, 2), math.nan) if tau is None else tau
            sig = signals_from_record(records[-1], tau, self.abstainer.gate, source=self.ctx.source)
            out.append(sig if self.name_check is None else sig._replace(head_named=self.name_check(sig.cand_ids)))
        return out

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.abstained is None:  # the prefill call
            abstained, p = self.abstainer.decide(self.signals())
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
    right (`answer_ok`); ties go to the lower t, which is then moved halfway down to the next lower
    score (the same questions abstain). No admissible t with abstentions: a t above every score."""
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
    below = score[score < best_t]
    if len(below):  # midway to the next lower score: float noise at run time must not flip that question
        best_t = float((best_t + below.max()) / 2)
    abst = score >= best_t
    return best_t, {**best, "abstained_answerable_right": float((abst & ok).sum() / n_ans),
                    "abstained_answerable": float((abst & ~unanswerable).sum() / n_ans)}


# ---------------------------------------------------------------------------------------- explanations
def head_named(questions: Sequence[str], cand_ids: torch.Tensor, head_name: Callable[[int], str]) -> torch.Tensor:
    """(B, K) bool: candidate k of row b is a fact whose head `questions[b]` names (-1 ids: False).
    A check on the retrieved evidence: asked about an entity the KB lacks, no candidate's head is named."""
    ids = cand_ids.cpu().tolist()
    out = [[i >= 0 and names_head(q, head_name(i)) for i in row] for q, row in zip(questions, ids)]
    return torch.tensor(out, dtype=torch.bool, device=cand_ids.device).reshape(cand_ids.shape)


def miss_reason(question: str, tau: tuple[float, float] | None, head: str, window_days: tuple[float, float]) -> str:
    """Why a candidate fact does not answer the question: its head is not named in the question
    (entity_missing), else its window misses the question's time (time_outside), else relation_missing."""
    if words(head).strip() and not names_head(question, head):
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
