"""ContextScorer starts as cosine; TimeScorer ranks matching windows first and is neutral without time."""
import datetime as dt
import math

import pytest
import torch
from torch.nn import functional as F

from kblampp.question_time import TIME_KINDS
from kblampp.scorers import (TIME_FEATURES, ContextScorer, TimeScorer, initial_kind_weights,
                              kind_index, kinds_from_windows, time_features, upgrade_legacy_weight)
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
    feats = time_features(q, f_min, f_max)[0, 0, :, :4]  # (4 facts, the 4 window features)
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
    start_gap_years = (q[0, 0] - f[0, 0, 0, 0]).item() / 365.25
    # overlap + full coverage + contains, no gap, and the start 0.83 years before the question's
    assert g[0].item() == pytest.approx(3.0 - math.log1p(start_gap_years), abs=1e-5)


def test_time_scorer_prefers_the_nearest_start_among_open_windows():
    """'from 2012 to 2014' against open-ended windows [2005, +inf), [2012, +inf), [2016, +inf): the
    first two overlap it alike, the one that began in 2012 wins (start closeness); the third is out."""
    q = torch.tensor([_days("2012", "2014")])
    f = torch.tensor([_days("2005", None), _days("2012", None), _days("2016", None)])[None, None]
    g = TimeScorer()(q, f[..., 0], f[..., 1], time_kind=torch.tensor([kind_index("between")]))[0, 0]
    assert g.argmax().item() == 1
    feats = time_features(q, f[..., 0], f[..., 1])[0, 0, :, TIME_FEATURES.index("start_closeness")]
    assert feats[1].item() == 0.0
    assert feats[0].item() == pytest.approx(-math.log1p((q[0, 0] - f[0, 0, 0, 0]).item() / 365.25))


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


# ---- typed constraints: order and succession ------------------------------------------------------

def _ceo_group():
    """Four CEOs of one company plus a fact of another (head, relation) that is alive throughout."""
    facts = [_days("1990", "1999-06-30"), _days("1999-07-01", "2004-12-31"), _days("2005-01-01", "2011-03-31"),
             _days("2011-04-01", None), _days("1950", None)]
    f = torch.tensor(facts)[None, None]  # (1, 1, 5, 2)
    group = torch.tensor([0, 0, 0, 0, 1])
    same = (group[:, None] == group[None, :])[None, None]  # (1, 1, 5, 5)
    return f[..., 0], f[..., 1], same


def _score(kind, start, end, scorer=None):
    f_min, f_max, same = _ceo_group()
    tau = torch.tensor([[math.nan, math.nan]]) if start is end is None else torch.tensor([_days(start, end)])
    kind_id = torch.tensor([kind_index(kind)])
    return (scorer or TimeScorer())(tau, f_min, f_max, time_kind=kind_id, same_group=same)[0, 0]


def test_before_ranks_latest_earlier_ceo_first_by_hand():
    """'before 2011' = (-inf, 2010-12-31): CEOs 0, 1, 2 began before it; 2 began latest (rank 0),
    1 has rank 1, 0 rank 2; CEO 3 began in April 2011 (not eligible, 91 days after the window)."""
    g = _score("before", None, "2010")
    gap3 = math.log1p(91 / 365.25)
    raw = [1 + 6 / 3, 1 + 6 / 2, 1 + 6 / 1, -gap3]  # overlap + 6 * closeness - log gap
    want = [r - 7.0 for r in raw] + [0.0]  # centred on each group's best (7; fact 4 is alone)
    assert g.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert (g[2] - max(g[0], g[1], g[3])).item() == pytest.approx(3.0, rel=1e-5)


def test_after_ranks_next_ceo_above_open_ended_current_one():
    """'after 2004' = (2005-01-01, inf): CEO 2 (2005-2011) is the earliest ending of those valid then (rank 0), the
    open-ended current CEO 3 rank 1; CEO 1 ended on 2004-12-31, one day before."""
    g = _score("after", "2005", None)
    gap0 = (dt.date(2005, 1, 1) - dt.date(1999, 6, 30)).days  # 2012 days
    raw = [-math.log1p(gap0 / 365.25), -math.log1p(1 / 365.25), 1 + 6.0, 1 + 3.0]
    assert g.tolist() == pytest.approx([r - 7.0 for r in raw] + [0.0], rel=1e-5, abs=1e-6)
    assert g[2] > g[3] > g[1] > g[0]


def test_first_last_need_no_dates_and_current_is_a_point():
    assert _score("first", None, None).argmax().item() in (0, 4)  # 4 is its own group's first
    g_first = _score("first", None, None)
    assert g_first[:4].tolist() == pytest.approx([0.0, -3.0, -4.0, -4.5])  # 6 / (1 + rank), minus 6
    g_last = _score("last", None, None)
    assert g_last[:4].tolist() == pytest.approx([-4.5, -4.0, -3.0, 0.0])
    g_now = _score("current", "2020-05-01", "2020-05-01")
    # a one-day window: CEO 3 overlaps and contains it (2), the others are disjoint (negative)
    assert g_now[:4].argmax().item() == 3 and g_now[3].item() == 0.0 and (g_now[:3] < -2.0).all()


