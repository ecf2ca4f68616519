"""The KBLaM++ rows of the table: the same prompt as "backbone alone", plus the KB request.

Variants (SPEC section 7 / issue 5): the answer head on (default), pure injection (copy gate closed,
the value path alone), gamma = 0, eta = 0, and "oracle value" (each question's supporting facts forced
into the candidates; with the head, and by pure injection). Every variant records alpha / cand_ids at
the last prompt token for the retrieval metrics and the evidence JSON.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from kblampp.inference.generate import RequestHook
from kblampp.evaluation.parsed_time import question_tau
from kblampp.kb_context import KBContext
from kblampp.retrieval import KBSource
from kblampp.schema import QARecord
from kblampp.time_query import QuestionTimes, anchor_fact_of, padded_ids, question_times


@dataclass(frozen=True)
class KBVariant:
    """How one KBLaM++ row runs: copy head on/off, selector overrides, gold facts forced."""

    name: str
    answer_head: bool = True
    gamma: float | None = None
    eta: float | None = None
    oracle: bool = False
    abstain: bool = True  # the model's abstention decision (when it has one) may answer `abstain_answer`
    hop1_zeroed: bool = False  # multi-hop ablation: the first inject layer fuses nothing (beta = 0)
    one_layer: bool = False  # multi-hop ablation: only the first inject layer runs and answers


KB_VARIANTS: dict[str, KBVariant] = {v.name: v for v in (
    KBVariant("kblampp"),
    KBVariant("kblampp_no_abstention", abstain=False),
    KBVariant("kblampp_injection", answer_head=False),
    KBVariant("kblampp_gamma0", gamma=0.0),
    KBVariant("kblampp_eta0", eta=0.0),
    KBVariant("kblampp_oracle_value", oracle=True),
    KBVariant("kblampp_oracle_value_injection", answer_head=False, oracle=True),
    KBVariant("kblampp_hop1_zeroed", hop1_zeroed=True),
    KBVariant("kblampp_one_layer", one_layer=True),
)}
MULTI_HOP_VARIANTS = ("kblampp_hop1_zeroed", "kblampp_one_layer")  # rows that need 2+ inject layers


def time_free_twin(variant: KBVariant, done: Any) -> str | None:
    """A finished row (a name in `done`) that differs from `variant` only in eta: on a question with no
    time g_time is exactly 0, so both rows compute the same thing there and its outputs can be reused."""
    for name in done:
        other = KB_VARIANTS.get(name)
        if other is not None and other != variant and replace(other, name=variant.name, eta=variant.eta) == variant:
            return name
    return None


def abstention_twin(variant: KBVariant, done: Any) -> str | None:
    """A finished row (a name in `done`) equal to `variant` but with the abstention decision on. Where
    it did not abstain its outputs are this row's (the decision leaves those rows' scores untouched),
    so only the questions it abstained on need generating."""
    if variant.abstain:
        return None
    for name in done:
        other = KB_VARIANTS.get(name)
        if other is not None and other.abstain and replace(other, name=variant.name, abstain=False) == variant:
            return name
    return None


def prefill_followers(row: str, rows: Sequence[str]) -> list[str]:
    """Rows after `row` in `rows` that run the same forward passes over the prompt (they differ from it
    only in what is applied to the logits: the answer head, the abstention decision) and that would
    otherwise generate every question themselves; they can start from `row`'s prompt cache."""
    variant = KB_VARIANTS[row]
    out = []
    for pos in range(rows.index(row) + 1, len(rows)):
        other = KB_VARIANTS.get(rows[pos])
        if other is None:
            continue
        if replace(other, name=row, answer_head=variant.answer_head, abstain=variant.abstain) != variant:
            continue
        earlier = [r for r in rows[:pos] if r in KB_VARIANTS]
        if time_free_twin(other, earlier) is None and abstention_twin(other, earlier) is None:
            out.append(rows[pos])
    return out


def question_taus(records: Sequence[QARecord], reference_date: str | None = None) -> torch.Tensor:
    """(n, 2) float32 question windows in days, parsed from each question's text (never the record's
    gold time); NaN rows = no time (neutral time score)."""
    taus = [question_tau(r.question, reference_date) for r in records]
    rows = [(math.nan, math.nan) if t is None else t for t in taus]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(records), 2)


def request_times(model: Any, source: KBSource, records: Sequence[QARecord], embed: Any = None,
                  facts: Sequence[Any] | None = None, reference_date: str | None = None) -> QuestionTimes:
    """Each question's typed constraint parsed from its text (as the server does); succession and
    relative anchors dated by the first inject layer's first retrieval when `embed` is given."""
    layer = model.kb_layers[str(model.inject_layers[0])]
    fact_time = None if facts is None else (lambda i: anchor_fact_of(facts[i]))
    return question_times([r.question for r in records], reference_date, layer, source, embed, fact_time)


