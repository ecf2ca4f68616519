"""K/V encoder: time features, seeded init, identity-like key start, save/load round trip and hash."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from kblampp.kv_encoder import (DAY_2000, KVEncoder, KVEncoderConfig, load_kv_encoder, save_kv_encoder,
                                time_features, weights_hash)


def test_time_features_flags_and_decades():
    lo = torch.tensor([-math.inf, DAY_2000, DAY_2000 + 3652.5])
    hi = torch.tensor([math.inf, math.inf, DAY_2000 + 2 * 3652.5])
    f = time_features(lo, hi)
    assert f.tolist() == [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 2.0]]


def test_seeded_init_is_deterministic_and_seed_dependent():
    a, b, c = KVEncoder(16, 16, 16, 8, hidden=32, seed=3), KVEncoder(16, 16, 16, 8, hidden=32, seed=3), \
        KVEncoder(16, 16, 16, 8, hidden=32, seed=4)
    assert weights_hash(a) == weights_hash(b) != weights_hash(c)
    assert all(n.startswith("kb_") for n, _ in a.named_parameters())


def test_keys_start_as_mean_of_head_and_relation():
    enc = KVEncoder(16, 16, 12, 8, hidden=32, seed=0)
    e_h, e_r = torch.randn(5, 16), torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_keys(e_h, e_r), (e_h + e_r) / 2)
    proj = KVEncoder(16, 8, 12, 8, hidden=32).kb_key_mlp.base.weight[:, :16] * 2  # (8,16) orthonormal rows
    torch.testing.assert_close(proj @ proj.T, torch.eye(8), atol=1e-5, rtol=0)


def test_values_depend_on_tail_sentence_and_time():
    enc = KVEncoder(16, 16, 16, 8, hidden=32, seed=0)
    e_t, e_c = torch.randn(2, 16), torch.randn(2, 16)
    lo, hi = torch.tensor([0.0, 0.0]), torch.tensor([math.inf, math.inf])
    with torch.no_grad():
        base = enc.encode_values(e_t, e_c, lo, hi)
        assert base.shape == (2, 16)
        assert not torch.allclose(base, enc.encode_values(e_t, e_c + 1, lo, hi))
        assert not torch.allclose(base, enc.encode_values(e_t, e_c, lo + 5000, hi))
        assert not torch.allclose(base, enc.encode_values(e_t + 1, e_c, lo, hi))


def test_save_load_round_trip_keeps_config_and_hash(tmp_path):
    enc = KVEncoder(16, 12, 10, 4, hidden=24, seed=7)
    h = save_kv_encoder(enc, tmp_path / "kv.safetensors")
    back = load_kv_encoder(tmp_path / "kv.safetensors")
    assert back.config == enc.config and weights_hash(back) == h == weights_hash(enc)


def test_load_from_training_checkpoint_with_prefix(tmp_path):
    enc = KVEncoder(16, 12, 10, 4, hidden=24, seed=1)
    prefixed = {f"kb_model.layers.8.{k}": v.clone() for k, v in enc.state_dict().items()}
    prefixed["kb_linear_q.weight"] = torch.zeros(3, 3)
    save_file(prefixed, str(tmp_path / "ckpt.safetensors"))
    back = load_kv_encoder(tmp_path / "ckpt.safetensors", KVEncoderConfig(16, 12, 10, 4, 24))
    assert weights_hash(back) == weights_hash(enc)


def test_load_errors_name_the_problem(tmp_path):
    enc = KVEncoder(16, 12, 10, 4, hidden=24)
    sd = {k: v for k, v in enc.state_dict().items() if k != "kb_time_mlp.net.0.bias"}
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="tensor 'kb_time_mlp.net.0.bias' missing"):
        load_kv_encoder(tmp_path / "partial.safetensors", enc.config)
    with pytest.raises(ValueError, match="tensor 'kb_time_mlp.net.0.bias' missing"):
        load_kv_encoder(tmp_path / "partial.safetensors")  # config read off the shapes
    with pytest.raises(ValueError, match=r"kb_key_mlp.base.weight: shape \(12, 32\) != expected \(8, 32\)"):
        load_kv_encoder(tmp_path / "partial.safetensors", KVEncoderConfig(16, 8, 10, 4, 24))
