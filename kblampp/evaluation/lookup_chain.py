"""`lookup_chain`: `lookup` that follows tails, for multi-hop questions; no LLM.

The question's entity is found as in `lookup` (the heads of its two best-matching fact texts). From
it every chain of up to `max_hops` facts is followed (a tail becomes the next head), each chain is
written as "head relation1 relation2 ..." and embedded with the same model, and the best chain by
similarity to the question, plus a per-length bias, gives its last tail. The number of hops is thus
decided by scores alone, never by the record's type; the two biases (2 and 3 hops) and the
abstention knobs are tuned on the dev split. Time: every hop keeps the facts overlapping the window
parsed from the question; with no time in the question, a hop after a dated fact keeps the facts
overlapping that fact's window ("who led its organiser at the time of the expo").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kblampp.evaluation.lookup import (DevGolds, FactTable, LookupAnswer, LookupSettings, TextVectors, abstain_mask,
                                       entity_key, in_time, normalise_rows, prefer_in_time, question_times,
                                       tune_abstention)
from kblampp.evaluation.parsed_time import QuestionTime
SEED_TEXTS = 2  # the question's entity = heads of this many best-matching fact texts
BIAS_GRID = np.round(np.arange(-0.30, 0.301, 0.01), 2)


def hop_facts(table: FactTable, head: str, qt: QuestionTime) -> list[int]:
    """In-time facts of one entity, one per relation text (the one the question's time points at)."""
    ids = table.by_head.get(head, [])
    groups: dict[int, list[int]] = {}
    for i, ok in zip(ids, in_time(table, ids, qt.tau)):
        if ok:
            groups.setdefault(int(table.text_id[i]), []).append(i)
    return [prefer_in_time(table, g, qt) for g in groups.values()]


def _after_hop(table: FactTable, i: int, qt: QuestionTime) -> QuestionTime:
    """The next hop's time: the question's when it has dates, else the window of the dated fact just
    followed (a fact without a window leaves it as it was)."""
    if qt.tau is not None:
        return qt
    lo, hi = float(table.tau_min[i]), float(table.tau_max[i])
    return qt if np.isinf(lo) and np.isinf(hi) else QuestionTime("relative", (lo, hi))


def chains(table: FactTable, heads: Sequence[str], qt: QuestionTime | tuple[float, float] | None,
           max_hops: int = 3) -> list[tuple[int, ...]]:
    """Every chain of 1..max_hops facts from `heads` (no entity visited twice), time-filtered per hop."""
    if not isinstance(qt, QuestionTime):
        qt = QuestionTime("none" if qt is None else "at", qt)
    out: list[tuple[int, ...]] = []

    def extend(path: tuple[int, ...], head: str, seen: frozenset[str], hop_time: QuestionTime) -> None:
        for i in hop_facts(table, head, hop_time):
            f = table.facts[i]
            out.append(path + (i,))
            nxt = entity_key(f.tail_id, f.tail_name)
            if len(path) + 1 < max_hops and nxt not in seen:
                extend(path + (i,), nxt, seen | {nxt}, _after_hop(table, i, hop_time))

    for head in dict.fromkeys(heads):
        extend((), head, frozenset([head]), qt)
    return out


def chain_text(table: FactTable, path: Sequence[int]) -> str:
    """What a chain is matched on: its first head and its relations in order, never a tail."""
    first = table.facts[path[0]]
    return " ".join([first.head_name] + [table.facts[i].relation_name for i in path])


def seed_heads(table: FactTable, q_vec: np.ndarray, n: int | None = None) -> list[str]:
    """The heads of the `n` (default SEED_TEXTS) fact texts most similar to the question."""
    best = np.argsort(-(table.text_vecs @ q_vec), kind="stable")[:n or SEED_TEXTS]
    heads = []
    for t in best:
        for i in table.facts_of_text.get(int(t), []):
            heads.append(entity_key(table.facts[i].head_id, table.facts[i].head_name))
    return list(dict.fromkeys(heads))


@dataclass
class ChainCandidates:
    """Per question and chain length (1..max_hops): the best chain, its similarity (-inf = none)."""

    paths: list[list[tuple[int, ...] | None]]
    score: np.ndarray  # (n, max_hops)
    outside: np.ndarray  # (n,) the best fact text had facts, none in the question's time

    def choose(self, bias: np.ndarray) -> np.ndarray:
        """Chosen chain length index per question under per-length `bias`."""
        return np.argmax(self.score + bias[None, :], axis=1)


def chain_candidates(table: FactTable, chain_vecs: TextVectors, q_vecs: np.ndarray, questions: Sequence[str],
                     outside: np.ndarray, max_hops: int = 3, reference_date: str | None = None) -> ChainCandidates:
    """The best chain of every length for every question (its time parsed from the text)."""
    q = normalise_rows(q_vecs)
    times = question_times(table, q, questions, reference_date)
    all_paths = [chains(table, seed_heads(table, q[n]), times[n], max_hops) for n in range(len(questions))]
    text_ids = chain_vecs.ids([chain_text(table, p) for paths in all_paths for p in paths])  # one embedding pass
    paths_out, scores, offset = [], np.full((len(questions), max_hops), -np.inf), 0
    for n, paths in enumerate(all_paths):
        sims = chain_vecs.vecs[text_ids[offset:offset + len(paths)]] @ q[n]
        offset += len(paths)
        best: list[tuple[int, ...] | None] = [None] * max_hops
        for p, s in zip(paths, sims):  # first best wins ties (stable in enumeration order)
            if s > scores[n, len(p) - 1]:
                scores[n, len(p) - 1], best[len(p) - 1] = float(s), p
        paths_out.append(best)
    return ChainCandidates(paths_out, scores, np.asarray(outside, bool))


@dataclass
class ChainSettings:
    """Per-length biases (1 hop = 0) and the abstention knobs, all tuned on dev."""

    bias: np.ndarray
    abstain: LookupSettings


def chain_answers(table: FactTable, cands: ChainCandidates, settings: ChainSettings,
                  abstain_answer: str) -> list[LookupAnswer]:
    """Answers of `lookup_chain` under `settings`."""
    length = cands.choose(settings.bias)
    score = cands.score[np.arange(len(length)), length] + settings.bias[length]
    found = np.isfinite(score)
    abstain = abstain_mask(score, cands.outside, found, settings.abstain)
    out = []
    for n, (k, s, a) in enumerate(zip(length, score, abstain)):
        path = list(cands.paths[n][k] or [])
        if a or not path:
            out.append(LookupAnswer(abstain_answer, path, float(s), True))
        else:
            out.append(LookupAnswer(table.facts[path[-1]].tail_name, path, float(s)))
    return out


def tune_chain(table: FactTable, cands: ChainCandidates, records: Sequence, abstain_answer: str) -> ChainSettings:
    """Biases with the best dev EM (ties: nearest 0), then the abstention knobs on the chosen chains."""
    max_hops = cands.score.shape[1]
    tails = [[table.facts[p[-1]].tail_name if p else "" for p in paths] for paths in cands.paths]
    right = np.stack([DevGolds.score([t[k] for t in tails], records, abstain_answer).right_if_answered
                      for k in range(max_hops)], axis=1)  # (n, max_hops)
    best_bias, best_em = np.zeros(max_hops), -1.0
    grids = np.stack(np.meshgrid(*([BIAS_GRID] * (max_hops - 1)), indexing="ij"), -1).reshape(-1, max_hops - 1)
    for extra in sorted(grids, key=lambda b: float(np.abs(b).sum())):
        bias = np.concatenate([[0.0], extra])
        em = float(right[np.arange(len(right)), cands.choose(bias)].mean()) if len(right) else 0.0
        if em > best_em + 1e-12:
            best_bias, best_em = bias, em
    length = cands.choose(best_bias)
    score = cands.score[np.arange(len(length)), length] + best_bias[length]
    dev = DevGolds(right[np.arange(len(length)), length],
                   DevGolds.score([abstain_answer] * len(records), records, abstain_answer).right_if_answered)
    return ChainSettings(best_bias, tune_abstention(score, cands.outside, np.isfinite(score), dev))