def forced_ids(records: Sequence[QARecord]) -> torch.Tensor:
    """(n, F) supporting facts padded with -1, for `KBContext.forced_ids`."""
    out = padded_ids([r.supporting_facts for r in records])
    return torch.full((len(records), 1), -1, dtype=torch.long) if out is None else out


@contextlib.contextmanager
def selector_overrides(model: Any, gamma: float | None = None, eta: float | None = None) -> Iterator[None]:
    """Temporarily set gamma / eta of every inject layer's selector (the formula itself is fixed)."""
    saved = []
    for kb in model.kb_layers.values():
        sel = kb.kb_selector
        saved.append((sel, sel.gamma, sel.eta))
        if gamma is not None:
            sel.gamma = float(gamma)
        if eta is not None:
            sel.eta = float(eta)
    try:
        yield
    finally:
        for sel, g, e in saved:
            sel.gamma, sel.eta = g, e


@dataclass
class LastTokenRecord:
    """What the first inject layer saw at a question's last prompt token (for metrics and evidence)."""

    cand_ids: list[int]
    alpha: list[float]
    beta: float
    layer: int
    copy_gate: float | None = None
    abstained: bool | None = None  # None: no abstention decision ran for this row
    p_unanswerable: float | None = None
    hops: list[dict[str, Any]] = field(default_factory=list)  # every inject layer in order: layer, cand_ids, alpha, beta
    hop: int | None = None  # index into `hops` of the layer the answer head copied from (None: one layer)


@dataclass
class KBRequest:
    """Builds the per-batch KB request of one variant; `records[i]` is filled for question i."""

    model: Any
    source: KBSource
    e_q: torch.Tensor  # (n, d_ctx) question embeddings, in question order
    tau: torch.Tensor  # (n, 2)
    variant: KBVariant
    time_kind: torch.Tensor | None = None  # (n,) index into TIME_KINDS
    times: QuestionTimes | None = None  # parsed / used constraints and anchors, for the evidence
    tail_table: torch.Tensor | None = None
    forced: torch.Tensor | None = None
    abstainer: Any = None  # kblampp.abstention.Abstainer, or None (no decision)
    abstain_ids: list[int] | None = None  # `abstain_answer` as tokens
    stop_id: int = -1
    hop_forced: torch.Tensor | None = None  # (n, F) succession: the anchor's siblings, -1 padded
    hop_excluded: torch.Tensor | None = None  # (n, E) relative: the anchor's group, -1 padded
    questions: list[str] | None = None  # the question texts, in question order (the decision's name check)
    head_name: Callable[[int], str] | None = None  # fact id -> its head's name (the decision's name check)
    linked: torch.Tensor | None = None  # (n, L) facts whose head each question names, -1 padded (`name_link`)
    records: dict[int, LastTokenRecord] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        return int(self.model.inject_layers[0])

    def _copy_processor(self, ctx: KBContext) -> Any:
        from kblampp.answer_head import CopyLogitsProcessor

        gate = getattr(self.model, "kb_copy_gate", None)
        if self.tail_table is None:
            raise ValueError(f"{self.variant.name}: the answer head needs the store's tail token table")
        if gate is None:
            raise ValueError(f"{self.variant.name}: the model has no kb_copy_gate (checkpoint without an "
                             "answer head); drop the answer-head rows or train the copy gate")
        hop_layers = None if self.variant.one_layer else self.model.inject_layers
        return CopyLogitsProcessor(self.tail_table, ctx, self.layer, gate=gate, hop_layers=hop_layers,
                                   hop_choice=getattr(self.model, "kb_hop_choice", None))

    def _name_check(self, indices: list[int]) -> Any:
        """`head_named` for these rows, or None without question texts and head names."""
        if self.questions is None or self.head_name is None:
            return None
        from kblampp.abstention import head_named

        texts, name = [self.questions[i] for i in indices], self.head_name
        return lambda cand_ids: head_named(texts, cand_ids, name)

    @contextlib.contextmanager
    def __call__(self, indices: list[int], batch: dict[str, torch.Tensor]) -> Iterator[dict[str, Any]]:
        """The RequestHook: KB context for these rows, copy processor if the head is on."""
        from transformers import LogitsProcessorList

        device = batch["input_ids"].device
        idx = torch.tensor(indices, dtype=torch.long)
        forced = None if self.hop_forced is None else self.hop_forced[idx].to(device)
        excluded = None if self.hop_excluded is None else self.hop_excluded[idx].to(device)
        only = forced is not None  # the succession hop's siblings are the only candidates
        if self.variant.oracle:
            if self.forced is None:
                raise ValueError(f"{self.variant.name}: oracle variant needs forced ids")
            forced, only = self.forced[idx].to(device), False
        kind = None if self.time_kind is None else self.time_kind[idx].to(device)
        later = frozenset(int(x) for x in self.model.inject_layers[1:])
        linked = None if self.linked is None else self.linked[idx].to(device)
        ctx = KBContext(source=self.source, e_q=self.e_q[idx].to(device), tau=self.tau[idx].to(device),
                        time_kind=kind, forced_ids=forced, forced_only=only, excluded_ids=excluded, record=True,
                        linked_ids=linked,
                        retrieval_positions=self.model.retrieval_positions,
                        off_layers=later if self.variant.one_layer else frozenset(),
                        zero_beta_layers=frozenset({self.layer}) if self.variant.hop1_zeroed else frozenset())
        extra: dict[str, Any] = {}
        processor = None
        if self.variant.answer_head:
            processor = self._copy_processor(ctx)
        abstain = None
        if self.variant.abstain and self.abstainer is not None:
            from kblampp.abstention import AbstainLogitsProcessor, decision_layers

            abstain = AbstainLogitsProcessor(self.abstainer, ctx, decision_layers(self.model), self.abstain_ids or [],
                                             self.stop_id, self._name_check(indices))
        processors = [p for p in (processor, abstain) if p is not None]  # abstention has the last word
        if processors:
            extra["logits_processor"] = LogitsProcessorList(processors)
        with selector_overrides(self.model, self.variant.gamma, self.variant.eta), self.model.kb_request(ctx):
            yield extra
        prefill = ctx.records[self.layer][0]
        gates = processor.trace[0]["gate"] if processor is not None and processor.trace else None
        hop_recs = [(int(x), ctx.records[int(x)][0]) for x in self.model.inject_layers if int(x) in ctx.records]
        chosen = None if processor is None or processor.hop is None else processor.hop.tolist()
        for row, i in enumerate(indices):
            self.records[i] = LastTokenRecord(
                cand_ids=prefill.cand_ids[row, -1].tolist(), alpha=prefill.alpha[row, -1].float().tolist(),
                beta=float(prefill.beta[row, -1]), layer=self.layer,
                copy_gate=None if gates is None else float(gates[row]),
                abstained=None if abstain is None else bool(abstain.abstained[row]),
                p_unanswerable=None if abstain is None else float(abstain.p[row]),
                hops=[{"layer": layer, "cand_ids": rec.cand_ids[row, -1].tolist(),
                       "alpha": rec.alpha[row, -1].float().tolist(), "beta": float(rec.beta[row, -1])}
                      for layer, rec in hop_recs] if len(hop_recs) > 1 else [],
                hop=None if chosen is None else int(chosen[row]))


