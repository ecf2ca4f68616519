"""retrieval_positions "last_prompt": the knowledge branch runs at each row's last prompt token only.

Exact where the math allows: every other position (prompt and decode steps) is the base model bit for
bit. The last prompt token's records equal the "all" scope's at the FIRST inject layer, whose input does
not depend on any injection; with a second inject layer right after it, that layer's input at the last
position is the same function of the same values too (layer 0's attention there reads layer 0's inputs
only), but it goes through matmuls of another shape (1 position instead of T), so floats are compared
with a tolerance and candidate ids exactly.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from kblampp.config import ConfigError, KBConfig, add_config_args, config_from_args, load_config
from kblampp.kb_context import KBContext
from kblampp.model import KBLaMPP
from kblampp.retrieval import random_tensor_kb
from tiny_models import TINY_MODELS

D_K, D_V, D_CTX = 16, 24, 12
ARCHS = sorted(TINY_MODELS)


def make(arch, layers=(1,), scope="last_prompt"):
    cfg = KBConfig(inject_layers=list(layers), d_k=D_K, d_v=D_V, K_top=4, retrieval_positions=scope)
    torch.manual_seed(1)
    model = KBLaMPP(TINY_MODELS[arch](), cfg, d_ctx=D_CTX)
    with torch.no_grad():  # a non-zero knowledge branch, so "equal to base" is not trivially true
        for kb in model.kb_layers.values():
            kb.kb_fusion.kb_linear_v.weight.normal_(0, 1.0)
            kb.kb_fusion.kb_gate.bias.fill_(0.0)
    return model.eval()


class CountingKB:
    """A KB source that counts the query rows it is asked to search."""

    def __init__(self, source):
        self.source, self.searched = source, []

    @property
    def num_facts(self):
        return self.source.num_facts

    def search(self, q, k):
        self.searched.append(q.shape[0])
        return self.source.search(q, k)

    def fetch(self, ids):
        return self.source.fetch(ids)


def request(model, **kw):
    gen = torch.Generator().manual_seed(2)
    tau = torch.tensor([[18000.0, 18400.0], [math.nan, math.nan]])
    return KBContext(source=CountingKB(random_tensor_kb(64, D_K, D_V, D_CTX)),
                     e_q=torch.randn(2, D_CTX, generator=gen), tau=tau,
                     retrieval_positions=model.retrieval_positions, **kw)


def left_padded_ids():
    x = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    x[1, :3] = 0  # row 1 is left-padded: its last prompt token is still the last position
    return x, (x != 0).long()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layers", [(1,), (0, 1)])
def test_prefill_changes_only_the_last_prompt_token(arch, layers):
    model, base = make(arch, layers), TINY_MODELS[arch]()
    x, mask = left_padded_ids()
    ctx = request(model, record=True)
    with torch.no_grad():
        want = base(input_ids=x, attention_mask=mask, output_hidden_states=True)
        with model.kb_request(ctx):
            got = model(input_ids=x, attention_mask=mask, output_hidden_states=True)
    # every real token before the last is the base model's; padding slots are not compared: a query
    # that may see no key spreads its weight over all of them (HF masks with the dtype's minimum, not
    # -inf), the last token's too, and no real position ever reads a padding slot
    before = mask.bool() & (torch.arange(7) < 6)
    assert torch.equal(got.logits[before], want.logits[before])
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert torch.equal(g[before], w[before])
    assert not torch.allclose(got.logits[:, -1], want.logits[:, -1])  # the last prompt token did fuse
    assert ctx.source.searched == [2] * len(layers)  # one query per row and layer, not 2 x 7
    for layer in layers:
        (rec,) = ctx.records[layer]
        assert rec.hidden.shape == (2, 7, 64) and rec.alpha.shape == (2, 7, 4)
        assert (rec.cand_ids[:, :-1] == -1).all() and (rec.alpha[:, :-1] == 0).all() and (rec.beta[:, :-1] == 0).all()
        assert (rec.cand_ids[:, -1] >= 0).all() and rec.beta[:, -1].gt(0).all()
        torch.testing.assert_close(rec.alpha[:, -1].sum(-1), torch.ones(2))
        assert torch.isnan(rec.windows[:, :-1]).all() and not torch.isnan(rec.windows[:, -1]).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_last_prompt_token_records_match_the_all_scope(arch):
    x, mask = left_padded_ids()
    recs = {}
    for scope in ("all", "last_prompt"):
        model = make(arch, (0, 1), scope)
        ctx = request(model, record=True)
        with torch.no_grad(), model.kb_request(ctx):
            model(input_ids=x, attention_mask=mask)
        recs[scope] = ctx.records
    for layer in (0, 1):
        a, b = recs["all"][layer][0], recs["last_prompt"][layer][0]
        assert torch.equal(a.cand_ids[:, -1], b.cand_ids[:, -1])
        for name in ("alpha", "beta", "parts"):
            torch.testing.assert_close(getattr(a, name)[:, -1], getattr(b, name)[:, -1])
        assert torch.equal(a.windows[:, -1], b.windows[:, -1])
    # the first inject layer reads states no injection has touched: the very same tensor values
    assert torch.equal(recs["all"][0][0].hidden, recs["last_prompt"][0][0].hidden)
    torch.testing.assert_close(recs["all"][1][0].hidden[:, -1], recs["last_prompt"][1][0].hidden[:, -1])
    # earlier positions of layer 1 differ: in the "all" scope layer 0 fused there
    assert not torch.allclose(recs["all"][1][0].hidden[:, :-1], recs["last_prompt"][1][0].hidden[:, :-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_steps_are_the_base_model_on_the_same_cache(arch):
    model = make(arch, (0, 1))
    x, mask = left_padded_ids()
    ctx = request(model, record=True)
    with torch.no_grad():
        with model.kb_request(ctx):
            pre = model(input_ids=x, attention_mask=mask, use_cache=True)
        nxt = pre.logits[:, -1:].argmax(-1)
        step_mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
        plain_cache = copy.deepcopy(pre.past_key_values)
        with model.kb_request(ctx):
            got = model(input_ids=nxt, attention_mask=step_mask, past_key_values=pre.past_key_values, use_cache=True)
        want = model(input_ids=nxt, attention_mask=step_mask, past_key_values=plain_cache, use_cache=True)  # no request
    assert torch.equal(got.logits, want.logits)
    assert ctx.source.searched == [2, 2]  # the prefill only
    for layer in (0, 1):
        step = ctx.records[layer][1]
        assert step.hidden.shape == (2, 1, 64) and (step.cand_ids == -1).all() and (step.beta == 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_retrieves_once_and_without_cache_finds_the_same_token(arch):
    model = make(arch)
    x, mask = left_padded_ids()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True)
    counts = {}
    outs = {}
    for use_cache in (True, False):
        ctx = request(model, record=True)
        with torch.no_grad(), model.kb_request(ctx):
            outs[use_cache] = model.generate(x, use_cache=use_cache, **kw)
        counts[use_cache] = ctx.source.searched
        assert len(ctx.records[1]) == 4
    assert counts[True] == [2]  # every decode step skips the branch
    assert counts[False] == [2] * 4  # each full recompute retrieves at the last prompt token again
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    for a, b in zip(outs[True].logits, outs[False].logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    all_model = make(arch, scope="all")
    ctx = request(all_model)
    with torch.no_grad(), all_model.kb_request(ctx):
        all_model.generate(x, use_cache=True, **kw)
    assert ctx.source.searched == [14, 2, 2, 2]  # today's scope: every position, every step


@pytest.mark.parametrize("arch", ARCHS)
def test_a_call_on_a_cut_prompt_cache_retrieves_at_its_one_token(arch):
    """The follower path of generate_with_followers: the prompt cache cut before its last token, then a
    fresh request computes that token alone; it retrieves there as the whole prefill did."""
    model = make(arch)
    x, mask = left_padded_ids()
    whole = request(model, record=True)
    with torch.no_grad():
        with model.kb_request(whole):
            pre = model(input_ids=x, attention_mask=mask, use_cache=True)
        cache = pre.past_key_values
        cache.crop(-1)  # as generate_with_followers does
        follower = request(model, record=True)
        with model.kb_request(follower):
            last = model(input_ids=x[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True)
    assert follower.source.searched == [2]
    assert torch.equal(follower.records[1][0].cand_ids[:, -1], whole.records[1][0].cand_ids[:, -1])
    torch.testing.assert_close(last.logits[:, -1], pre.logits[:, -1], rtol=1e-4, atol=1e-5)


def test_gate_closed_and_off_layers_still_skip_the_branch():
    model, base = make("llama"), TINY_MODELS["llama"]()
    x, mask = left_padded_ids()
    with torch.no_grad():
        want = base(input_ids=x, attention_mask=mask).logits
        for kw in (dict(gate_closed=True), dict(off_layers=frozenset({1}))):
            ctx = request(model, record=True, **kw)
            with model.kb_request(ctx):
                assert torch.equal(model(input_ids=x, attention_mask=mask).logits, want)
            assert ctx.source.searched == [] and ctx.records == {}


def test_bad_scope_is_rejected_naming_the_key(tmp_path):
    assert load_config(None, ["retrieval_positions=last_prompt"]).retrieval_positions == "last_prompt"
    assert load_config(None).retrieval_positions == "all"
    with pytest.raises(ConfigError, match=r"<defaults>: retrieval_positions: 'everywhere' is not one of all, last_prompt"):
        load_config(None, ["retrieval_positions=everywhere"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("retrieval_positions: last\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: retrieval_positions: 'last' is not one of all, last_prompt"):
        load_config(bad)
    import argparse

    parser = argparse.ArgumentParser()
    add_config_args(parser, required=False)
    args = parser.parse_args(["--set", "retrieval_positions=last_prompt"])
    assert config_from_args(args).retrieval_positions == "last_prompt"
    with pytest.raises(ConfigError, match="retrieval_positions: 'first' is not one of all, last_prompt"):
        KBLaMPP(TINY_MODELS["llama"](), KBConfig(inject_layers=[1], retrieval_positions="first"), d_ctx=D_CTX)
    with pytest.raises(ValueError, match="KBContext.retrieval_positions: 'some' is not one of all, last_prompt"):
        KBContext(retrieval_positions="some")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from eval_world import build_world

    tmp = tmp_path_factory.mktemp("scopeworld")
    ec = build_world(tmp)
    yield tmp, ec
    ec.model.retrieval_positions = "all"


def test_evaluation_rows_honour_the_scope(world):
    """The evaluation's KB rows (answer head, abstention-free twin, its prefill follower) under
    "last_prompt": the answer head still copies every answer, from the same last-token candidates."""
    from kblampp.evaluation.runner import evaluate

    tmp_path, ec = world
    rows = ["kblampp", "kblampp_injection"]
    got = {}
    for scope in ("all", "last_prompt"):
        ec.model.retrieval_positions = scope
        payload = evaluate(ec, tmp_path / "test.jsonl", tmp_path / scope, rows=rows, batch_size=3, kb_edit_n=0,
                           progress=False)
        got[scope] = payload
        lines = (tmp_path / scope / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
        got[scope + "_preds"] = [json.loads(x) for x in lines]
    assert got["last_prompt"]["rows"]["kblampp"]["em"] == 1.0
    assert len(got["all_preds"]) == len(got["last_prompt_preds"]) == 8
    for a, b in zip(got["all_preds"], got["last_prompt_preds"]):
        assert (a["qid"], a["row"]) == (b["qid"], b["row"])
        assert a["extra"]["cand_ids"] == b["extra"]["cand_ids"]
        assert a["extra"]["alpha"] == pytest.approx(b["extra"]["alpha"], abs=1e-5)
        if a["row"] == "kblampp":
            assert a["pred"] == b["pred"] == a["answer"]


def test_last_prompt_rows_start_from_the_shared_prefix_and_answer_as_without_it(world, monkeypatch):
    """Under "last_prompt" no KB layer reads the prompt's first tokens, so a KB row may start from their
    cache computed once by the plain model: same answers, same last-token candidates."""
    import kblampp.inference.generate as generate
    from kblampp.evaluation.baselines import backbone_prompts
    from kblampp.evaluation.kbqa import KB_VARIANTS, kb_request
    from kblampp.schema import load_qa

    tmp_path, ec = world
    ec.model.retrieval_positions = "last_prompt"
    records = load_qa(tmp_path / "test.jsonl", num_facts=len(ec.facts))
    prompts = backbone_prompts(ec.tokenizer, records)
    e_q = torch.from_numpy(ec.embed([r.question for r in records]))
    prefixes = []
    real = generate.shared_prefix_cache
    monkeypatch.setattr(generate, "shared_prefix_cache", lambda m, prefix, d: prefixes.append(len(prefix)) or
                        real(m, prefix, d))
    got = {}
    for share in (False, True):
        req = kb_request(ec.model, ec.source, e_q, records, KB_VARIANTS["kblampp"], ec.tail_table)
        gens = generate.generate_rows(ec.model, ec.tokenizer, prompts, 6, batch_size=3, request=req, progress=False,
                                      share_prefix=share)
        got[share] = gens, req.records
    assert len(prefixes) == 1 and prefixes[0] > 10  # the chat template's system part, computed once
    req = kb_request(ec.model, ec.source, e_q, records, KB_VARIANTS["kblampp"], ec.tail_table)
    default = generate.generate_rows(ec.model, ec.tokenizer, prompts, 6, batch_size=3, request=req, progress=False)
    assert len(prefixes) == 2 and [g.output for g in default] == [g.output for g in got[True][0]]  # from the model
    assert [g.output for g in got[True][0]] == [g.output for g in got[False][0]]
    assert all(g.pred == r.answer for g, r in zip(got[True][0], records))
    for i, rec in got[False][1].items():
        assert got[True][1][i].cand_ids == rec.cand_ids
        assert got[True][1][i].alpha == pytest.approx(rec.alpha, abs=1e-5)
