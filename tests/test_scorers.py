"""ContextScorer starts as cosine; TimeScorer ranks matching windows first and is neutral without time."""
import math

import pytest
import torch
from torch.nn import functional as F

from kblampp.scorers import ContextScorer, TimeScorer, time_features
from kblampp.timewin import window_days

INF = math.inf


def test_context_scorer_is_cosine_at_init():
    torch.manual_seed(0)
    e_q, ctx = torch.randn(2, 8), torch.randn(2, 3, 4, 8)
    phi = ContextScorer(8)(e_q, ctx)
    assert phi.shape == (2, 3, 4)
    want = F.cosine_similarity(e_q[:, None, None, :], ctx, dim=-1)
    torch.testing.assert_close(phi, want, rtol=1e-5, atol=1e-6)


def test_context_scorer_neutral_without_question_vector_and_learnable():
    scorer = ContextScorer(8)
    assert torch.equal(scorer(None, torch.randn(2, 3, 4, 8)), torch.zeros(2, 3, 4))
    scorer(torch.randn(2, 8), torch.randn(2, 3, 4, 8)).sum().backward()
    assert scorer.weight.grad is not None and scorer.weight.grad.abs().sum() > 0


def test_time_features_hand_example():
    q = torch.tensor([[100.0, 199.0]])
    f_min = torch.tensor([[[150.0, 400.0, 50.0, -INF]]])
    f_max = torch.tensor([[[300.0, 500.0, 250.0, INF]]])
    feats = time_features(q, f_min, f_max)[0, 0]  # (4 facts, 4 features)
    assert feats[0].tolist() == pytest.approx([1.0, 49.0 / 99.0, 0.0, 0.0])  # partial overlap
    assert feats[1].tolist() == pytest.approx([0.0, 0.0, 0.0, math.log1p(201.0 / 365.25)])  # 201 days apart
    assert feats[2].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])  # contains
    assert feats[3].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])  # open both ends: contains everything


def _days(start, end):
    return list(window_days(start, end))


def test_time_scorer_ranks_matching_fact_first():
    """Question 'in 2020': CEO 2019-present > CEO 2015-2020 (overlap) > CEO 2010-2014 > CEO 1990-1995."""
    q = torch.tensor([_days("2020", "2020")])
    facts = [_days("2019-03-02", None), _days("2015", "2020-06"), _days("2010", "2014"), _days("1990", "1995")]
    f = torch.tensor(facts)[None, None]  # (1, 1, 4, 2)
    g = TimeScorer()(q, f[..., 0], f[..., 1])[0, 0]
    assert g[0] > g[1] > g[2] > g[3]
    assert g[0].item() == pytest.approx(3.0)  # overlap + full coverage + contains, no gap


def test_time_scorer_open_question_window():
    """'after 2018': a fact from 2019 on contains it; one that ended in 2010 is disjoint."""
    q = torch.tensor([_days("2018", None)])
    f = torch.tensor([_days("2017", None), _days("2000", "2010")])[None, None]
    g = TimeScorer()(q, f[..., 0], f[..., 1])[0, 0]
    assert g[0] > 0 > g[1]


def test_time_scorer_neutral_without_time_per_row():
    scorer = TimeScorer()
    f_min, f_max = torch.rand(2, 3, 4) * 1000, 1000 + torch.rand(2, 3, 4) * 1000
    assert torch.equal(scorer(None, f_min, f_max), torch.zeros(2, 3, 4))
    q = torch.tensor([[math.nan, math.nan], [1200.0, 1300.0]])
    g = scorer(q, f_min, f_max)
    assert torch.equal(g[0], torch.zeros(3, 4))
    assert (g[1] != 0).any()
    g.sum().backward()
    assert scorer.weight.grad is not None and torch.isfinite(scorer.weight.grad).all()
    assert scorer.weight.grad.abs().sum() > 0
