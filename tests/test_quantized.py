"""4-bit (bitsandbytes NF4) backbones on CPU: load through load_backbone, patch with KBLaMPP, run
forward and backward with the answer-head loss; only kb_ tensors get gradients."""
import bitsandbytes as bnb
import pytest
import torch

from kblampp import hf_arch
from kblampp.answer_head import KBCopyGate, build_tail_token_table, teacher_forced_copy_log_probs
from kblampp.backbone import build_prompt, load_backbone
from kblampp.config import KBConfig
from kblampp.kb_context import KBContext
from kblampp.kb_params import freeze_non_kb, is_kb_name
from kblampp.model import KBLaMPP
from kblampp.retrieval import random_tensor_kb
from test_backbone import save_tiny

D_K, D_V, D_CTX = 16, 8, 12


def forward_backward(model: KBLaMPP, tok, layer: int, d_ctx: int, tails: list[str]) -> dict[str, torch.Tensor]:
    """One teacher-forced step: injection CE + answer-head mixture CE; returns the kb_ gradients."""
    freeze_non_kb(model)
    table = build_tail_token_table(tails, tok)
    prompt = tok(build_prompt(tok, "Who runs BrightSky Robotics?"), add_special_tokens=False)["input_ids"]
    answer = list(table[1][table[1] >= 0])
    ids = torch.tensor([prompt + answer])
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt) - 1:-1] = torch.tensor(answer)
    source = random_tensor_kb(len(tails), model.kb_layers[str(layer)].d_k, D_V if d_ctx == D_CTX else 384, d_ctx)
    ctx = KBContext(source=source, e_q=torch.randn(1, d_ctx), forced_ids=torch.tensor([[1]]), record=True)
    with model.kb_request(ctx):
        logits = model(input_ids=ids).logits
    logp = teacher_forced_copy_log_probs(logits, ctx.records[layer][0], torch.tensor([len(prompt) - 1]), labels,
                                         table, model.kb_copy_gate)
    mask = labels >= 0
    loss = -logp[mask].gather(-1, labels[mask][:, None]).mean()
    loss = loss + torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask])
    loss.backward()
    assert torch.isfinite(loss)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_4bit_tiny_backbone_patched_forward_backward(tmp_path, arch):
    folder = save_tiny(tmp_path, arch)
    cfg = KBConfig(backbone=str(folder), quantization="4bit", inject_layers=[1], d_k=D_K, d_v=D_V, K_top=3)
    backbone, tok = load_backbone(cfg)
    linears = [m for m in backbone.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7 and all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    model = KBLaMPP(backbone, cfg, d_ctx=D_CTX)
    model.register_kb_module("kb_copy_gate", KBCopyGate(hf_arch.hidden_size(backbone)))
    grads = forward_backward(model, tok, 1, D_CTX, ["Alice Zhang", "Zorblax Quenti", "Bo"])
    assert grads and all(is_kb_name(n) for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(n.startswith("kb_copy_gate.") and g.abs().sum() > 0 for n, g in grads.items())
    assert any(".kb_linear_v." in n and g.abs().sum() > 0 for n, g in grads.items())


def test_4bit_embedded_smollm2_patched_forward_backward():
    cfg = KBConfig(quantization="4bit", inject_layers=[8], K_top=2)  # the embedded default backbone
    backbone, tok = load_backbone(cfg)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in backbone.modules()) == 30 * 7
    model = KBLaMPP(backbone, cfg, d_ctx=384)
    model.register_kb_module("kb_copy_gate", KBCopyGate(576))
    grads = forward_backward(model, tok, 8, 384, ["Alice Zhang", "Qorvath Ellindrae", "Bo Li"])
    assert grads and all(is_kb_name(n) for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(n.startswith("kb_copy_gate.") and g.abs().sum() > 0 for n, g in grads.items())
