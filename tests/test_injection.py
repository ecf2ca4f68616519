"""Patched tiny Llama / Qwen2: gate closed = base model (forward and generate with the KV cache),
unpatch restores, only kb_ parameters train, records, teacher forcing, clear errors."""
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kblampp.config import ConfigError, KBConfig
from kblampp.injection_wrapper import KBAttentionWrapper, drop_excluded, force_candidates, only_candidates
from kblampp.kb_context import KBContext
from kblampp.kb_params import freeze_non_kb, is_kb_name
from kblampp.model import KBLaMPP
from kblampp.retrieval import random_tensor_kb
from tiny_models import TINY_MODELS

D_K, D_V, D_CTX = 16, 24, 12
ARCHS = sorted(TINY_MODELS)


def make(arch, layers=(1,), k_top=4, open_branch=True):
    cfg = KBConfig(inject_layers=list(layers), d_k=D_K, d_v=D_V, K_top=k_top)
    torch.manual_seed(1)
    model = KBLaMPP(TINY_MODELS[arch](), cfg, d_ctx=D_CTX)
    if open_branch:  # a non-zero knowledge branch, so "equal to base" is not trivially true
        with torch.no_grad():
            for kb in model.kb_layers.values():
                kb.kb_fusion.kb_linear_v.weight.normal_(0, 1.0)
                kb.kb_fusion.kb_gate.bias.fill_(0.0)
    return model


def request(batch=2, **kw):
    gen = torch.Generator().manual_seed(2)
    tau = torch.tensor([[18000.0, 18400.0], [math.nan, math.nan]])[:batch]
    return KBContext(source=random_tensor_kb(64, D_K, D_V, D_CTX), e_q=torch.randn(batch, D_CTX, generator=gen),
                     tau=tau, **kw)


def ids(batch=2, length=7):
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_closed_equals_base_forward_and_generate(arch):
    model, base = make(arch), TINY_MODELS[arch]()
    x = ids()
    gen_kw = dict(max_new_tokens=5, do_sample=False, use_cache=True, return_dict_in_generate=True,
                  output_logits=True, pad_token_id=0)
    with torch.no_grad():
        want = base(input_ids=x).logits
        want_gen = base.generate(x, **gen_kw)
        with model.kb_request(request(gate_closed=True)):
            got = model(input_ids=x).logits
            got_gen = model.generate(x, **gen_kw)
        opened = request()
        with model.kb_request(opened):
            open_logits = model(input_ids=x).logits
        no_ctx = model(input_ids=x).logits  # outside a request the wrappers pass through
    assert torch.equal(got, want)
    assert torch.equal(no_ctx, want)
    assert torch.equal(got_gen.sequences, want_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got_gen.logits, want_gen.logits))
    assert not torch.allclose(open_logits, want)  # the open branch does change the output
    assert model.holder.ctx is None


