"""Answer head: tail token table, the pointer/gate mixture (hand-computed), and generate() through a
patched tiny KBLaMPP: alpha on one fact + gate open copies its tail (a never-seen multi-token name)
and stops; gate closed = the plain model, bitwise."""
import types

import numpy as np
import pytest
import torch

from kblampp.answer_head import (CopyLogitsProcessor, KBCopyGate, build_tail_token_table,
                                 copy_mixture_log_probs, load_or_build_tail_table, pointer_at_steps,
                                 tail_table_name, teacher_forced_copy_log_probs)
from kblampp.backbone import build_prompt
from kblampp.config import KBConfig
from kblampp.kb_context import KBContext
from kblampp.model import KBLaMPP
from kblampp.retrieval import TensorKB
from test_backbone import tiny_chat_tokenizer
from tiny_models import TINY_MODELS

END = 2  # <|im_end|>, the tiny models' eos
TAILS = ["Alice Zhang", "Zorblax Quenti", "Bo", "Robotics"]
D_K, D_V, D_CTX = 16, 8, 12


# ------------------------------------------------------------------------------------ tail table
def test_tail_table_tokens_end_marker_padding_and_cut():
    tok = tiny_chat_tokenizer()
    table = build_tail_token_table(TAILS, tok, max_len=16)
    assert table.shape == (4, 16) and table.dtype == torch.long
    for i, name in enumerate(TAILS):
        ids = tok(name, add_special_tokens=False)["input_ids"]
        assert table[i].tolist() == ids + [END] + [-1] * (15 - len(ids))
    assert len(tok("Zorblax Quenti", add_special_tokens=False)["input_ids"]) > 5  # unseen: many tokens
    cut = build_tail_token_table(["Zorblax Quenti"], tok, max_len=4)
    assert cut.tolist() == [tok("Zorblax Quenti", add_special_tokens=False)["input_ids"][:3] + [END]]
    with pytest.raises(ValueError, match="tail 1: empty or non-string tail name ' '"):
        build_tail_token_table(["ok", " "], tok)
    with pytest.raises(ValueError, match="max_len must be at least 2"):
        build_tail_token_table(["ok"], tok, max_len=1)


class DictStore:
    """The KBValueStore extra-array interface, in memory."""

    def __init__(self):
        self.extra, self.extra_builders, self.writes = {}, {}, 0

    def read_extra(self, name):
        if name not in self.extra:
            raise KeyError(name)
        return self.extra[name]

    def write_extra(self, name, array):
        self.writes += 1
        self.extra[name] = np.asarray(array)


def test_tail_table_is_kept_with_the_store_keyed_by_tokenizer():
    tok, store = tiny_chat_tokenizer(), DictStore()
    name = tail_table_name(tok, 16)
    assert name.startswith("tail_tokens_") and name == tail_table_name(tiny_chat_tokenizer(), 16)
    assert name != tail_table_name(tok, 8)
    first = load_or_build_tail_table(store, TAILS, tok)
    again = load_or_build_tail_table(store, TAILS, tok)
    assert store.writes == 1 and torch.equal(first, again) and torch.equal(first, build_tail_token_table(TAILS, tok))
    rows = store.extra_builders[name]([{"tail": {"name": "Bo"}}])  # facts added later get rows too
    assert rows.tolist() == build_tail_token_table(["Bo"], tok).tolist()
    with pytest.raises(ValueError, match="does not match 3 facts x 16 tokens"):
        load_or_build_tail_table(store, TAILS[:3], tok)


