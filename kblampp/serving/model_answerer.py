"""The model side of the server: a loaded KBLaMPP answering a batch of questions through the live KB.

It uses the evaluation's own generation path (`generate_rows`: the one prompt builder, greedy
decoding, the shared answer extraction) with a KB request hook, and the answer head
(`CopyLogitsProcessor`) when the checkpoint has a copy gate, so served answers match evaluated ones.
The tail token table follows live edits: it is re-synced from the KB's facts after any change.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from kblampp.backbone import answer_instruction, build_prompt
from kblampp.inference.generate import generate_rows
from kblampp.kb_context import KBContext
from kblampp.name_link import NameIndex
from kblampp.scorers import kinds_from_windows
from kblampp.time_query import padded_ids
from kblampp.synth.families import DEFAULT_ABSTAIN_ANSWER


@dataclass
class AnswerItem:
    """One served question as the model reads it (see `KBContext`): tau None = no dates; time_kind
    None = read from the window; forced_ids: the only candidates (a succession hop's siblings);
    excluded_ids: facts never candidates (a relative question's anchor group)."""

    question: str
    e_q: np.ndarray
    tau: tuple[float, float] | None
    max_new_tokens: int
    abstain: bool = True
    time_kind: int | None = None
    forced_ids: list[int] | None = None
    excluded_ids: list[int] | None = None


@dataclass
class RowAnswer:
    """One item's result: its answer line, the batch's records (its row is `row`), the decision."""

    text: str
    records: dict[int, list[Any]]
    row: int
    decision: dict | None


class KBModelAnswerer:
    """`answer_batch(items) -> [RowAnswer]` for the engine (`answer` for one question);
    `decision` is None without an abstention decision (or with `abstain=False`), else
    {"abstained", "p_unanswerable", "threshold"}; an abstaining model writes `abstain_answer`."""

    def __init__(self, model: Any, tokenizer: Any, kb: Any, tail_max_len: int = 16, abstainer: Any = None,
                 abstain_answer: str = DEFAULT_ABSTAIN_ANSWER, name_check: bool = True,
                 name_link_limit: int | None = None):
        self.model, self.tokenizer, self.kb, self.tail_max_len = model, tokenizer, kb, tail_max_len
        self.name_link_limit = name_link_limit  # None: no name linking (config `name_link` off)
        self._names = NameIndex()
        self._named: list[str | None] = []  # per slot: the head name indexed, None = deleted
        self.abstainer, self.abstain_answer, self.name_check = abstainer, abstain_answer, name_check
        self.instruction = answer_instruction(abstain_answer)
        self.gate = getattr(model, "kb_copy_gate", None)
        self.layer = int(model.inject_layers[0])
        self._tails: list[str] = []
        self._table: torch.Tensor | None = None

    @property
    def answer_head(self) -> bool:
        return self.gate is not None

    def tail_table(self) -> torch.Tensor:
        """(N, max_len) tail tokens for every fact slot, rebuilding only rows whose tail changed."""
        from kblampp.answer_head import build_tail_token_table

        names = [f["tail"]["name"].strip() for f in self.kb.facts]  # deleted slots keep their last fact
        if self._table is not None and names == self._tails:
            return self._table
        changed = [i for i, n in enumerate(names) if i >= len(self._tails) or self._tails[i] != n]
        rows = build_tail_token_table([names[i] for i in changed], self.tokenizer, self.tail_max_len)
        table = torch.full((len(names), self.tail_max_len), -1, dtype=torch.long)
        if self._table is not None:
            keep = min(len(self._tails), len(names))
            table[:keep] = self._table[:keep]
        table[changed] = rows
        self._table, self._tails = table, names
        return table

    def linked_ids(self, questions: Sequence[str]) -> torch.Tensor | None:
        """(n, L) the live facts whose head each question names (-1 padded), None without name
        linking; the name index follows live edits (only changed slots are re-indexed)."""
        if self.name_link_limit is None:
            return None
        live = [None if (fact := self.kb.get(i)) is None else fact["head"]["name"] for i in range(self.kb.num_slots())]
        for i, head in enumerate(live):
            if i >= len(self._named) or self._named[i] != head:
                self._names.remove(i)
                if head is not None:
                    self._names.add(i, head)
        self._named = live
        return torch.from_numpy(self._names.linked_ids(list(questions), self.name_link_limit))

    def anchor_fact(self, e_select: np.ndarray, e_search: np.ndarray) -> tuple[int, list[int]]:
        """The first retrieval of a succession / relative question (`kblampp.time_query.first_hop`):
        the anchor fact and the anchor's siblings it found."""
        from kblampp.time_query import first_hop

        layer = self.model.kb_layers[str(self.layer)]
        as_t = (lambda e: torch.as_tensor(np.asarray(e, np.float32))[None])
        ids, group = first_hop(layer, self.kb.source, as_t(e_select), as_t(e_search), with_group=True)
        return int(ids[0]), [int(x) for x in group[0].tolist() if x >= 0 and x != int(ids[0])]

    def _head_name(self, index: int) -> str:
        fact = self.kb.get(index)
        return "" if fact is None else fact["head"]["name"]

    def _processors(self, ctx: KBContext, abstain: bool, questions: Sequence[str]) -> tuple[dict[str, Any], Any]:
        """generate() kwargs for one KB context (rows asking `questions`): the answer head's copy
        processor when the checkpoint has a copy gate, then the abstention decision (the last word);
        and that decision or None."""
        from transformers import LogitsProcessorList

        extra: dict[str, Any] = {}
        if self.gate is not None:
            from kblampp.answer_head import CopyLogitsProcessor

            extra["logits_processor"] = LogitsProcessorList(
                [CopyLogitsProcessor(self.tail_table(), ctx, self.layer, gate=self.gate,
                                     hop_layers=self.model.inject_layers,
                                     hop_choice=getattr(self.model, "kb_hop_choice", None))])
        decision = None
        if abstain and self.abstainer is not None:
            from kblampp.abstention import AbstainLogitsProcessor, answer_token_ids, decision_layers, head_named
            from kblampp.inference.generate import stop_token_id

            texts = list(questions)
            check = (lambda cand_ids: head_named(texts, cand_ids, self._head_name)) if self.name_check else None
            decision = AbstainLogitsProcessor(self.abstainer, ctx, decision_layers(self.model),
                                              answer_token_ids(self.tokenizer, self.abstain_answer),
                                              stop_token_id(self.tokenizer), check)
            extra.setdefault("logits_processor", LogitsProcessorList()).append(decision)  # the last word
        return extra, decision

    @torch.inference_mode()
    def answer_batch(self, items: Sequence[AnswerItem]) -> list[RowAnswer]:
        """Answers for `items` in order from ONE generate() per abstention setting (left-padded rows;
        each row keeps its own e_q, window, time kind, forced candidates and new-token budget)."""
        out: list[RowAnswer | None] = [None] * len(items)
        for use_abstain in (True, False):
            rows = [i for i, it in enumerate(items) if (it.abstain and self.abstainer is not None) == use_abstain]
            if rows:
                for i, row_answer in zip(rows, self._generate([items[i] for i in rows], use_abstain)):
                    out[i] = row_answer
        return [r for r in out if r is not None]

    def _generate(self, items: Sequence[AnswerItem], abstain: bool) -> list[RowAnswer]:
        """One generate() over `items` (all with the same abstention setting); the hook builds the KB
        context in the row order generate_rows chose, and each answer points at its row."""
        device = next(self.model.parameters()).device
        e_q = torch.as_tensor(np.stack([np.asarray(it.e_q, np.float32) for it in items]))  # (n, d_ctx)
        tau = torch.tensor([(math.nan, math.nan) if it.tau is None else tuple(it.tau) for it in items],
                           dtype=torch.float32).reshape(len(items), 2)  # (n, 2) days, NaN = no dates
        kinds = None
        if any(it.time_kind is not None for it in items):  # rows without one: the kind their window implies
            given = torch.tensor([-1 if it.time_kind is None else it.time_kind for it in items], dtype=torch.long)
            kinds = torch.where(given >= 0, given, kinds_from_windows(tau))  # (n,)
        forced = padded_ids([it.forced_ids or [] for it in items])  # rows without any: all -1, no forcing
        excluded = padded_ids([it.excluded_ids or [] for it in items])
        linked = self.linked_ids([it.question for it in items])
        pick = (lambda t, sel: None if t is None else t[sel].to(device))
        calls: list[tuple[list[int], KBContext, Any]] = []

        @contextlib.contextmanager
        def hook(indices: list[int], batch: dict) -> Iterator[dict]:
            sel = torch.tensor(indices, dtype=torch.long)
            ctx = KBContext(source=self.kb.source, e_q=pick(e_q, sel), tau=pick(tau, sel), time_kind=pick(kinds, sel),
                            forced_ids=pick(forced, sel), forced_only=True, excluded_ids=pick(excluded, sel),
                            linked_ids=pick(linked, sel),
                            record=True, retrieval_positions=self.model.retrieval_positions)
            extra, decision = self._processors(ctx, abstain, [items[i].question for i in indices])
            calls.append((indices, ctx, decision))
            with self.model.kb_request(ctx):
                yield extra

        prompts = [build_prompt(self.tokenizer, it.question, self.instruction) for it in items]
        gens = generate_rows(self.model, self.tokenizer, prompts, [it.max_new_tokens for it in items],
                             batch_size=len(items), request=hook, progress=False)
        out: list[RowAnswer | None] = [None] * len(items)
        for indices, ctx, decision in calls:
            for row, i in enumerate(indices):
                verdict = None if decision is None else {
                    "abstained": bool(decision.abstained[row]), "p_unanswerable": float(decision.p[row]),
                    "threshold": self.abstainer.threshold}
                out[i] = RowAnswer(gens[i].pred, ctx.records, row, verdict)
        return [r for r in out if r is not None]

    def answer(self, question: str, e_q: np.ndarray, tau: tuple[float, float] | None,
               max_new_tokens: int, abstain: bool = True, time_kind: int | None = None,
               forced_ids: list[int] | None = None) -> tuple[str, dict[int, list[Any]], dict | None]:
        """One question alone (a batch of one): (answer line, its records, decision)."""
        (one,) = self.answer_batch([AnswerItem(question, e_q, tau, max_new_tokens, abstain, time_kind, forced_ids)])
        return one.text, one.records, one.decision
