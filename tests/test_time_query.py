"""Question text -> typed constraint -> (tau, time_kind); anchored constraints (succession, relative)
get their dates from a first retrieval through the layer's own query."""
import math

import numpy as np
import pytest
import torch

from kblampp.injection_wrapper import KBInjection
from kblampp.question_time import TIME_KINDS, TimeConstraint
from kblampp.retrieval import TensorKB
from kblampp.time_query import (AnchorFact, anchor_days, anchored, constraint_days, first_hop, gold_anchor_times,
                                needs_anchor, query_vectors, question_times, relative_query_text, window_satisfies)
from kblampp.timewin import window_days

C = TimeConstraint


def test_anchored_dates_by_hand():
    lo, hi = window_days("2001-03-01", "2005-06-30")
    assert anchored(C("just_before", None, None, "X as CEO of Y"), lo, hi) == C(
        "just_before", None, "2001-02-28", "X as CEO of Y")
    assert anchored(C("right_after", None, None, "X as CEO of Y"), lo, hi) == C(
        "right_after", "2005-07-01", None, "X as CEO of Y")
    assert anchored(C("relative", None, None, "X was CEO of Y"), lo, hi) == C(
        "relative", "2001-03-01", "2005-06-30", "X was CEO of Y")
    assert anchored(C("right_after", None, None, "X"), lo, math.inf).start is None  # still in office


def test_anchor_days_a_beginning_stands_for_its_start_period():
    rel, succ = C("relative", None, None, "Y was founded"), C("right_after", None, None, "X")
    # "in the year Y was founded": a year-precision start stands for the whole year, a day for that day
    assert anchor_days(rel, "founded by", "1993", None) == window_days("1993", "1993")
    assert anchor_days(rel, "founded by", "1971-05-02", None) == window_days("1971-05-02", "1971-05-02")
    assert anchored(rel, *anchor_days(rel, "founded by", "1993", None)) == C(
        "relative", "1993-01-01", "1993-12-31", "Y was founded")
    # a tenure stands for its whole window; succession always reads the whole window
    assert anchor_days(rel, "chief executive officer", "1990", "1994") == window_days("1990", "1994")
    assert anchor_days(succ, "founded by", "1993", None) == window_days("1993", None)


def test_relative_query_text_cuts_the_clause_and_follows_a_chain():
    ceo = AnchorFact("chief executive officer", "1990", "1994", "Acme", "Ann Lee")
    q = "When Ann Lee was CEO of Acme, who was the CEO of Bolt?"
    assert relative_query_text(q, ceo) == "Who was the CEO of Bolt?"
    assert relative_query_text("Which company employed Bo Chan while Ann Lee was CEO of Acme?", ceo) == (
        "Which company employed Bo Chan?")
    organiser = AnchorFact("organised by", "2024-08", "2024-08", "Cobalt Expo", "Rowe Analytics")
    # what is left still asks about the anchor's head, or only says "its": the answer is about its tail
    assert relative_query_text("Who led the organiser of the Cobalt Expo at the time of the event?", organiser) == (
        "Who led the organiser of the Cobalt Expo? Rowe Analytics")
    assert relative_query_text("At the time of the Cobalt Expo, who was the chief executive of its organiser?",
                               organiser) == "Who was the chief executive of its organiser? Rowe Analytics"
    assert relative_query_text("Who was the CEO of Bolt at the time of the Cobalt Expo?", organiser) == (
        "Who was the CEO of Bolt?")
    assert relative_query_text("Who was the CEO of Bolt in 1999?", None) == "Who was the CEO of Bolt in 1999?"


def test_question_times_parse_and_tensors_without_a_kb():
    qs = ["Who was CEO of Y before 2011?", "Who is the CEO of Y now?", "Who was the first CEO of Y?",
          "Who succeeded Ann Lee as CEO of Y?", "Where was Bob born?"]
    t = question_times(qs, reference_date="2024-12-31")
    tau, kind = t.tensors()
    assert [TIME_KINDS[k] for k in kind.tolist()] == ["before", "current", "first", "right_after", "none"]
    assert tau[0].tolist() == [-math.inf, window_days(None, "2010")[1]]
    assert tau[1].tolist() == list(window_days("2024-12-31", "2024-12-31"))
    assert all(math.isnan(x) for x in tau[2].tolist() + tau[3].tolist() + tau[4].tolist())
    assert needs_anchor(t.parsed[3]) and t.anchor_facts == [None] * 5 and t.used == t.parsed


WINDOWS = {0: ("1990", "1999"), 1: ("2000", "2004"), 2: ("2005", None), 3: ("1950", None)}


def _succession_kb(d=8):
    """Facts 0-2: CEOs of one company (same key); fact 3: elsewhere. Evidence vectors tell them apart."""
    K = torch.zeros(4, d)
    K[:3, 0] = 1.0
    K[3, 1] = 1.0
    ctx = torch.eye(d)[4:8]  # fact i's evidence points along axis 4 + i
    lo, hi = zip(window_days("1990", "1999"), window_days("2000", "2004"), window_days("2005", None),
                 window_days("1950", None))
    return TensorKB(K, torch.zeros(4, 3), ctx, torch.tensor(lo), torch.tensor(hi),
                    head_id=torch.tensor([0, 0, 0, 1]), rel_id=torch.zeros(4, dtype=torch.long))


