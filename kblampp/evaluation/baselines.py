"""Prompts of the rows that put facts (or nothing) into the prompt: backbone alone, in-context RAG,
oracle context. All go through `kblampp.backbone.build_prompt`, as the KBLaM++ rows do.

RAG retrieves with the SAME sentence-embedding model that embedded the KB: question embedding against
each fact's evidence-sentence embedding (the store keeps it as raw `e_c`), cosine, exact top-k.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from kblampp.backbone import SHORT_ANSWER_INSTRUCTION, build_prompt
from kblampp.schema import Fact, QARecord


def fact_text(fact: Fact) -> str:
    """What RAG embeds for a fact: its evidence sentence (what the store's `e_c` embeds too)."""
    return fact.sentence


class FactRetriever:
    """Exact cosine top-k over fact vectors (N, d); rows are normalised here, so any scale works."""

    def __init__(self, fact_vecs: np.ndarray, alive: np.ndarray | None = None):
        vecs = np.asarray(fact_vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] == 0:
            raise ValueError(f"FactRetriever: fact_vecs: expected a non-empty (N, d) array, got shape {vecs.shape}")
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        self.vecs = vecs / np.maximum(norms, 1e-12)
        self.alive = None if alive is None else np.asarray(alive, dtype=bool).reshape(-1)
        if self.alive is not None and self.alive.shape[0] != vecs.shape[0]:
            raise ValueError(f"FactRetriever: alive: {self.alive.shape[0]} flags for {vecs.shape[0]} facts")

    def topk(self, query_vecs: np.ndarray, k: int) -> np.ndarray:
        """(Q, k) fact ids, best first; ties broken by the lower index; deleted facts come last."""
        q = np.asarray(query_vecs, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.vecs.shape[1]:
            raise ValueError(f"FactRetriever: query_vecs: expected (Q, {self.vecs.shape[1]}), got {q.shape}")
        k = min(k, self.vecs.shape[0])
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        scores = q @ self.vecs.T
        if self.alive is not None:
            scores[:, ~self.alive] = -np.inf
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def backbone_prompts(tokenizer: Any, records: Sequence[QARecord], instruction: str = SHORT_ANSWER_INSTRUCTION
                     ) -> list[str]:
    """Backbone alone: the question and the short-answer instruction, nothing else."""
    return [build_prompt(tokenizer, r.question, instruction) for r in records]


def context_prompts(tokenizer: Any, records: Sequence[QARecord], facts: Sequence[Fact],
                    fact_ids: Sequence[Sequence[int]], instruction: str = SHORT_ANSWER_INSTRUCTION) -> list[str]:
    """The same prompt with the given facts written in (RAG: retrieved; oracle: supporting)."""
    if len(fact_ids) != len(records):
        raise ValueError(f"context_prompts: {len(fact_ids)} fact lists for {len(records)} questions")
    return [build_prompt(tokenizer, r.question, instruction, context_facts=[facts[i] for i in ids])
            for r, ids in zip(records, fact_ids)]


def oracle_fact_ids(records: Sequence[QARecord]) -> list[list[int]]:
    """Each question's supporting facts, in the record's order."""
    return [list(r.supporting_facts) for r in records]


def rag_fact_ids(retriever: FactRetriever, question_vecs: np.ndarray, k: int) -> list[list[int]]:
    """Top-k fact ids per question; the best fact is written last, nearest to the question."""
    return [row[::-1].tolist() for row in retriever.topk(question_vecs, k)]
