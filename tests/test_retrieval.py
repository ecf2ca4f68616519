"""Exact on-device top-k agrees with a flat faiss KnowledgeIndex; IndexedKB and TensorKB feed the model
identically; deleted facts and faiss -1 padding never get weight."""
import numpy as np
import pytest
import torch

from kblampp.config import KBConfig
from kblampp.kb_context import KBContext
from kblampp.knowledge_index import KnowledgeIndex
from kblampp.model import KBLaMPP
from kblampp.retrieval import FIELDS, IndexedKB, TensorKB, random_tensor_kb
from tiny_models import TINY_MODELS

D_K, D_V, D_CTX = 16, 24, 12


class DictStore:
    """The value-store duck type: `.n` and `.fetch(ids) -> dict of tensors`."""

    def __init__(self, kb: TensorKB, alive=None):
        self.kb, self.n, self.alive = kb, kb.num_facts, alive

    def fetch(self, ids):
        rows = {name: getattr(self.kb, name)[torch.as_tensor(ids)] for name in FIELDS}
        if self.alive is not None:
            rows["alive"] = self.alive[torch.as_tensor(ids)]
        return rows


@pytest.mark.parametrize("similarity", ["ip", "cosine"])
def test_exact_topk_equals_flat_faiss(similarity):
    kb = random_tensor_kb(2000, D_K, D_V, D_CTX, seed=1)
    kb.similarity = similarity
    q = torch.randn(50, D_K, generator=torch.Generator().manual_seed(5))
    index = KnowledgeIndex.build(kb.K.numpy(), "flat", similarity)
    _, want = index.search(q.numpy(), 8)
    got = kb.search(q, 8)
    assert got.dtype == torch.long and got.shape == (50, 8)
    assert np.array_equal(got.numpy(), want)
    assert torch.equal(IndexedKB(index, DictStore(kb)).search(q, 8), got)


def test_chunked_search_and_grad_through_fetch():
    K = torch.randn(300, D_K, requires_grad=True)
    kb = TensorKB(K, torch.randn(300, D_V), torch.randn(300, D_CTX), torch.zeros(300), torch.ones(300))
    q = torch.randn(40, D_K)
    small = TensorKB(K, kb.V, kb.ctx_vec, kb.tau_min, kb.tau_max, chunk_elems=600)  # 2 queries per chunk
    assert torch.equal(kb.search(q, 5), small.search(q, 5))
    ids = kb.search(q, 5)
    assert not ids.requires_grad
    rows = kb.fetch(ids)
    assert rows["K"].shape == (40, 5, D_K) and rows["tau_min"].shape == (40, 5)
    rows["K"].sum().backward()
    assert K.grad is not None and K.grad.abs().sum() > 0  # a trainable encoder gets gradient


def test_dead_facts_never_retrieved():
    kb = random_tensor_kb(6, D_K, D_V, D_CTX)
    alive = torch.tensor([True, False, True, False, False, False])
    live = TensorKB.from_store(DictStore(kb, alive))
    ids = live.search(torch.randn(4, D_K), 3)
    assert set(ids[:, :2].flatten().tolist()) <= {0, 2}
    assert (ids[:, 2] == -1).all()  # only two live facts


def test_bad_arrays():
    with pytest.raises(ValueError, match=r"TensorKB: V: expected a 2-d tensor with N=5 rows, got \(4, 3\)"):
        TensorKB(torch.zeros(5, 2), torch.zeros(4, 3), torch.zeros(5, 2), torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="similarity: 'l2' is not one of ip, cosine"):
        TensorKB(torch.zeros(5, 2), torch.zeros(5, 3), torch.zeros(5, 2), torch.zeros(5), torch.zeros(5),
                 similarity="l2")
    with pytest.raises(TypeError, match="IndexedKB: store dict has no .fetch"):
        IndexedKB(KnowledgeIndex.build(np.eye(4, dtype=np.float32), "flat", "ip"), {})


def _model(arch):
    cfg = KBConfig(inject_layers=[1], d_k=D_K, d_v=D_V, K_top=4)
    torch.manual_seed(1)
    model = KBLaMPP(TINY_MODELS[arch](), cfg, d_ctx=D_CTX)
    with torch.no_grad():
        model.kb_layers["1"].kb_fusion.kb_linear_v.weight.normal_()
    return model


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_indexed_and_tensor_kb_give_same_outputs(arch):
    model, kb = _model(arch), random_tensor_kb(500, D_K, D_V, D_CTX, seed=3)
    index = KnowledgeIndex.build(kb.K.numpy(), "flat", "ip")
    x = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    e_q = torch.randn(2, D_CTX)
    outs = []
    for source in (kb, IndexedKB(index, DictStore(kb))):
        ctx = KBContext(source=source, e_q=e_q, record=True)
        with torch.no_grad(), model.kb_request(ctx):
            outs.append((model(input_ids=x).logits, ctx.records[1][0].cand_ids))
    assert torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][0], outs[1][0])


def test_faiss_padding_gets_no_weight():
    """An HNSW index hides deleted facts; fewer live hits than K_top come back as -1 slots."""
    model, kb = _model("llama"), random_tensor_kb(3, D_K, D_V, D_CTX)
    index = KnowledgeIndex.build(kb.K.numpy(), "hnsw", "ip")
    index.remove([1, 2])
    ctx = KBContext(source=IndexedKB(index, DictStore(kb)), e_q=torch.randn(1, D_CTX), record=True)
    with torch.no_grad(), model.kb_request(ctx):
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    rec = ctx.records[1][0]
    assert torch.isfinite(logits).all()
    assert (rec.cand_ids[..., 0] == 0).all() and (rec.cand_ids[..., 1:] == -1).all()
    assert torch.equal(rec.alpha[..., 0], torch.ones(1, 3)) and torch.equal(rec.alpha[..., 1:], torch.zeros(1, 3, 2))
