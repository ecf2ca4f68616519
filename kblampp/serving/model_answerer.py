"""The model side of the server: a loaded KBLaMPP answering one question through the live KB.

It uses the evaluation's own generation path (`generate_rows`: the one prompt builder, greedy
decoding, the shared answer extraction) with a KB request hook, and the answer head
(`CopyLogitsProcessor`) when the checkpoint has a copy gate, so served answers match evaluated ones.
The tail token table follows live edits: it is re-synced from the KB's facts after any change.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import numpy as np
import torch

from kblampp.backbone import answer_instruction, build_prompt
from kblampp.inference.generate import generate_rows
from kblampp.kb_context import KBContext
from kblampp.synth.families import DEFAULT_ABSTAIN_ANSWER


class KBModelAnswerer:
    """`answer(question, e_q, tau, max_new_tokens, abstain) -> (text, ctx.records, decision)` for the engine;
    `decision` is None without an abstention decision (or with `abstain=False`), else
    {"abstained", "p_unanswerable", "threshold"}; an abstaining model writes `abstain_answer`."""

    def __init__(self, model: Any, tokenizer: Any, kb: Any, tail_max_len: int = 16, abstainer: Any = None,
                 abstain_answer: str = DEFAULT_ABSTAIN_ANSWER):
        self.model, self.tokenizer, self.kb, self.tail_max_len = model, tokenizer, kb, tail_max_len
        self.abstainer, self.abstain_answer = abstainer, abstain_answer
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

    def anchor_fact(self, e_select: np.ndarray, e_search: np.ndarray) -> tuple[int, list[int]]:
        """The first retrieval of a succession / relative question (`kblampp.time_query.first_hop`):
        the anchor fact and the anchor's siblings it found."""
        from kblampp.time_query import first_hop

        layer = self.model.kb_layers[str(self.layer)]
        as_t = (lambda e: torch.as_tensor(np.asarray(e, np.float32))[None])
        ids, group = first_hop(layer, self.kb.source, as_t(e_select), as_t(e_search), with_group=True)
        return int(ids[0]), [int(x) for x in group[0].tolist() if x >= 0 and x != int(ids[0])]

    @torch.inference_mode()
    def answer(self, question: str, e_q: np.ndarray, tau: tuple[float, float] | None,
               max_new_tokens: int, abstain: bool = True, time_kind: int | None = None,
               forced_ids: list[int] | None = None) -> tuple[str, dict[int, list[Any]], dict | None]:
        device = next(self.model.parameters()).device
        window = (math.nan, math.nan) if tau is None else tau
        kind = None if time_kind is None else torch.tensor([time_kind], dtype=torch.long, device=device)
        forced = torch.tensor([forced_ids], dtype=torch.long, device=device) if forced_ids else None
        ctx = KBContext(source=self.kb.source, e_q=torch.as_tensor(np.asarray(e_q, np.float32))[None].to(device),
                        tau=torch.tensor([window], dtype=torch.float32, device=device), time_kind=kind,
                        forced_ids=forced, record=True)
        extra: dict[str, Any] = {}
        if self.gate is not None:
            from transformers import LogitsProcessorList

            from kblampp.answer_head import CopyLogitsProcessor

            extra["logits_processor"] = LogitsProcessorList(
                [CopyLogitsProcessor(self.tail_table(), ctx, self.layer, gate=self.gate)])
        decision = None
        if abstain and self.abstainer is not None:
            from transformers import LogitsProcessorList

            from kblampp.abstention import AbstainLogitsProcessor, answer_token_ids, decision_layers
            from kblampp.inference.generate import stop_token_id

            decision = AbstainLogitsProcessor(self.abstainer, ctx, decision_layers(self.model),
                                              answer_token_ids(self.tokenizer, self.abstain_answer),
                                              stop_token_id(self.tokenizer))
            extra.setdefault("logits_processor", LogitsProcessorList()).append(decision)  # the last word

        @contextlib.contextmanager
        def hook(indices: list[int], batch: dict) -> Iterator[dict]:
            with self.model.kb_request(ctx):
                yield extra

        prompt = build_prompt(self.tokenizer, question, self.instruction)
        gen = generate_rows(self.model, self.tokenizer, [prompt], max_new_tokens, batch_size=1, request=hook,
                            progress=False)[0]
        if decision is None:
            return gen.pred, ctx.records, None
        return gen.pred, ctx.records, {"abstained": bool(decision.abstained[0]), "p_unanswerable": float(decision.p[0]),
                                       "threshold": self.abstainer.threshold}