@pytest.mark.parametrize("arch", ARCHS)
def test_at_init_patched_model_is_base_model(arch):
    model, base = make(arch, open_branch=False), TINY_MODELS[arch]()
    x = ids()
    with torch.no_grad(), model.kb_request(request()):
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_modules_and_keys(arch):
    base = TINY_MODELS[arch]()
    originals = [layer.self_attn for layer in base.model.layers]
    keys = list(base.state_dict())
    model = KBLaMPP(base, KBConfig(inject_layers=[0, 1], d_k=D_K, d_v=D_V), d_ctx=D_CTX)
    assert model.patched and all(isinstance(layer.self_attn, KBAttentionWrapper) for layer in base.model.layers)
    assert any(".self_attn.base_layer." in k for k in base.state_dict())
    assert not any(is_kb_name(k) for k in base.state_dict())  # KB tensors belong to KBLaMPP only
    model.unpatch()
    assert [layer.self_attn for layer in base.model.layers] == originals
    assert all(a is b for a, b in zip((layer.self_attn for layer in base.model.layers), originals))
    assert list(base.state_dict()) == keys
    model.patch()
    with pytest.raises(RuntimeError, match="layer 0 is already patched"):
        model.patch()


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_cache_retrieves_each_token_and_records(arch):
    model = make(arch)
    x = ids()
    ctx = request(record=True)
    with torch.no_grad(), model.kb_request(ctx):
        cached = model.generate(x, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0,
                                return_dict_in_generate=True, output_logits=True)
    recs = ctx.records[1]
    assert len(recs) == 4  # prefill + 3 single-token steps (the last token is not fed back)
    assert recs[0].alpha.shape == (2, 7, 4) and recs[0].cand_ids.shape == (2, 7, 4)
    assert recs[0].beta.shape == (2, 7) and recs[0].hidden.shape == (2, 7, 64)
    assert all(r.alpha.shape == (2, 1, 4) and r.beta.shape == (2, 1) for r in recs[1:])
    torch.testing.assert_close(recs[0].alpha.sum(-1), torch.ones(2, 7))
    assert not recs[0].alpha.requires_grad and not recs[0].hidden.requires_grad
    with torch.no_grad(), model.kb_request(request()):
        full = model.generate(x, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0,
                              return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_no_records_when_off_and_beam_rows_expand():
    model = make("llama")
    ctx = request()
    with torch.no_grad(), model.kb_request(ctx):
        out = model.generate(ids(), max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)
    assert ctx.records == {} and ctx.queries == {}
    with pytest.raises(ValueError, match="KBContext has 2 rows but the model batch has 3"):
        ctx.rows(ctx.e_q, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_kb_parameters_train_and_get_gradients(arch):
    model = make(arch, layers=(0, 1))
    trainable, frozen = freeze_non_kb(model)
    assert trainable > 0 and frozen > 0
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.kb_named_parameters()}
    assert all(n.startswith(("kb_layers.", "kb_hop_choice.")) for n in names)
    assert any(n.startswith("kb_hop_choice.") for n in names)  # two inject layers: the answer head's hop choice
    assert sum(p.numel() for p in model.trainable_parameters()) == trainable
    x = ids()
    with model.kb_request(request()):
        out = model(input_ids=x, labels=x)
    out.loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("kb_hop_choice."):  # read by the answer head only, not by the LM forward
            assert param.grad is None, name
        elif param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_compute_query_matches_captured_query():
    model = make("qwen2")
    ctx = request(record=True, capture_query=True)
    with model.kb_request(ctx):
        model(input_ids=ids())
    q = ctx.queries[1][0]
    assert q.requires_grad and q.shape == (2, 7, D_K)
    again = model.compute_query(ctx.records[1][0].hidden, ctx.e_q)
    assert torch.equal(again, q)
    last = model.compute_query(ctx.records[1][0].hidden[:, -1], ctx.e_q)
    torch.testing.assert_close(last, q[:, -1])  # a different matmul shape may round differently
    scores = model.retrieval_scores(last, ctx.source.K)
    assert scores.shape == (2, 64)
    torch.testing.assert_close(scores, last @ ctx.source.K.T / math.sqrt(D_K))


def test_force_candidates_hand_example():
    retrieved = torch.tensor([[[5, 6, 7, 8]], [[1, 2, 3, 4]]])
    forced = torch.tensor([[9, 6], [2, -1]])
    out = force_candidates(retrieved, forced)
    assert sorted(out[0, 0].tolist()) == [5, 6, 7, 9]  # 9 replaces the lowest non-forced (8); 6 kept
    assert sorted(out[1, 0].tolist()) == [1, 2, 3, 4]  # 2 already there, -1 is padding


def test_only_candidates_and_drop_excluded_hand_examples():
    retrieved = torch.tensor([[[5, 6, 7, 8]], [[1, 2, 3, 4]]])
    only = only_candidates(retrieved, torch.tensor([[9, 6], [-1, -1]]))
    assert only[0, 0].tolist() == [9, 6, -1, -1]  # exactly the forced ids, -1 padded
    assert only[1, 0].tolist() == [1, 2, 3, 4]  # a row without forced ids keeps its retrieval
    wide = torch.tensor([[[5, 6, 7, 8, 9, 10]], [[1, 2, 3, 4, -1, -1]]])
    kept = drop_excluded(wide, torch.tensor([[6, 5], [9, -1]]), k=4)
    assert kept[0, 0].tolist() == [7, 8, 9, 10]  # retrieval order kept, excluded ids gone
    assert kept[1, 0].tolist() == [1, 2, 3, 4]  # nothing of this row excluded; -1 (not found) never kept


def test_excluded_ids_never_candidates_and_forced_only_is_exact():
    model = make("llama")
    probe = request(record=True)
    with torch.no_grad(), model.kb_request(probe):
        model(input_ids=ids())
    top = probe.records[1][0].cand_ids[:, :, :2]  # (B, T, 2) what plain retrieval ranks first
    banned = torch.stack([top[b].flatten().unique()[:6] for b in range(top.shape[0])])  # (B, 6)
    ctx = request(record=True, excluded_ids=banned)
    with torch.no_grad(), model.kb_request(ctx):
        model.generate(ids(), max_new_tokens=2, do_sample=False, pad_token_id=0)
    for rec in ctx.records[1]:
        for b in range(banned.shape[0]):
            assert not torch.isin(rec.cand_ids[b], banned[b]).any()
    ctx = request(record=True, forced_ids=torch.tensor([[10, 20], [-1, -1]]), forced_only=True)
    with torch.no_grad(), model.kb_request(ctx):
        model(input_ids=ids())
    cand, plain = ctx.records[1][0].cand_ids, probe.records[1][0].cand_ids
    assert (cand[0, :, :2] == torch.tensor([10, 20])).all() and (cand[0, :, 2:] == -1).all()
    assert torch.equal(cand[1], plain[1])  # the row without forced ids retrieves as before


def test_forced_ids_appear_at_every_position():
    model = make("llama")
    ctx = request(record=True, forced_ids=torch.tensor([[10, 20], [30, -1]]))
    with torch.no_grad(), model.kb_request(ctx):
        model.generate(ids(), max_new_tokens=3, do_sample=False, pad_token_id=0)
    for rec in ctx.records[1]:
        cand = rec.cand_ids
        assert ((cand[0] == 10).any(-1) & (cand[0] == 20).any(-1)).all()
        assert (cand[1] == 30).any(-1).all()


def test_request_cleared_on_error():
    model = make("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with model.kb_request(request()):
            assert model.holder.ctx is not None
            raise RuntimeError("boom")
    assert model.holder.ctx is None
    with pytest.raises(ValueError, match="KBContext.source is None"):
        with model.kb_request(KBContext()):
            model(input_ids=ids())


def test_config_errors():
    cfg = KBConfig(inject_layers=[1], d_k=D_K, d_v=D_V)
    tiny_gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100))
    with pytest.raises(ConfigError, match=r"model_type 'gpt2' .*not supported.*\(supported: llama, qwen2\)"):
        KBLaMPP(tiny_gpt2, cfg, d_ctx=D_CTX)
    with pytest.raises(ConfigError, match="d_model: config says 2048 but backbone '.*' has hidden size 64; remove d_model"):
        KBLaMPP(TINY_MODELS["llama"](), KBConfig(d_model=2048, inject_layers=[1]), d_ctx=D_CTX)
    with pytest.raises(ConfigError, match=r"inject_layers\[0\]: layer 8 is out of range for backbone '.*' with 2 layers \(valid: 0..1\)"):
        KBLaMPP(TINY_MODELS["qwen2"](), KBConfig(inject_layers=[8]), d_ctx=D_CTX)
    with pytest.raises(ConfigError, match="d_ctx: not set"):
        KBLaMPP(TINY_MODELS["qwen2"](), KBConfig(inject_layers=[1]))
    with pytest.raises(ConfigError, match="d_ctx: config says 384 but the embedding dimension is 12"):
        KBLaMPP(TINY_MODELS["qwen2"](), KBConfig(inject_layers=[1], d_ctx=384), d_ctx=12)