# ------------------------------------------------------------------------------------ the mixture
def test_copy_mixture_matches_hand_computation_and_trains():
    V = 6
    table = torch.tensor([[3, 4, END, -1], [3, 5, END, -1], [1, END, -1, -1]])
    alpha = torch.tensor([[0.5, 0.3, 0.2, 0.0]], requires_grad=True)
    cands = torch.tensor([[0, 1, 2, -1]])  # -1: no candidate in that slot
    answer = torch.tensor([[-100, 3, 4, END, -100]])
    logits = torch.randn(1, 5, V, generator=torch.Generator().manual_seed(0))
    gate = torch.full((1, 5), 0.5, requires_grad=True)
    got = copy_mixture_log_probs(logits, alpha, cands, table, answer, gate)

    sm = torch.softmax(logits[0], -1)
    want = torch.log_softmax(logits[0], -1).clone()
    # step 0: alpha itself; later steps: alpha renormalised over the tails matching the copied prefix
    # (after "3", candidates 0 and 1 share the whole pointer; after "3 4", candidate 0 has all of it)
    copies = {1: ({3: 0.8, 1: 0.2}, 1.0), 2: ({4: 0.5 / 0.8, 5: 0.3 / 0.8}, 1.0), 3: ({END: 1.0}, 1.0)}
    for t, (p_copy, mass) in copies.items():
        p = (1 - 0.5 * mass) * sm[t]
        for tok, w in p_copy.items():
            p[tok] += 0.5 * w
        want[t] = torch.log(p)
    assert torch.equal(got[0, 0], want[0]) and torch.equal(got[0, 4], want[4])  # non-answer: exact
    torch.testing.assert_close(got[0], want, rtol=0, atol=2e-6)
    assert torch.allclose(got.exp().sum(-1), torch.ones(1, 5))

    loss = -got[0, [1, 2, 3], [3, 4, END]].sum()
    loss.backward()
    assert torch.isfinite(alpha.grad).all() and torch.isfinite(gate.grad).all()
    assert alpha.grad[0, 0] < 0 < alpha.grad[0, 2]  # more alpha on the gold-tail fact lowers the loss
    assert alpha.grad[0, 3] == 0


def test_pointer_keeps_a_begun_copy_whole_and_weighs_step_zero_by_alpha():
    """Two tails share "7" (alpha 0.2 + 0.1), a third (0.7) starts elsewhere: once "7" is written the
    pointer is the posterior over the two that match (2/3, 1/3), not their alpha (0.2, 0.1)."""
    tails = torch.tensor([[[7, 8, END], [7, 9, END], [4, END, -1]]])  # (1, K=3, L=3)
    alpha = torch.tensor([[0.2, 0.1, 0.7]])
    seq = torch.tensor([[7, 8, 2]])
    p, mass = pointer_at_steps(tails, alpha, seq, torch.tensor([[0, 1, 2, 3]]), vocab=12)
    assert torch.equal(mass, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))  # step 3: no tail has 4 tokens
    torch.testing.assert_close(p[0, 0, [7, 4]], torch.tensor([0.3, 0.7]), rtol=0, atol=1e-7)
    torch.testing.assert_close(p[0, 1, [8, 9]], torch.tensor([2 / 3, 1 / 3]), rtol=0, atol=1e-7)
    assert float(p[0, 2, END]) == 1.0 and float(p[0, 3].sum()) == 0.0
    p, mass = pointer_at_steps(tails, alpha, torch.tensor([[5]]), torch.tensor([[1]]), vocab=12)
    assert float(mass) == 0.0 and float(p.sum()) == 0.0  # the LM wrote something no tail starts with


def test_closed_gate_or_no_match_is_exactly_log_softmax():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1))
    table = torch.tensor([[5, 6, END]])
    alpha, cands = torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long)
    answer = torch.tensor([[5, 6, END], [4, 6, END]])  # row 1 diverges at once: no candidate matches
    closed = copy_mixture_log_probs(logits, alpha, cands, table, answer, torch.zeros(2, 3))
    assert torch.equal(closed, torch.log_softmax(logits, -1))
    opened = copy_mixture_log_probs(logits, alpha, cands, table, answer, torch.ones(2, 3))
    assert torch.equal(opened[1, 1:], torch.log_softmax(logits, -1)[1, 1:])
    assert opened[0, :, :].argmax(-1).tolist() == [5, 6, END]
    assert (opened[0, [0, 1, 2], [5, 6, END]] > -1e-5).all()  # g*mass clamped just below 1: log p ~ 0
    with pytest.raises(ValueError, match="shapes disagree"):
        copy_mixture_log_probs(logits, alpha, cands, table, answer[:, :2], torch.ones(2, 2))


