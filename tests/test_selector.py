"""KBSelector: s = sem + gamma*phi + eta*g_time, alpha = softmax(s/T), V~ = sum alpha V, by hand."""
import math

import pytest
import torch

from kblampp.selector import KBSelector


def test_selector_matches_hand_computation():
    sem = torch.tensor([[[1.0, 0.0, -1.0]]])
    phi = torch.tensor([[[0.5, 1.0, 0.0]]])
    g = torch.tensor([[[0.0, -1.0, 2.0]]])
    V = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]]])
    ids = torch.tensor([[[7, 3, 9]]])
    out = KBSelector(gamma=0.5, eta=2.0, temperature=2.0)(sem, phi, g, V, ids)
    s = [1.0 + 0.5 * 0.5 + 0.0, 0.0 + 0.5 * 1.0 - 2.0, -1.0 + 0.0 + 4.0]  # [1.25, -1.5, 3.0]
    e = [math.exp(x / 2.0) for x in s]
    alpha = [x / sum(e) for x in e]
    v = [alpha[0] * 1.0 + alpha[2] * 2.0, alpha[1] * 1.0 + alpha[2] * 2.0]
    assert out.alpha[0, 0].tolist() == pytest.approx(alpha, rel=1e-6)
    assert out.v_tilde[0, 0].tolist() == pytest.approx(v, rel=1e-6)
    assert torch.equal(out.cand_ids, ids)
    assert out.alpha.sum(-1).item() == pytest.approx(1.0, abs=1e-6)


def test_alpha_sums_to_one_and_masks_missing():
    torch.manual_seed(0)
    sem, phi, g = torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    valid = torch.ones(3, 5, 4, dtype=torch.bool)
    valid[..., 3] = False
    out = KBSelector(1.0, 1.0)(sem, phi, g, torch.randn(3, 5, 4, 6), torch.zeros(3, 5, 4, dtype=torch.long), valid)
    torch.testing.assert_close(out.alpha.sum(-1), torch.ones(3, 5))
    assert torch.equal(out.alpha[..., 3], torch.zeros(3, 5))
    assert out.v_tilde.shape == (3, 5, 6)


def test_gamma_eta_zero_is_semantic_only():
    sem = torch.randn(2, 3, 4)
    a = KBSelector(0.0, 0.0)(sem, torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4, 5), None)
    assert torch.equal(a.alpha, torch.softmax(sem, -1))


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        KBSelector(1.0, 1.0, temperature=0.0)
