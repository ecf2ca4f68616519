"""KBFusionLayer starts as the identity fusion (zero knowledge term) and still learns."""
import torch

from kblampp.fusion import KBFusionLayer


def test_zero_at_init_gate_in_unit_interval():
    torch.manual_seed(0)
    layer = KBFusionLayer(d_model=16, d_v=8)
    h, v = torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    delta, beta = layer(h, v)
    assert torch.equal(delta, torch.zeros(2, 5, 16))
    assert beta.shape == (2, 5) and (beta > 0).all() and (beta < 1).all()
    torch.testing.assert_close(beta, torch.sigmoid(h @ layer.kb_gate.weight[0] - 3.0))
    assert (beta < 0.1).all()  # gate bias -3: starts mostly closed


def test_fuse_formula_and_gradients():
    torch.manual_seed(0)
    layer = KBFusionLayer(d_model=16, d_v=8)
    h, v, text = torch.randn(2, 5, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 16)
    delta, beta = layer(h, v)
    delta.sum().backward()
    assert layer.kb_linear_v.weight.grad.abs().sum() > 0  # zero init still learns
    with torch.no_grad():
        layer.kb_linear_v.weight.normal_()
    delta, beta = layer(h, v)
    kb_out = layer.kb_linear_v(v)
    assert torch.equal(KBFusionLayer.fuse(text, beta, kb_out), text + beta[..., None] * kb_out)
    torch.testing.assert_close(text + delta, KBFusionLayer.fuse(text, beta, kb_out))
