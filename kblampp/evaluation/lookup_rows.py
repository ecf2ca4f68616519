"""The `lookup` and `lookup_chain` rows of the table: built once per run (fact texts embedded once),
tuned on the dev split (abstention floor, chain-length biases), then answering any questions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kblampp.evaluation.lookup import (DevGolds, FactTable, LookupAnswer, LookupCandidates, LookupSettings, TextVectors,
                                       build_fact_table, lookup_answers, lookup_candidates, tune_abstention)
from kblampp.evaluation.lookup_chain import ChainSettings, chain_answers, chain_candidates, tune_chain
from kblampp.name_link import NameIndex
from kblampp.schema import QARecord

LOOKUP_ROWS = ("lookup", "lookup_chain")


@dataclass
class LookupRows:
    """Both no-LLM rows over one KB; `tune` once on dev, then `answer` the test questions."""

    table: FactTable
    embed: Any
    abstain_answer: str
    lookup_settings: LookupSettings = field(default_factory=LookupSettings)
    chain_settings: ChainSettings = field(default_factory=lambda: ChainSettings(np.zeros(3), LookupSettings()))
    chain_vecs: TextVectors | None = None
    tuned_on: str = "not tuned (no dev split)"
    setup_s: float = 0.0  # embedding the fact texts and tuning on dev
    reference_date: str | None = None  # what "now" means in a question
    names: NameIndex | None = None  # `name_link`: `lookup` tries the facts a question names first
    name_limit: int = 64

    def _linked(self, questions: Sequence[str]) -> list[list[int]] | None:
        return None if self.names is None else [self.names.link(q, self.name_limit) for q in questions]

    @classmethod
    def build(cls, facts: Sequence[Any], embed: Any, abstain_answer: str, alive: np.ndarray | None = None,
              reference_date: str | None = None) -> "LookupRows":
        t0 = time.perf_counter()
        table = build_fact_table(facts, embed, alive)
        return cls(table, embed, abstain_answer, chain_vecs=TextVectors(embed), setup_s=time.perf_counter() - t0,
                   reference_date=reference_date)

    def _candidates(self, records: Sequence[QARecord], q_vecs: np.ndarray | None = None) -> tuple[LookupCandidates, Any]:
        questions = [r.question for r in records]
        q = np.asarray(self.embed(questions) if q_vecs is None else q_vecs, dtype=np.float32)
        cands = lookup_candidates(self.table, q, questions, self.reference_date, self._linked(questions))
        return cands, chain_candidates(self.table, self.chain_vecs, q, questions, cands.outside,
                                       reference_date=self.reference_date)

    def tune(self, dev: Sequence[QARecord], label: str) -> None:
        """Abstention knobs of `lookup`, biases + knobs of `lookup_chain`, each by best dev EM."""
        if not dev:
            return
        t0 = time.perf_counter()
        cands, chain = self._candidates(dev)
        found = [self.table.facts[f].tail_name if f is not None else "" for f in cands.fact]
        golds = DevGolds.score(found, dev, self.abstain_answer)
        self.lookup_settings = tune_abstention(cands.score, cands.outside, cands.found, golds)
        self.chain_settings = tune_chain(self.table, chain, dev, self.abstain_answer)
        self.tuned_on = f"tuned on {label} ({len(dev)} questions)"
        self.setup_s += time.perf_counter() - t0

    def answer(self, records: Sequence[QARecord], q_vecs: np.ndarray | None = None
               ) -> tuple[dict[str, list[LookupAnswer]], dict[str, float]]:
        """Answers of both rows and the seconds each took."""
        questions = [r.question for r in records]
        q = np.asarray(self.embed(questions) if q_vecs is None else q_vecs, dtype=np.float32)
        t0 = time.perf_counter()
        cands = lookup_candidates(self.table, q, questions, self.reference_date, self._linked(questions))
        found = lookup_answers(self.table, cands, self.lookup_settings, self.abstain_answer)
        t1 = time.perf_counter()
        chain = chain_candidates(self.table, self.chain_vecs, q, questions, cands.outside,
                                 reference_date=self.reference_date)
        chained = chain_answers(self.table, chain, self.chain_settings, self.abstain_answer)
        t2 = time.perf_counter()
        return {"lookup": found, "lookup_chain": chained}, {"lookup": t1 - t0, "lookup_chain": t2 - t0}

    def describe(self) -> str:
        """One line for the report's notes: how both rows were set."""
        ls, cs = self.lookup_settings, self.chain_settings
        linking = "" if self.names is None else "; lookup first tries the facts whose head the question names"
        return (f"lookup rows {self.tuned_on}{linking}: lookup abstains below similarity {ls.min_score} "
                f"(time-outside rule {'on' if ls.abstain_on_time else 'off'}); lookup_chain length biases "
                f"{[round(float(b), 2) for b in cs.bias]} for 1/2/3 hops, abstains below {cs.abstain.min_score} "
                f"(time-outside rule {'on' if cs.abstain.abstain_on_time else 'off'}); embedding the KB's fact "
                f"texts and tuning took {self.setup_s:.0f} s.")


def load_dev(path: str | Path | None, num_facts: int) -> tuple[list[QARecord], str]:
    """The dev QA records used for tuning (empty when the file is missing)."""
    from kblampp.schema import load_qa

    if not path or not Path(path).is_file():
        return [], ""
    return list(load_qa(path, num_facts=num_facts)), str(path)