def kb_request(model: Any, source: KBSource, e_q: torch.Tensor, records: Sequence[QARecord],
               variant: KBVariant, tail_table: torch.Tensor | None = None, reference_date: str | None = None,
               times: QuestionTimes | None = None, abstainer: Any = None, abstain_ids: Sequence[int] | None = None,
               stop_id: int = -1, head_name: Callable[[int], str] | None = None,
               linked: torch.Tensor | None = None) -> KBRequest:
    """A ready `KBRequest` (a RequestHook) for `records` in order; `times` from `request_times`
    (default: parsed from the text with `reference_date` resolving "now", anchors left undated); with
    `abstainer`, rows it abstains on write `abstain_ids` then `stop_id`; `head_name(fact_id)` gives
    the decision its name check; `linked` (n, L): the facts each question names (`name_link`), ahead
    of the searched ones at the first inject layer."""
    if e_q.shape[0] != len(records):
        raise ValueError(f"e_q has {e_q.shape[0]} rows for {len(records)} questions")
    if linked is not None and linked.shape[0] != len(records):
        raise ValueError(f"linked has {linked.shape[0]} rows for {len(records)} questions")
    times = times if times is not None else request_times(model, source, records, reference_date=reference_date)
    tau, kind = times.tensors()
    return KBRequest(model=model, source=source, e_q=e_q, tau=tau, variant=variant, time_kind=kind, times=times,
                     tail_table=tail_table, forced=forced_ids(records) if variant.oracle else None,
                     hop_forced=times.forced(), hop_excluded=times.excluded_ids(), abstainer=abstainer,
                     abstain_ids=None if abstain_ids is None else list(abstain_ids), stop_id=stop_id,
                     questions=[r.question for r in records], head_name=head_name, linked=linked)


__all__ = ["time_free_twin", "prefill_followers", "KBVariant", "KB_VARIANTS", "KBRequest", "LastTokenRecord",
           "kb_request", "question_taus", "request_times", "forced_ids", "selector_overrides", "RequestHook"]
