"""KB checkpoints: only kb_ tensors + the resolved config; load reproduces outputs; mismatches name tensors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from kblampp.config import KBConfig, config_from_dict, config_to_dict
from kblampp.kb_context import KBContext
from kblampp.kb_params import KBCheckpointError, is_kb_name, kb_state_dict, load_kb_checkpoint, save_kb_checkpoint
from kblampp.model import KBLaMPP
from kblampp.retrieval import random_tensor_kb
from tiny_models import TINY_MODELS

D_K, D_V, D_CTX = 16, 24, 12


def _model(arch, layers=(1,), seed=1, d_k=D_K):
    cfg = KBConfig(inject_layers=list(layers), d_k=d_k, d_v=D_V, K_top=4, d_ctx=D_CTX)
    torch.manual_seed(seed)
    model = KBLaMPP(TINY_MODELS[arch](), cfg, d_ctx=D_CTX)
    with torch.no_grad():
        for name, param in model.kb_named_parameters():
            param.normal_(0, 0.5)  # "trained" weights that differ between seeds
    return model, cfg


def _logits(model):
    ctx = KBContext(source=random_tensor_kb(50, D_K, D_V, D_CTX), e_q=torch.ones(1, D_CTX),
                    tau=torch.tensor([[18000.0, 18100.0]]))
    with torch.no_grad(), model.kb_request(ctx):
        return model(input_ids=torch.tensor([[4, 5, 6, 7, 8]])).logits


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_save_then_load_reproduces_outputs(arch, tmp_path):
    trained, cfg = _model(arch, seed=1)
    fresh, _ = _model(arch, seed=2)
    assert not torch.equal(_logits(trained), _logits(fresh))
    path = save_kb_checkpoint(trained, cfg, tmp_path / "kb.safetensors")
    assert os.listdir(tmp_path) == ["kb.safetensors"]  # no temp file left behind
    saved = load_file(str(path))
    assert set(saved) == set(kb_state_dict(trained)) and all(is_kb_name(n) for n in saved)
    assert not any(n.startswith("backbone.") for n in saved)
    got_cfg = load_kb_checkpoint(fresh, path)
    assert got_cfg == json.loads(json.dumps(config_to_dict(cfg)))
    assert config_from_dict(got_cfg) == cfg
    assert torch.equal(_logits(fresh), _logits(trained))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    two, cfg2 = _model("llama", layers=(0, 1))
    one, cfg1 = _model("llama", layers=(1,))
    path2 = save_kb_checkpoint(two, cfg2, tmp_path / "two.safetensors")
    with pytest.raises(KBCheckpointError, match=r"two.safetensors: unexpected tensors: kb_hop_choice\.proj\.bias, "
                       r"kb_hop_choice\.proj\.weight, kb_layers\.0\.kb_context_scorer\.weight, kb_layers\.0\.kb_fusion"):
        load_kb_checkpoint(one, path2)
    path1 = save_kb_checkpoint(one, cfg1, tmp_path / "one.safetensors")
    with pytest.raises(KBCheckpointError, match=r"missing KB tensors: kb_hop_choice\.proj\.bias, kb_hop_choice\.proj\.weight, "
                       r"kb_layers\.0\.kb_context_scorer\.weight"):
        load_kb_checkpoint(two, path1)


def test_shape_mismatch_is_named(tmp_path):
    small, cfg = _model("qwen2", d_k=8)
    path = save_kb_checkpoint(small, cfg, tmp_path / "kb.safetensors")
    big, _ = _model("qwen2")
    with pytest.raises(KBCheckpointError, match=r"kb_layers\.1\.kb_linear_q\.weight: shape \(8, 64\) in the file, "
                                                r"\(16, 64\) in the model"):
        load_kb_checkpoint(big, path)


def test_bad_files(tmp_path):
    model, _ = _model("llama")
    with pytest.raises(FileNotFoundError, match="nope.safetensors: KB checkpoint not found"):
        load_kb_checkpoint(model, tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(KBCheckpointError, match="junk.safetensors: not a readable safetensors file"):
        load_kb_checkpoint(model, junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"kb_x": torch.zeros(1)}, str(foreign))
    with pytest.raises(KBCheckpointError, match="foreign.safetensors: metadata format is None"):
        load_kb_checkpoint(model, foreign)
