"""Order among siblings inside the model: the retrieved candidates sharing a (head, relation) are ranked
by the typed time constraint (KBContext.time_kind), from the source's head/relation ids or, without
them, from identical keys; old window-only checkpoints load into the per-kind time scorer."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from kblampp.config import KBConfig
from kblampp.injection_wrapper import same_group
from kblampp.kb_context import KBContext
from kblampp.kb_params import load_kb_checkpoint, save_kb_checkpoint
from kblampp.model import KBLaMPP
from kblampp.retrieval import TensorKB
from kblampp.scorers import kind_index, upgrade_legacy_weight
from kblampp.timewin import window_days
from tiny_models import TINY_MODELS

D_K, D_V, D_CTX = 16, 24, 12
WINDOWS = [("1990", "1999"), ("2000", "2004"), ("2005", "2011-03"), ("2011-04", None), ("1950", None)]


def ceo_kb(with_ids: bool) -> TensorKB:
    """Facts 0-3: one company's CEOs (one shared key: same head and relation); fact 4: another head."""
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(D_K, generator=gen)
    K = torch.stack([key] * 4 + [torch.randn(D_K, generator=gen)])
    lo, hi = zip(*[window_days(a, b) for a, b in WINDOWS])
    ids = dict(head_id=torch.tensor([7, 7, 7, 7, 9]), rel_id=torch.tensor([2, 2, 2, 2, 2])) if with_ids else {}
    return TensorKB(K, torch.randn(5, D_V, generator=gen), torch.zeros(5, D_CTX), torch.tensor(lo),
                    torch.tensor(hi), **ids)


def test_same_group_from_ids_equals_key_fallback_and_masks_missing():
    rows_ids = ceo_kb(True).fetch(torch.tensor([[[0, 4, 2, 3]]]))
    rows_keys = {k: v for k, v in rows_ids.items() if k not in ("head_id", "rel_id")}
    valid = torch.tensor([[[True, True, True, False]]])
    a, b = same_group(rows_ids, valid), same_group(rows_keys, valid)
    assert torch.equal(a, b)
    want = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(a[0, 0], want)


def test_tensor_kb_group_ids_checked():
    kb = ceo_kb(False)
    with pytest.raises(ValueError, match="head_id and rel_id: give both or neither"):
        TensorKB(kb.K, kb.V, kb.ctx_vec, kb.tau_min, kb.tau_max, head_id=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rel_id: expected shape \(5,\), got \(4,\)"):
        TensorKB(kb.K, kb.V, kb.ctx_vec, kb.tau_min, kb.tau_max, head_id=torch.zeros(5), rel_id=torch.zeros(4))


@pytest.mark.parametrize("with_ids", [True, False])
def test_model_alpha_follows_the_constraint_kind(with_ids):
    """Equal sem and phi among the CEOs: the time kind alone decides which CEO gets the most alpha."""
    cfg = KBConfig(inject_layers=[1], d_k=D_K, d_v=D_V, K_top=5)
    torch.manual_seed(1)
    model = KBLaMPP(TINY_MODELS[sorted(TINY_MODELS)[0]](), cfg, d_ctx=D_CTX)
    asks = {("before", None, "2010"): 2, ("after", "2005", None): 2, ("first", None, None): 0,
            ("last", None, None): 3, ("at", "2001", "2001"): 1, ("right_after", "2005-01-01", None): 2}
    taus = [[math.nan, math.nan] if a is b is None else list(window_days(a, b)) for (_k, a, b) in asks]
    ctx = KBContext(source=ceo_kb(with_ids), e_q=torch.zeros(len(asks), D_CTX), tau=torch.tensor(taus),
                    time_kind=torch.tensor([kind_index(k) for (k, _a, _b) in asks]), record=True)
    x = torch.randint(3, 300, (len(asks), 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), model.kb_request(ctx):
        model(input_ids=x)
    rec = ctx.records[1][0]
    alpha, cand = rec.alpha[:, -1], rec.cand_ids[:, -1]  # (B, K) at the last position
    for row, want in enumerate(asks.values()):
        ceo = [(a, int(c)) for a, c in zip(alpha[row].tolist(), cand[row].tolist()) if c < 4]
        assert max(ceo)[1] == want, (list(asks)[row], ceo)


def test_window_only_checkpoint_loads_into_the_per_kind_scorer(tmp_path):
    cfg = KBConfig(inject_layers=[1], d_k=D_K, d_v=D_V, K_top=4)
    model = KBLaMPP(TINY_MODELS[sorted(TINY_MODELS)[0]](), cfg, d_ctx=D_CTX)
    path = save_kb_checkpoint(model, cfg, tmp_path / "kb.safetensors")
    tensors = load_file(str(path))
    name = "kb_layers.1.kb_time_scorer.weight"
    tensors[name] = torch.tensor([0.5, 2.0, 1.5, -0.25])  # the old (4,) layout
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    save_file(tensors, str(path), metadata=meta)
    load_kb_checkpoint(model, path)
    got = dict(model.named_parameters())[name].detach()
    assert torch.equal(got, upgrade_legacy_weight(torch.tensor([0.5, 2.0, 1.5, -0.25])))