def _layer(d=8):
    layer = KBInjection(0, d_model=6, d_k=d, d_v=3, d_ctx=d, k_top=4, gamma=1.0, eta=1.0, temperature=1.0)
    with torch.no_grad():
        layer.kb_linear_q.weight.zero_()
        layer.kb_linear_q.bias.zero_()
        layer.kb_query_ctx.weight.copy_(torch.eye(d) * 4.0)  # q = 4 e_anchor
    return layer


def test_first_hop_picks_the_anchor_by_evidence_and_resolves_succession():
    kb, layer = _succession_kb(), _layer()
    e = torch.zeros(2, 8)
    e[0, 0], e[0, 5] = 1.0, 0.9  # "Ann Lee as CEO of Y": company key axis 0 + fact 1's evidence
    e[1, 0], e[1, 6] = 1.0, 0.9  # fact 2's evidence
    e = torch.nn.functional.normalize(e, dim=-1)
    assert first_hop(layer, kb, e).tolist() == [1, 2]
    t = question_times(["Who succeeded Ann Lee as CEO of Y?", "Who preceded Bo Chan as CEO of Y?"],
                       kb_layer=layer, source=kb, embed=lambda texts: e,
                       fact_time=lambda i: AnchorFact("chief executive officer", *WINDOWS[i]))
    assert t.anchor_facts == [1, 2]
    assert t.used[0] == C("right_after", "2005-01-01", None, "Ann Lee as CEO of Y")
    assert t.used[1] == C("just_before", None, "2004-12-31", "Bo Chan as CEO of Y")
    # the anchor's siblings the first hop saw are the second retrieval's only candidates (not fact 3: other head)
    assert [sorted(g) for g in t.hop_group] == [[0, 2], [0, 1]]
    forced = t.forced()
    assert forced.shape == (2, 2) and sorted(forced[0].tolist()) == [0, 2]
    ids, group = first_hop(layer, kb, e, with_group=True)
    assert ids.tolist() == [1, 2] and sorted(x for x in group[0].tolist() if x >= 0) == [0, 1, 2]
    assert question_times(["Who was the CEO of Y in 2001?"]).forced() is None
    assert t.excluded_ids() is None and t.query_text(0, "q") == "q"


def test_relative_question_excludes_the_anchor_group_and_queries_without_its_clause():
    kb, layer = _succession_kb(), _layer()
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0, 0, 0, 0.9, 0, 0]]), dim=-1)  # fact 1's evidence
    q = "When Ann Lee was CEO of Y, who was the CEO of Z?"
    t = question_times([q], kb_layer=layer, source=kb, embed=lambda texts: e,
                       fact_time=lambda i: AnchorFact("chief executive officer", *WINDOWS[i], "Y", "Ann Lee"))
    assert t.anchor_facts == [1] and t.used[0] == C("relative", "2000-01-01", "2004-12-31", "Ann Lee was CEO of Y")
    assert sorted(t.excluded[0]) == [0, 1, 2] and t.forced() is None
    assert t.query_text(0, q) == "Who was the CEO of Z?"
    assert t.select([0]).query_texts == ["Who was the CEO of Z?"]


def test_gold_anchor_times_and_window_satisfies():
    windows = {0: ("1990", "1999"), 5: ("1971-05-02", None)}
    parsed = [C("relative", None, None, "Y was founded"), C("at", "1995", "1995"), None]
    t = gold_anchor_times(parsed, [[5, 9], [0], []], lambda i: AnchorFact("founded by", *windows[i]))
    assert t.used[0] == C("relative", "1971-05-02", "1971-05-02", "Y was founded") and t.anchor_facts == [5, None, None]
    assert t.used[1:] == parsed[1:]
    lo, hi = constraint_days(t.used[1])
    assert window_satisfies(t.used[1], *window_days(*windows[0])) is True
    assert window_satisfies(t.used[1], *window_days("1996", None)) is False
    assert window_satisfies(None, lo, hi) is None


def test_gold_times_give_relative_query_texts_and_query_vectors_replace_only_those_rows():
    qs = ["When Ann Lee was CEO of Acme, who was the CEO of Bolt?", "Who succeeded Ann Lee as CEO of Acme?",
          "Who was the CEO of Bolt in 1999?"]
    parsed = [C("relative", None, None, "Ann Lee was CEO of Acme"), C("right_after", None, None, "Ann Lee as CEO of Acme"),
              C("at", "1999", "1999")]
    ceo = AnchorFact("chief executive officer", "1990", "1994", "Acme", "Ann Lee")
    t = gold_anchor_times(parsed, [[4, 7], [4, 8], [9]], lambda i: ceo, qs)
    assert t.query_texts == ["Who was the CEO of Bolt?", None, None]  # succession queries with the question
    embed = (lambda texts: np.array([[float(len(x)), 1.0] for x in texts], dtype=np.float32))
    q_vecs = embed(qs)
    out = query_vectors(embed, qs, t, q_vecs)
    assert out[0].tolist() == [float(len("Who was the CEO of Bolt?")), 1.0]
    assert np.array_equal(out[1:], q_vecs[1:]) and q_vecs[0, 0] == len(qs[0])  # the input is not modified
    as_torch = query_vectors(embed, qs, t, torch.from_numpy(q_vecs))
    assert isinstance(as_torch, torch.Tensor) and torch.equal(as_torch, torch.from_numpy(out))