def test_copy_gate_starts_at_one_half_and_learns():
    gate = KBCopyGate(64)
    hidden = torch.randn(3, 5, 64) * 50
    g = gate(hidden, torch.tensor([0.2, 0.9, 1.0])[:, None])
    assert g.shape == (3, 5) and torch.equal(g, torch.full((3, 5), 0.5))
    g.sum().backward()
    assert gate.proj.weight.grad.abs().sum() > 0
    assert torch.equal(KBCopyGate(8, init_bias=2.0)(torch.zeros(1, 8), torch.ones(1)),
                       torch.sigmoid(torch.tensor([2.0])))


# ------------------------------------------------------------------------------------ generate()
def focused_model(arch: str):
    """A tiny KBLaMPP whose query is e_q (one-hot) and whose keys are 200 x one-hots: alpha ~ 1 on the
    fact whose key matches the row's e_q, so each row retrieves the fact we name."""
    cfg = KBConfig(inject_layers=[1], d_k=D_K, d_v=D_V, K_top=3, gamma=0.0, eta=0.0)
    torch.manual_seed(0)
    model = KBLaMPP(TINY_MODELS[arch](), cfg, d_ctx=D_CTX)
    kb = model.kb_layers["1"]
    with torch.no_grad():
        kb.kb_linear_q.weight.zero_()
        kb.kb_linear_q.bias.zero_()
        kb.kb_query_ctx.weight.zero_()
        kb.kb_query_ctx.weight[:D_CTX, :D_CTX] = torch.eye(D_CTX)
        kb.kb_fusion.kb_linear_v.weight.normal_(0, 1.0)  # a live knowledge branch: not the base model
    model.register_kb_module("kb_copy_gate", KBCopyGate(model.d_model))
    n = len(TAILS)
    K = torch.zeros(n, D_K)
    K[torch.arange(n), torch.arange(n)] = 200.0
    source = TensorKB(K, torch.randn(n, D_V), torch.randn(n, D_CTX), torch.zeros(n), torch.full((n,), np.inf))
    return model, source


def prompts(tok, questions):
    texts = [build_prompt(tok, q) for q in questions]
    tok.padding_side = "left"  # as load_tokenizer sets it
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def run(model, source, facts, enc, processor_kw=None, ctx_kw=None, **gen_kw):
    e_q = torch.nn.functional.one_hot(torch.tensor(facts), D_CTX).float()
    ctx = KBContext(source=source, e_q=e_q, record=True, **(ctx_kw or {}))
    procs = []
    if processor_kw is not None:
        procs = [CopyLogitsProcessor(table_for_tests(), ctx, 1, gate=model.kb_copy_gate, **processor_kw)]
    kw = dict(do_sample=False, max_new_tokens=20, return_dict_in_generate=True, output_scores=True,
              pad_token_id=0, eos_token_id=END)
    with torch.no_grad(), model.kb_request(ctx):
        out = model.generate(**enc, logits_processor=procs, **{**kw, **gen_kw})
    return out, ctx, procs


