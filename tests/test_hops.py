"""Multi-hop through the inject layers: the hop phase's last-token stepping equals the patched model,
chain targets, the hop choice, and the answer head copying from the chosen layer."""
import math

import pytest
import torch

from kblampp import hf_arch
from kblampp.config import KBConfig
from kblampp.hops import KBHopChoice, choose_hop, hop_candidates, next_inject_input
from kblampp.kb_context import KBContext
from kblampp.model import KBLaMPP
from kblampp.retrieval import random_tensor_kb
from kblampp.training.cache import hop_layer_states, inject_layer_states
from kblampp.training.hop_phase import chain_targets
from tiny_models import TINY_MODELS

D_K, D_V, D_CTX = 16, 24, 12
ARCHS = sorted(TINY_MODELS)


def two_layer_model(arch):
    cfg = KBConfig(inject_layers=[0, 1], d_k=D_K, d_v=D_V, K_top=4)
    torch.manual_seed(1)
    model = KBLaMPP(TINY_MODELS[arch](), cfg, d_ctx=D_CTX)
    with torch.no_grad():  # an open knowledge branch: the second layer must see the first one's value
        for kb in model.kb_layers.values():
            kb.kb_fusion.kb_linear_v.weight.normal_(0, 1.0)
            kb.kb_fusion.kb_gate.bias.fill_(0.0)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_stepping_the_last_token_equals_the_patched_model(arch):
    """The hop phase's shortcut (cached residual + attention output + the KB term, then the frozen MLP)
    gives exactly the state the second inject layer reads in a real forward with injection on."""
    model = two_layer_model(arch)
    prompts = [[5, 9, 17, 33, 41, 8], [5, 9, 17, 60, 2, 77]]
    cached = hop_layer_states(model.backbone, prompts, [0, 1], pad=0, batch_size=2, progress=False)
    plain = inject_layer_states(model.backbone, prompts, 0, pad=0, batch_size=2, progress=False)
    torch.testing.assert_close(hf_arch.input_norm(model.backbone, 0)(cached["residual_0"]), plain)
    source = random_tensor_kb(64, D_K, D_V, D_CTX)
    ctx = KBContext(source=source, e_q=torch.randn(2, D_CTX, generator=torch.Generator().manual_seed(4)),
                    tau=torch.full((2, 2), math.nan), record=True)
    with torch.no_grad(), model.kb_request(ctx):
        model(input_ids=torch.tensor(prompts))
    first, second = ctx.records[0][0], ctx.records[1][0]
    with torch.no_grad():
        values = source.fetch(first.cand_ids[:, -1])["V"]  # (B, K, d_v)
        v_tilde = torch.einsum("bk,bkd->bd", first.alpha[:, -1], values)
        delta, _ = model.kb_layers["0"].kb_fusion(first.hidden[:, -1], v_tilde)
        x1 = next_inject_input(model.backbone, 0, cached["residual_0"], cached["attn_0"], delta)
        h1 = hf_arch.input_norm(model.backbone, 1)(x1)
    torch.testing.assert_close(h1, second.hidden[:, -1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(delta, torch.zeros_like(delta))  # the first layer's value did reach it


def test_chain_targets_hand_example():
    targets, labels = chain_targets([(4, 7), (1, 2, 3), (9,), (5, 6)], [7, 3, 9, 6], [True, True, False, False], 3)
    assert targets.tolist() == [[4, 7, 7], [1, 2, 3], [9, 9, 9], [6, 6, 6]]
    assert labels.tolist() == [1, 2, 0, 0]
    short, lab = chain_targets([(1, 2, 3)], [3], [True], 2)  # longer chain than layers: answer last
    assert short.tolist() == [[1, 3]] and lab.tolist() == [1]


def test_entity_chain_rule():
    from kblampp.hops import is_entity_chain

    heads, tails = {1: "Expo", 2: "Org", 3: "Org"}, {1: "Org", 2: "Ann", 3: "Bo"}
    assert is_entity_chain((1, 2), "temporal", heads.get, tails.get)  # organiser, then its CEO
    assert not is_entity_chain((2, 3), "temporal", heads.get, tails.get)  # succession: same head
    assert is_entity_chain((2, 3), "multi-hop", heads.get, tails.get) and not is_entity_chain((1,), "multi-hop",
                                                                                             heads.get, tails.get)


def test_hop_choice_starts_at_the_first_hop_and_forcing():
    choice = KBHopChoice(8, 3)
    alpha = torch.softmax(torch.randn(2, 3, 4), -1)
    cands = torch.arange(24).view(2, 3, 4)
    a, c, hop, p = choose_hop(choice, alpha, cands, torch.randn(2, 8))
    assert hop.tolist() == [0, 0] and torch.equal(c, cands[:, 0]) and torch.equal(a, alpha[:, 0])
    assert torch.allclose(p.sum(-1), torch.ones(2))
    a, c, hop, _ = choose_hop(choice, alpha, cands, torch.randn(2, 8), forced=2)
    assert hop.tolist() == [2, 2] and torch.equal(c, cands[:, 2])
    with pytest.raises(ValueError, match="at least 2 inject layers"):
        KBHopChoice(8, 1)


def fake_record(cand: list[int], alpha: list[float], hidden: torch.Tensor):
    from kblampp.kb_context import LayerRecord

    return LayerRecord(alpha=torch.tensor([[alpha]]), cand_ids=torch.tensor([[cand]]), beta=torch.zeros(1, 1),
                       hidden=hidden.view(1, 1, -1))


def test_copy_processor_copies_from_the_chosen_hop():
    import types

    from kblampp.answer_head import CopyLogitsProcessor, build_tail_token_table
    from test_backbone import tiny_chat_tokenizer

    tok = tiny_chat_tokenizer()
    tails = ["Alice Zhang", "Zorblax Quenti", "Bo"]
    table = build_tail_token_table(tails, tok)
    hidden = torch.randn(64)
    records = {0: [fake_record([0, 1], [0.0, 1.0], hidden)], 1: [fake_record([2, 0], [1.0, 0.0], hidden)]}
    choice = KBHopChoice(64, 2)
    with torch.no_grad():
        choice.proj.bias.copy_(torch.tensor([0.0, 5.0]))  # answer from the second hop
    scores = torch.zeros(1, 300)
    prompt = torch.tensor([[5, 6, 7]])
    for forced, tail in ((None, 2), (0, 1)):
        proc = CopyLogitsProcessor(table, types.SimpleNamespace(records=records), 0, gate_value=1.0,
                                   hop_layers=[0, 1], hop_choice=choice, hop_forced=forced)
        out = proc(prompt, scores.clone())
        assert int(out.argmax()) == int(table[tail, 0])
        assert proc.hop.tolist() == [1 if forced is None else 0]
    one = CopyLogitsProcessor(table, types.SimpleNamespace(records=records), 0, gate_value=1.0)  # one layer
    assert int(one(prompt, scores.clone()).argmax()) == int(table[1, 0]) and one.hop is None


def test_hop_summary_hand_example():
    from kblampp.evaluation.hop_metrics import hop_summary
    from kblampp.evaluation.kbqa import LastTokenRecord
    from kblampp.schema import QARecord

    def rec(qtype, sup):
        return QARecord("q", "d", "?", "a", qtype, tuple(sup), None, None, {"answer_fact": sup[-1]})

    def last(c1, c2, hop):
        return LastTokenRecord([], [], 0.0, 8, hops=[{"layer": 8, "cand_ids": c1, "alpha": [], "beta": 0.0},
                                                    {"layer": 9, "cand_ids": c2, "alpha": [], "beta": 0.0}], hop=hop)

    records = [rec("multi-hop", [1, 2]), rec("multi-hop", [3, 4]), rec("single-hop", [5])]
    lasts = [last([1, 7], [2, 8], 1), last([3], [9], 0), last([5], [5], 0)]
    facts = [None] * 10
    s = hop_summary(lasts, records, facts)
    assert s["hop1_recall@K"] == 1.0 and s["hop2_recall@K"] == 0.5 and s["2hop/hop2_recall@K"] == 0.5
    assert s["hop_choice_acc"] == 2 / 3 and s["hop_choice_acc_multi"] == 0.5 and s["hop_choice_acc_other"] == 1.0
    assert hop_summary([LastTokenRecord([], [], 0.0, 8)], records[:1], facts) is None  # one layer: no hops


def test_evidence_and_plot_show_the_hops_in_order(tmp_path):
    from kblampp.evaluation.evidence import evidence_entry
    from kblampp.evaluation.kbqa import LastTokenRecord
    from kblampp.evaluation.plots import plot_alpha
    from kblampp.schema import fact_from_dict, qa_from_dict
    from kblampp.training.toy import toy_facts, toy_qa

    raw = toy_facts(3)
    facts, records = [fact_from_dict(f) for f in raw], [qa_from_dict(q) for q in toy_qa(raw, range(3), "q")]
    last = LastTokenRecord([0, 1], [0.9, 0.1], 0.2, 8, hops=[
        {"layer": 8, "cand_ids": [0, 1, 2, 3], "alpha": [0.7, 0.1, 0.1, 0.1], "beta": 0.2},
        {"layer": 9, "cand_ids": [2, 0], "alpha": [0.8, 0.2], "beta": 0.3}], hop=1)
    e = evidence_entry(records[0], "x", last, facts)
    assert [h["hop"] for h in e["hops"]] == [1, 2] and [h["layer"] for h in e["hops"]] == [8, 9]
    assert [f["index"] for f in e["hops"][0]["facts"]] == [0, 1, 2]  # best three of hop 1
    assert [f["index"] for f in e["hops"][1]["facts"]] == [2, 0] and e["answer_hop"] == 2
    path = plot_alpha(e, tmp_path / "alpha.png")
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[0] > 200  # two panels


def test_checkpoint_layers_override_the_config():
    import json

    from kblampp.inference.loading import with_checkpoint_layers

    cfg = KBConfig(inject_layers=[8])
    assert with_checkpoint_layers(cfg, {"config": json.dumps({"inject_layers": [8, 9, 10]})}, "x").inject_layers == [8, 9, 10]
    assert with_checkpoint_layers(cfg, {"config": json.dumps({"inject_layers": [8]})}, "x") is cfg
    assert with_checkpoint_layers(cfg, {}, "x") is cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_ablation_contexts_equal_their_models(arch):
    """zero_beta_layers = the same model with that layer's fused value zeroed; off_layers = the later
    layer unpatched (today's one-layer model). Exact equality of the logits."""
    import copy

    model = two_layer_model(arch)
    x = torch.tensor([[5, 9, 17, 33, 41, 8], [5, 9, 17, 60, 2, 77]])
    source = random_tensor_kb(64, D_K, D_V, D_CTX)
    e_q = torch.randn(2, D_CTX, generator=torch.Generator().manual_seed(4))

    def logits(m, **kw):
        ctx = KBContext(source=source, e_q=e_q, tau=torch.full((2, 2), math.nan), record=True, **kw)
        with torch.no_grad(), m.kb_request(ctx):
            return m(input_ids=x).logits, ctx

    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.kb_layers["0"].kb_fusion.kb_linear_v.weight.zero_()
        zeroed.kb_layers["0"].kb_fusion.kb_linear_v.bias.zero_()
    got, ctx = logits(model, zero_beta_layers=frozenset({0}))
    assert torch.equal(got, logits(zeroed)[0])
    assert torch.equal(ctx.records[0][0].beta, torch.zeros(2, 6)) and 1 in ctx.records
    assert not torch.equal(got, logits(model)[0])  # the first hop's value matters when it is on
    one = copy.deepcopy(model)
    one.unpatch()
    from kblampp.injection_wrapper import patch_layers

    patch_layers(one.backbone, {0: one.kb_layers["0"]}, one.holder)
    got, ctx = logits(model, off_layers=frozenset({1}))
    assert torch.equal(got, logits(one)[0]) and list(ctx.records) == [0]