def test_register_kb_module():
    model = make("llama")
    model.register_kb_module("kb_copy_gate", torch.nn.Linear(64, 1))
    assert "kb_copy_gate.weight" in dict(model.kb_named_parameters())
    with pytest.raises(ValueError, match="must start with 'kb_'"):
        model.register_kb_module("copy_gate", torch.nn.Linear(64, 1))
    with pytest.raises(ValueError, match="already has an attribute 'kb_copy_gate'"):
        model.register_kb_module("kb_copy_gate", torch.nn.Linear(64, 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_generate(arch):
    model, base = make(arch), TINY_MODELS[arch]()
    x = ids()
    x[1, :3] = 0  # row 1 is left-padded
    mask = (x != 0).long()
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = base.generate(x, **kw)
        with model.kb_request(request(gate_closed=True)):
            assert torch.equal(model.generate(x, **kw), want)
        ctx = request(record=True)
        with model.kb_request(ctx):
            out = model.generate(x, **kw)
    assert out.shape == (2, 10) and len(ctx.records[1]) == 3


def whole_kb_scores(layer, kb, ctx, h):
    """s over every fact of kb for h (B, T, d_model), as the selector computes it on candidates."""
    q = layer.query(h, ctx.e_q)  # (B, T, d_k)
    N = kb.num_facts
    everything = torch.arange(N).expand(*q.shape[:2], N)
    rows = kb.fetch(everything)
    sem = torch.einsum("btd,btkd->btk", q, rows["K"]) / math.sqrt(layer.d_k)
    phi = layer.kb_context_scorer(ctx.e_q, rows["ctx_vec"])
    alone = torch.arange(N)[:, None]  # random keys: each fact is its own (head, relation) group, as select finds
    g_time = layer.kb_time_scorer(ctx.tau, rows["tau_min"], rows["tau_max"], sibling_index=alone)
    return layer.kb_selector.score(sem, phi, g_time)  # (B, T, N)


def test_k_pool_keeps_the_best_candidates_by_the_whole_score():
    """K_pool = N: the kept K_top are the whole KB's best by s = sem + gamma*phi + eta*g_time, which
    sem alone ranks differently; K_pool = K_top is today's search exactly."""
    torch.manual_seed(0)
    plain = make("llama", k_top=4)
    pooled = make("llama", k_top=4)
    pooled.kb_layers["1"].k_pool = 64
    h = torch.randn(2, 5, plain.d_model)
    layer = pooled.kb_layers["1"]
    with torch.no_grad():
        for p in layer.kb_context_scorer.parameters():
            p.normal_(0, 1.0)  # phi large enough to reorder sem's ranking
        plain.kb_layers["1"].load_state_dict(layer.state_dict())
        ctx = request()
        sel_pool, _ = layer.select(h, ctx)
        sel_plain, _ = plain.kb_layers["1"].select(h, request())
        want = whole_kb_scores(layer, ctx.source, ctx, h).topk(4, dim=-1).indices
    assert torch.equal(sel_pool.cand_ids.sort(-1).values, want.sort(-1).values)
    assert not torch.equal(sel_plain.cand_ids.sort(-1).values, want.sort(-1).values)
    assert torch.allclose(sel_pool.alpha.sum(-1), torch.ones(2, 5))
    pooled.kb_layers["1"].k_pool = 4
    with torch.no_grad():
        again, _ = pooled.kb_layers["1"].select(h, request())
    assert torch.equal(again.cand_ids, sel_plain.cand_ids) and torch.equal(again.alpha, sel_plain.alpha)


def test_k_pool_leaves_rows_with_forced_candidates_as_they_were():
    """A row with forced ids keeps today's candidates exactly; a row without any (all -1) uses the pool."""
    model = make("llama")
    layer = model.kb_layers["1"]
    with torch.no_grad():
        for p in layer.kb_context_scorer.parameters():
            p.normal_(0, 1.0)
    h = torch.randn(2, 3, model.d_model)
    for only in (False, True):
        forced = torch.tensor([[10, 20], [-1, -1]])
        with torch.no_grad():
            layer.k_pool = layer.k_top
            before, _ = layer.select(h, request(forced_ids=forced, forced_only=only))
            layer.k_pool = 64
            after, _ = layer.select(h, request(forced_ids=forced, forced_only=only))
            pooled, _ = layer.select(h, request())
        assert torch.equal(before.cand_ids[0], after.cand_ids[0])
        assert torch.allclose(before.alpha[0], after.alpha[0], rtol=0, atol=1e-6)  # matmul shapes differ: ulps
        assert torch.equal(after.cand_ids[1], pooled.cand_ids[1])
        assert not torch.equal(before.cand_ids[1].sort(-1).values, after.cand_ids[1].sort(-1).values)


def test_k_pool_smaller_than_k_top_is_refused():
    with pytest.raises(ConfigError, match=r"K_pool: must be >= K_top \(8\) or null, got 4"):
        KBLaMPP(TINY_MODELS["llama"](), KBConfig(inject_layers=[1], K_pool=4), d_ctx=D_CTX)
