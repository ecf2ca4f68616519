"""The answer head (SPEC sections 1 and 7): copy a retrieved fact's tail, token by token.

At answer step m (tokens y_<m already written), candidate i proposes the next token of its tail t_i[m]
if y_<m == t_i[:m], with weight alpha_i renormalised over the candidates that match: the posterior
P(i | y_<m) of the candidate being copied, so a copy once begun keeps its whole weight ("Aston" then
" Villa", not the LM's "ishing") instead of shrinking to the alpha of the facts that share its prefix.
That pointer is mixed into the LM's distribution by a per-token copy gate g:
p = (1 - g * mass) * softmax(lm_logits) + g * p_copy, with mass = 1 where some candidate matches.
At step 0 every candidate matches, so the first token is weighted by alpha itself. No matching
candidate, or g = 0, leaves the LM distribution as it was. The value path alone never
decoded names in a CPU budget (0 EM); copying the top fact's tail gave 0.646 held-out EM.

One function does the math (`mix_log_probs` over `pointer_at_steps`); two entry points use it:
`CopyLogitsProcessor` inside `generate()` and `copy_mixture_log_probs` for the teacher-forced loss.
The alpha/candidates used are those recorded at the last prompt token (the position trained to
retrieve), kept fixed while the answer is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessor

from kblampp.backbone import end_of_turn_id

log = logging.getLogger(__name__)

PAD = -1
MAX_GATE_MASS = 1.0 - 1e-6  # keeps log(1 - g*mass) finite, so a non-copy gold token has a finite loss


# ---------------------------------------------------------------------------------------- tail table
def tail_table_name(tokenizer: Any, max_len: int = 16) -> str:
    """Store key of a tail table: depends on the tokenizer's vocabulary, end marker and max_len."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps([vocab, end_of_turn_id(tokenizer), max_len], ensure_ascii=False)
    return "tail_tokens_" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def build_tail_token_table(tail_names: Sequence[str], tokenizer: Any, max_len: int = 16) -> torch.Tensor:
    """(N, max_len) long tensor: each tail as written right after the assistant header (no leading
    space), then the end-of-turn id so a fully copied tail points to "stop"; padded with -1.
    Tails longer than max_len - 1 tokens are cut (and still end with the marker)."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (a token and the end marker), got {max_len}")
    end = end_of_turn_id(tokenizer)
    table = torch.full((len(tail_names), max_len), PAD, dtype=torch.long)
    cut = 0
    for i, name in enumerate(tail_names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"tail {i}: empty or non-string tail name {name!r}")
        ids = list(tokenizer(name, add_special_tokens=False)["input_ids"])
        if len(ids) > max_len - 1:
            cut += 1
            ids = ids[: max_len - 1]
        table[i, : len(ids) + 1] = torch.tensor(ids + [end], dtype=torch.long)
    if cut:
        log.warning("%d of %d tails longer than %d tokens were cut", cut, len(tail_names), max_len - 1)
    return table


def tail_rows_builder(tokenizer: Any, max_len: int = 16):
    """Rows of the tail table for newly added or replaced 5-tuple dicts (a store's `extra_builders`)."""
    return lambda raw_facts: build_tail_token_table([f["tail"]["name"] for f in raw_facts], tokenizer,
                                                    max_len).numpy()


def tail_builders(manifest: dict, tokenizer: Any) -> dict:
    """Row builders for every per-fact tail table a store manifest lists (rebuilt with `tokenizer`), so
    that edits by the server or the KB-edit check give those tables rows for the edited facts."""
    return {name: tail_rows_builder(tokenizer, int(entry["shape"][1]))
            for name, entry in manifest.get("extra", {}).items()
            if entry.get("per_fact") and name.startswith("tail_tokens_")}


def load_or_build_tail_table(store: Any, tail_names: Sequence[str], tokenizer: Any,
                             max_len: int = 16) -> torch.Tensor:
    """The store's tail table for this tokenizer, built and written with the store on first use.

    `store` offers `read_extra(name)` (KeyError when absent) and `write_extra(name, array)`; where it
    has `extra_builders`, a builder is registered so facts added later get their rows too."""
    name = tail_table_name(tokenizer, max_len)
    builders = getattr(store, "extra_builders", None)
    if isinstance(builders, dict):
        builders[name] = tail_rows_builder(tokenizer, max_len)
    try:
        cached = store.read_extra(name)
    except (KeyError, FileNotFoundError):
        cached = None
    if cached is not None:
        table = torch.from_numpy(np.asarray(cached, dtype=np.int64).copy())
        if table.shape != (len(tail_names), max_len):
            raise ValueError(f"store extra {name}: shape {tuple(table.shape)} does not match "
                             f"{len(tail_names)} facts x {max_len} tokens; rebuild it")
        return table
    table = build_tail_token_table(tail_names, tokenizer, max_len)
    store.write_extra(name, table.numpy().astype(np.int64))
    return table


# ---------------------------------------------------------------------------------------- the math
def candidate_tails(tail_table: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """(B, K, L) tail tokens of the candidates; cand_id -1 (no candidate) gives an all -1 row.
    Keep `tail_table` on the candidates' device: a table elsewhere is copied on every call."""
    table = tail_table.to(cand_ids.device)
    tails = table[cand_ids.clamp_min(0)]
    return torch.where((cand_ids >= 0).unsqueeze(-1), tails, torch.full_like(tails, PAD))


def prefix_match(tails: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """(B, K, min(M, L) + 1) bool: [..., m] is True when tails[:, k, :m] == seq[:, :m]."""
    n = min(seq.shape[1], tails.shape[2])
    eq = tails[:, :, :n] == seq[:, None, :n]
    ok = torch.cumprod(eq.to(torch.int8), dim=2).bool()
    return torch.cat([ok.new_ones(*ok.shape[:2], 1), ok], dim=2)


def pointer_at_steps(tails: torch.Tensor, alpha: torch.Tensor, seq: torch.Tensor, steps: torch.Tensor,
                     vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pointer distribution (B, P, V) and its mass (B, P) at answer steps `steps` (B, P; -1 = none),
    given the copied-so-far tokens `seq` (B, M) of each row (only seq[:, :step] is read).

    The weights are alpha over the candidates whose tail matches seq[:, :step], renormalised to sum
    to 1 (the posterior of the candidate being copied); mass is 1 where one matches with alpha > 0,
    else 0 (the LM alone)."""
    ok = prefix_match(tails, seq)  # (B, K, S+1)
    L = tails.shape[2]
    valid = (steps >= 0) & (steps < L) & (steps <= ok.shape[2] - 1)
    s = steps.clamp(0, min(L - 1, ok.shape[2] - 1))  # (B, P)
    idx = s.unsqueeze(1).expand(-1, tails.shape[1], -1)  # (B, K, P)
    match = torch.gather(ok, 2, idx)  # (B, K, P)
    token = torch.gather(tails, 2, idx)  # (B, K, P)
    active = match & (token >= 0) & valid.unsqueeze(1)
    weight = torch.where(active, alpha.unsqueeze(-1).to(torch.float32), torch.zeros((), device=alpha.device))
    weight, token = weight.transpose(1, 2), token.clamp_min(0).transpose(1, 2)  # (B, P, K)
    matched = weight.sum(-1, keepdim=True)  # (B, P, 1) alpha of the candidates still matching
    posterior = torch.where(matched > 0, weight / matched.clamp_min(torch.finfo(weight.dtype).tiny),
                            torch.zeros((), dtype=weight.dtype, device=weight.device))  # (B, P, K)
    p_copy = torch.zeros(*weight.shape[:2], vocab, dtype=weight.dtype, device=weight.device)
    p_copy = p_copy.scatter_add(2, token, posterior)
    return p_copy, (matched.squeeze(-1) > 0).to(weight.dtype)


def mix_log_probs(lm_logits: torch.Tensor, p_copy: torch.Tensor, mass: torch.Tensor,
                  gate: torch.Tensor) -> torch.Tensor:
    """log[(1 - g*mass) softmax(lm) + g p_copy]; exactly log_softmax(lm) where g*mass == 0."""
    logits = lm_logits.to(torch.float32)
    lm_logp = torch.log_softmax(logits, dim=-1)
    gm = (gate.to(torch.float32) * mass).clamp(0.0, MAX_GATE_MASS)
    p = (1.0 - gm).unsqueeze(-1) * lm_logp.exp() + gate.to(torch.float32).unsqueeze(-1) * p_copy
    mixed = torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.where((gm > 0).unsqueeze(-1), mixed, lm_logp)


def copy_mixture_log_probs(lm_logits: torch.Tensor, alpha: torch.Tensor, cand_ids: torch.Tensor,
                           tail_table: torch.Tensor, answer_tokens: torch.Tensor,
                           gate: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log p (B, T, V) for the answer loss.

    lm_logits (B, T, V) are aligned with answer_tokens (B, T): position t predicts answer_tokens[:, t]
    (negative = not an answer position: plain log_softmax there). alpha / cand_ids (B, K) were taken at
    the last prompt token; gate (B, T) in [0, 1]. The copied prefix at step m is the gold answer[:m],
    so a candidate holding the gold tail puts its alpha on the gold token at every step.
    """
    if lm_logits.shape[:2] != answer_tokens.shape or gate.shape != answer_tokens.shape:
        raise ValueError(f"shapes disagree: lm_logits {tuple(lm_logits.shape)}, answer_tokens "
                         f"{tuple(answer_tokens.shape)}, gate {tuple(gate.shape)}")
    if alpha.shape != cand_ids.shape or alpha.shape[0] != lm_logits.shape[0]:
        raise ValueError(f"alpha {tuple(alpha.shape)} and cand_ids {tuple(cand_ids.shape)} must both be (B, K)")
    is_answer = answer_tokens >= 0
    steps = torch.where(is_answer, is_answer.long().cumsum(1) - 1, torch.full_like(answer_tokens, -1))
    width = max(int(is_answer.sum(1).max()), 1) if answer_tokens.numel() else 1
    seq = torch.full((answer_tokens.shape[0], width + 1), PAD, dtype=torch.long, device=answer_tokens.device)
    seq = seq.scatter(1, torch.where(is_answer, steps, torch.full_like(steps, width)),
                      torch.where(is_answer, answer_tokens, torch.full_like(answer_tokens, PAD)))[:, :width]
    tails = candidate_tails(tail_table, cand_ids)
    p_copy, mass = pointer_at_steps(tails, alpha, seq, steps, lm_logits.shape[-1])
    return mix_log_probs(lm_logits, p_copy, mass, gate * is_answer)


# ---------------------------------------------------------------------------------------- the gate
class KBCopyGate(nn.Module):
    """g_t = sigmoid(w . [LayerNorm(h_t), max_alpha] + b), per generated token.

    h_t is the inject layer's recorded state at the current position; max alpha says how sure the
    retrieval was. Weights start at zero and the bias at `init_bias` (0 -> g = 0.5 everywhere): half
    the pointer mass from the first step, so copying (the working path) is on from the start while
    the LM keeps half, and no random projection of large hidden states pushes g to 0 or 1 at init.
    Register it on the model as `kb_copy_gate` so freezing and checkpoints pick it up.
    """

    def __init__(self, d_model: int, init_bias: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        self.proj = nn.Linear(d_model + 1, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, init_bias)

    def forward(self, hidden: torch.Tensor, max_alpha: torch.Tensor) -> torch.Tensor:
        """hidden (..., d_model), max_alpha broadcastable to (...) -> g (...)."""
        h = self.norm(hidden.to(self.proj.weight.dtype))
        a = max_alpha.to(h.dtype).expand(h.shape[:-1]).unsqueeze(-1)
        return torch.sigmoid(self.proj(torch.cat([h, a], dim=-1))).squeeze(-1)


def _field(record: Any, name: str) -> torch.Tensor:
    return record[name] if isinstance(record, dict) else getattr(record, name)


def teacher_forced_copy_log_probs(lm_logits: torch.Tensor, record: Any, last_prompt_pos: torch.Tensor,
                                  answer_tokens: torch.Tensor, tail_table: torch.Tensor,
                                  gate: KBCopyGate) -> torch.Tensor:
    """`copy_mixture_log_probs` fed from one forward's inject-layer record (alpha, cand_ids, hidden:
    (B, T, .)): alpha at each row's last prompt token, gate from the hidden state at each position."""
    rows = torch.arange(lm_logits.shape[0], device=lm_logits.device)
    alpha = _field(record, "alpha")[rows, last_prompt_pos]
    cand_ids = _field(record, "cand_ids")[rows, last_prompt_pos]
    g = gate(_field(record, "hidden"), alpha.max(-1).values.unsqueeze(1))
    return copy_mixture_log_probs(lm_logits, alpha, cand_ids, tail_table, answer_tokens, g)


# ---------------------------------------------------------------------------------------- generate()
class CopyLogitsProcessor(LogitsProcessor):
    """Mixes the pointer into generate()'s scores from the KB context's inject-layer records.

    `ctx.records[layer_idx]` gets one record per forward call; the first call this processor sees is
    the prefill, whose last position (the last prompt token, also with left padding) gives alpha and
    the candidates for the whole answer. The gate comes from `gate` (a KBCopyGate) on the latest
    record's last hidden state, or is the constant `gate_value`. `gate_open=False` returns the scores
    untouched (the plain model, bitwise). One processor per generate() call.
    """

    def __init__(self, tail_table: torch.Tensor, ctx: Any, layer_idx: int, gate: KBCopyGate | None = None,
                 gate_value: float | None = None, gate_open: bool = True, hop_layers: Sequence[int] | None = None,
                 hop_choice: Any = None, hop_forced: int | None = None):
        if gate is None and gate_value is None and gate_open:
            raise ValueError("CopyLogitsProcessor needs a gate module or a constant gate_value")
        self.tail_table, self.ctx, self.layer_idx = tail_table, ctx, layer_idx
        self.gate, self.gate_value, self.gate_open = gate, gate_value, gate_open
        # multi-hop (kblampp.hops): copy from the layer `hop_choice` picks among `hop_layers`
        self.hop_layers = [int(x) for x in hop_layers] if hop_layers is not None and len(hop_layers) > 1 else None
        self.hop_choice, self.hop_forced = hop_choice, hop_forced
        self.hop: torch.Tensor | None = None  # (B,) index into hop_layers of the answering layer
        self.p_hop: torch.Tensor | None = None  # (B, H)
        self.trace: list[dict[str, torch.Tensor]] = []  # per step: gate, mass (explanations)
        self._start: int | None = None
        self._prompt_len = 0
        self._alpha: torch.Tensor | None = None
        self._cands: torch.Tensor | None = None

    def _records(self) -> list:
        records = getattr(self.ctx, "records", {}).get(self.layer_idx)
        if not records:
            raise RuntimeError(f"CopyLogitsProcessor: no KB records at layer {self.layer_idx}; run generate() "
                               "inside the model's KB request with record=True")
        return records

    def _rows(self, value: torch.Tensor, batch: int) -> torch.Tensor:
        if value.shape[0] == batch:
            return value
        if batch % value.shape[0]:
            raise RuntimeError(f"KB record has {value.shape[0]} rows but generate() has {batch}")
        return value.repeat_interleave(batch // value.shape[0], dim=0)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.gate_open:
            return scores
        records = self._records()
        if self._start is None:  # the prefill call
            self._start, self._prompt_len = len(records), input_ids.shape[1]
            prefill = records[-1]
            self._alpha = _field(prefill, "alpha")[:, -1, :]
            self._cands = _field(prefill, "cand_ids")[:, -1, :]
            if self.hop_layers is not None:
                from kblampp.hops import choose_hop, hop_candidates

                alpha, cands, hidden = hop_candidates(self.ctx.records, self.hop_layers, call=-1)
                self._alpha, self._cands, self.hop, self.p_hop = choose_hop(self.hop_choice, alpha, cands, hidden,
                                                                            self.hop_forced)
            self.tail_table = self.tail_table.to(scores.device)  # once, not per generated token
        step = input_ids.shape[1] - self._prompt_len
        if len(records) != self._start + step:
            raise RuntimeError(f"CopyLogitsProcessor: expected {self._start + step} records at layer "
                               f"{self.layer_idx}, found {len(records)} (one per forward call; reuse of a "
                               "processor across generate() calls is not allowed)")
        batch = input_ids.shape[0]
        alpha = self._rows(self._alpha, batch).to(scores.device)
        cands = self._rows(self._cands, batch).to(scores.device)
        if self.gate_value is not None:
            g = torch.full((batch,), float(self.gate_value), device=scores.device)
        else:
            hidden = self._rows(_field(records[-1], "hidden")[:, -1, :], batch)
            g = self.gate(hidden.to(scores.device), alpha.max(-1).values)
        seq = input_ids[:, self._prompt_len:]
        steps = torch.full((batch, 1), step, dtype=torch.long, device=scores.device)
        tails = candidate_tails(self.tail_table, cands)
        p_copy, mass = pointer_at_steps(tails, alpha, seq, steps, scores.shape[-1])
        logp = mix_log_probs(scores[:, None, :], p_copy, mass, g[:, None])[:, 0]
        self.trace.append({"gate": g.detach().cpu(), "mass": mass[:, 0].detach().cpu()})
        use = ((g * mass[:, 0]) > 0).unsqueeze(-1)
        return torch.where(use, logp.to(scores.dtype), scores)

