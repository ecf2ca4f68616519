"""The embedded SmolLM2-135M-Instruct end to end, one load: config facts, tokenizer, prompt, the
d_model / layer checks, and the answer head copying a never-seen name through the patched model."""
import numpy as np
import pytest
import torch

from kblampp import hf_arch
from kblampp.answer_head import CopyLogitsProcessor, KBCopyGate, build_tail_token_table
from kblampp.backbone import SHORT_ANSWER_INSTRUCTION, build_prompt, check_backbone, end_of_turn_id, load_backbone
from kblampp.config import ConfigError, KBConfig, load_config
from kblampp.kb_context import KBContext
from kblampp.model import KBLaMPP
from kblampp.retrieval import TensorKB

NAME = "Qorvath Ellindrae"
TAILS = ["Alice Zhang", NAME, "Paris"]
D_CTX = 384


@pytest.fixture(scope="module")
def loaded():
    cfg = load_config("configs/embedded_default.yaml", ["K_top=2", "gamma=0.0", "eta=0.0", "d_k=16", "d_v=16"])
    backbone, tok = load_backbone(cfg)
    return cfg, backbone, tok


def test_embedded_backbone_facts_and_tokenizer(loaded):
    cfg, backbone, tok = loaded
    assert type(backbone).__name__ == "LlamaForCausalLM" and hf_arch.model_type(backbone) == "llama"
    assert (hf_arch.hidden_size(backbone), hf_arch.num_layers(backbone)) == (576, 30)
    assert cfg.inject_layers == [8] and backbone.dtype == torch.float32
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token, end_of_turn_id(tok)) == ("<|endoftext|>", 0, "<|im_end|>", 2)
    assert tok.padding_side == "left" and backbone.generation_config.pad_token_id == 0
    assert build_prompt(tok, "Who is it?") == (f"<|im_start|>system\n{SHORT_ANSWER_INSTRUCTION}<|im_end|>\n"
                                               "<|im_start|>user\nWho is it?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ConfigError, match="d_model: config says 2048 but backbone 'embedded:smollm2-135m-instruct' "
                                          "has hidden size 576"):
        check_backbone(KBConfig(d_model=2048), backbone)
    with pytest.raises(ConfigError, match=r"inject_layers\[1\]: layer 30 is out of range for backbone "
                                          r"'embedded:smollm2-135m-instruct' with 30 layers \(valid: 0..29\)"):
        check_backbone(KBConfig(inject_layers=[8, 30]), backbone)


def test_embedded_copy_head_emits_unseen_name_and_closed_gate_is_plain(loaded):
    cfg, backbone, tok = loaded
    model = KBLaMPP(backbone, cfg, d_ctx=D_CTX)
    model.register_kb_module("kb_copy_gate", KBCopyGate(576))
    kb = model.kb_layers["8"]
    with torch.no_grad():  # Q = e_q[:16]; fact i's key = 200 * one-hot(i): alpha ~ 1 on the named fact
        kb.kb_linear_q.weight.zero_()
        kb.kb_linear_q.bias.zero_()
        kb.kb_query_ctx.weight.zero_()
        kb.kb_query_ctx.weight[:, :16] = torch.eye(16)
    n = len(TAILS)
    keys = torch.zeros(n, 16)
    keys[torch.arange(n), torch.arange(n)] = 200.0
    source = TensorKB(keys, torch.zeros(n, 16), torch.randn(n, D_CTX), torch.zeros(n), torch.full((n,), np.inf))
    table = build_tail_token_table(TAILS, tok)
    enc = tok([build_prompt(tok, "Who founded Brightwater Mills?")], return_tensors="pt", add_special_tokens=False)
    name_ids = tok(NAME, add_special_tokens=False)["input_ids"]
    assert len(name_ids) >= 3  # a multi-token name
    gen = dict(do_sample=False, max_new_tokens=len(name_ids) + 2)

    def generate(gate_open: bool, gate_closed: bool = False):
        ctx = KBContext(source=source, e_q=torch.nn.functional.one_hot(torch.tensor([1]), D_CTX).float(),
                        record=True, gate_closed=gate_closed)
        proc = CopyLogitsProcessor(table, ctx, 8, gate=model.kb_copy_gate, gate_open=gate_open)
        with torch.no_grad(), model.kb_request(ctx):
            out = model.generate(**enc, logits_processor=[proc], **gen)
        return out[0, enc["input_ids"].shape[1]:].tolist()

    copied = generate(gate_open=True)
    assert copied == name_ids + [2]  # the name, then <|im_end|>: generation stopped
    assert tok.decode(copied, skip_special_tokens=True) == NAME
    with torch.no_grad():
        plain = model.generate(**enc, **gen)[0, enc["input_ids"].shape[1]:].tolist()  # outside a request
    assert generate(gate_open=False, gate_closed=True) == plain
    assert NAME not in tok.decode(plain)