def test_just_before_right_after_for_succession_anchor():
    """'who succeeded CEO 1' becomes right_after (day after CEO 1's end); 'who preceded CEO 2'
    becomes just_before (day before CEO 2's start): the neighbours win, the anchor itself does not."""
    g = _score("right_after", "2005-01-01", None)
    assert g[:4].argmax().item() == 2
    g = _score("just_before", None, "2004-12-31")
    assert g[:4].argmax().item() == 1


def test_rank_counts_only_siblings_in_the_same_group():
    f_min, f_max, same = _ceo_group()
    tau, kind = torch.tensor([_days(None, "2010")]), torch.tensor([kind_index("before")])
    alone = TimeScorer()(tau, f_min, f_max, time_kind=kind)[0, 0]  # no groups: every fact rank 0
    assert alone[:3].tolist() == pytest.approx([7.0, 7.0, 7.0])
    index = torch.tensor([[0, 1, 2, 3]] * 4 + [[4, -1, -1, -1]])  # every fact's siblings, as in training
    listed = TimeScorer()(tau, f_min, f_max, time_kind=kind, sibling_index=index)
    assert torch.allclose(listed, TimeScorer()(tau, f_min, f_max, time_kind=kind, same_group=same))


def test_kind_none_and_undated_window_kinds_are_exactly_zero():
    f_min, f_max, same = _ceo_group()
    scorer = TimeScorer()
    tau = torch.tensor([[math.nan, math.nan], [math.nan, math.nan], _days("2000", "2000")])
    kinds = torch.tensor([kind_index("relative"), kind_index("last"), kind_index("none")])
    g = scorer(tau, f_min.expand(3, 1, 5), f_max.expand(3, 1, 5), time_kind=kinds,
               same_group=same.expand(3, 1, 5, 5))
    assert torch.equal(g[0], torch.zeros(1, 5)) and torch.equal(g[2], torch.zeros(1, 5))
    assert g[1, 0, 3].item() == 0.0 and (g[1, 0, :3] < 0).all()  # "last": no dates needed


def test_window_only_callers_read_the_kind_from_the_window():
    q = torch.tensor([_days(None, "2010"), _days("2005", None), _days("2000", "2000"), [math.nan, math.nan]])
    assert [TIME_KINDS[i] for i in kinds_from_windows(q).tolist()] == ["before", "after", "at", "none"]


def test_kind_weights_are_learnable_per_kind():
    scorer = TimeScorer()
    _score("before", None, "2010", scorer).sum().backward()
    grad = scorer.weight.grad
    assert grad[kind_index("before")].abs().sum() > 0
    others = [i for i in range(len(TIME_KINDS)) if i != kind_index("before")]
    assert torch.equal(grad[others], torch.zeros(len(others), len(TIME_FEATURES)))


def test_unknown_kind_and_legacy_weight():
    with pytest.raises(ValueError, match="time kind 'sometime' is not one of none, at"):
        kind_index("sometime")
    w = upgrade_legacy_weight(torch.tensor([0.5, 2.0, 1.5, -0.25]))
    assert w[kind_index("at"), :4].tolist() == [0.5, 2.0, 1.5, -0.25]
    assert torch.equal(w[kind_index("before")], initial_kind_weights()[kind_index("before")])
    with pytest.raises(ValueError, match=r"legacy time-scorer weight must have shape \(4,\) or \(11, <15\), got \(3,\)"):
        upgrade_legacy_weight(torch.zeros(3))


def test_weight_without_closeness_column_scores_as_before():
    """A per-kind matrix written before the closeness column gets a zero column: every score is its old score."""
    old = initial_kind_weights()[:, :-1] + 0.25  # a trained (kinds, 14) matrix
    new = upgrade_legacy_weight(old)
    assert torch.equal(new[:, :-1], old) and torch.equal(new[:, -1], torch.zeros(len(TIME_KINDS)))
    q = torch.tensor([_days("2012", "2014")])
    f = torch.tensor([_days("2005", None), _days("2012", "2013"), _days("2016", None)])[None, None]
    scorer = TimeScorer()
    with torch.no_grad():
        scorer.weight.copy_(new)
    feats = time_features(q, f[..., 0], f[..., 1])[0, 0, :, :-1]  # (3, 14): the old features
    got = scorer(q, f[..., 0], f[..., 1], time_kind=torch.tensor([kind_index("between")]))[0, 0]
    assert torch.allclose(got, feats @ old[kind_index("between")], atol=1e-6)