def table_for_tests():
    return build_tail_token_table(TAILS, tiny_chat_tokenizer())


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_gate_open_copies_the_focused_tail_then_stops(arch):
    tok = tiny_chat_tokenizer()
    model, source = focused_model(arch)
    enc = prompts(tok, ["Who runs BrightSky Robotics?", "Who?"])  # different lengths: left padding
    out, ctx, (proc,) = run(model, source, [1, 2], enc, processor_kw={})
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    name = tok("Zorblax Quenti", add_special_tokens=False)["input_ids"]
    assert new[0].tolist() == name + [END]  # the never-seen multi-token name, then stop
    bo = tok("Bo", add_special_tokens=False)["input_ids"]
    assert new[1].tolist() == bo + [END] + [0] * (len(name) - len(bo))  # finished rows are padded
    assert tok.decode(new[0, :-1]) == "Zorblax Quenti"
    prefill = ctx.records[1][0]
    assert prefill.alpha[0, -1, 0] > 0.999 and prefill.cand_ids[0, -1, 0] == 1
    assert torch.equal(proc.trace[0]["gate"], torch.full((2,), 0.5))  # the untrained gate is 0.5


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_after_the_tail_the_model_returns_to_its_own_lm(arch):
    tok = tiny_chat_tokenizer()
    model, source = focused_model(arch)
    enc = prompts(tok, ["Who runs BrightSky Robotics?"])
    # end marker not treated as eos: the pointer has nothing left to copy, so the LM continues
    out, _, (proc,) = run(model, source, [2], enc, processor_kw={}, eos_token_id=299, max_new_tokens=8)
    copied = tok("Bo", add_special_tokens=False)["input_ids"] + [END]
    new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    assert new[:len(copied)] == copied
    assert [float(t["mass"][0]) for t in proc.trace[len(copied):]] == [0.0] * (len(new) - len(copied))
    prefix = {"input_ids": out.sequences[:, :enc["input_ids"].shape[1] + len(copied)]}
    plain, _, _ = run(model, source, [2], prefix, eos_token_id=299, max_new_tokens=len(new) - len(copied))
    assert new[len(copied):] == plain.sequences[0, prefix["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_gate_closed_output_equals_the_plain_model(arch):
    tok = tiny_chat_tokenizer()
    model, source = focused_model(arch)
    enc = prompts(tok, ["Who runs BrightSky Robotics?", "Who?"])
    plain, _, _ = run(model, source, [1, 2], enc, max_new_tokens=6, eos_token_id=299)
    for kw in ({"gate_open": False}, {"gate_value": 0.0}):
        closed, _, _ = run(model, source, [1, 2], enc, processor_kw=kw, max_new_tokens=6, eos_token_id=299)
        assert torch.equal(closed.sequences, plain.sequences)
        assert all(torch.equal(a, b) for a, b in zip(closed.scores, plain.scores))
    # KB branch closed too: exactly the backbone without any KB module
    closed, _, _ = run(model, source, [1, 2], enc, processor_kw={"gate_open": False},
                       ctx_kw={"gate_closed": True}, max_new_tokens=6, eos_token_id=299)
    with torch.no_grad():
        base = TINY_MODELS[arch]().generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=0,
                                            eos_token_id=299)
    assert torch.equal(closed.sequences, base)


def test_teacher_forced_entry_uses_the_last_prompt_token_record():
    tok = tiny_chat_tokenizer()
    model, source = focused_model("llama")
    prompt = tok(build_prompt(tok, "Who?"), add_special_tokens=False)["input_ids"]
    answer = tok("Zorblax Quenti", add_special_tokens=False)["input_ids"] + [END]
    ids = torch.tensor([prompt + answer])
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt) - 1:-1] = torch.tensor(answer)  # logits at t predict token t+1
    ctx = KBContext(source=source, e_q=torch.nn.functional.one_hot(torch.tensor([1]), D_CTX).float(), record=True)
    with model.kb_request(ctx):
        logits = model(input_ids=ids).logits
    logp = teacher_forced_copy_log_probs(logits, ctx.records[1][0], torch.tensor([len(prompt) - 1]), labels,
                                         table_for_tests(), model.kb_copy_gate)
    gold = logp[0, len(prompt) - 1:-1].gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
    assert (gold.exp() > 0.5).all()  # g = 0.5 and alpha ~ 1 on the gold-tail fact
    (-gold.sum()).backward()
    assert model.kb_copy_gate.proj.weight.grad.abs().sum() > 0


def test_processor_errors_are_clear():
    with pytest.raises(ValueError, match="needs a gate module or a constant gate_value"):
        CopyLogitsProcessor(table_for_tests(), types.SimpleNamespace(records={}), 1)
    proc = CopyLogitsProcessor(table_for_tests(), types.SimpleNamespace(records={}), 1, gate_value=1.0)
    with pytest.raises(RuntimeError, match="no KB records at layer 1"):
        proc(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 300))
    rec = {"alpha": torch.ones(1, 4, 1), "cand_ids": torch.ones(1, 4, 1, dtype=torch.long),
           "hidden": torch.zeros(1, 4, 64)}
    ctx = types.SimpleNamespace(records={1: [rec]})
    proc = CopyLogitsProcessor(table_for_tests(), ctx, 1, gate_value=1.0)
    proc(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 300))
    with pytest.raises(RuntimeError, match="expected 2 records at layer 1, found 1"):
        proc(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 300))
