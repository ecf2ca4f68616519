"""Stage A's time phase: the per-kind time-score rows learn to pick the answer among its siblings."""
import math

import torch

from kblampp.config import KBConfig
from kblampp.injection_wrapper import KBInjection
from kblampp.scorers import kind_index
from kblampp.timewin import window_days
from kblampp.training.facts import FactTable
from kblampp.training.loop import Trainer
from kblampp.training.retrieval_phase import RetrievalData
from kblampp.training.time_phase import TimeTrainer, sibling_rows

D = 8
WINDOWS = [("1990", "1999"), ("2000", "2004"), ("2005", None), ("1980", None)]


def table() -> FactTable:
    n = len(WINDOWS)
    lo, hi = zip(*[window_days(a, b) for a, b in WINDOWS])
    z = torch.zeros(n, D)
    return FactTable(e_h=z, e_r=z, e_t=z, e_c=z, ctx_vec=z, tau_min=torch.tensor(lo, dtype=torch.float64),
                     tau_max=torch.tensor(hi, dtype=torch.float64), head_keys=["Y", "Y", "Y", "Z"],
                     relation_keys=["ceo"] * 4, head_names=["Y", "Y", "Y", "Z"], tail_names=["a", "b", "c", "d"])


def data() -> RetrievalData:
    """'first' -> 0, 'last' -> 2, 'before 2000' -> 0, 'after 2004' -> 2, 'in 2002' -> 1, and one
    question about the lone fact 3 (no siblings: not trained on)."""
    asks = [("first", None, None, 0), ("last", None, None, 2), ("before", None, "1999", 0),
            ("after", "2005", None, 2), ("at", "2002", "2002", 1), ("at", "2002", "2002", 3)]
    tau = torch.tensor([[math.nan, math.nan] if a is b is None else list(window_days(a, b)) for _k, a, b, _f in asks])
    n = len(asks)
    return RetrievalData({1: torch.zeros(n, 6)}, torch.zeros(n, D), tau.float(), torch.tensor([a[3] for a in asks]),
                         torch.tensor([[a[3]] for a in asks]), ["temporal"] * n, torch.full((n, 0), -1),
                         torch.tensor([kind_index(a[0]) for a in asks]))


def test_time_phase_learns_the_kind_rows_from_zero(tmp_path):
    cfg = KBConfig(inject_layers=[1], d_k=D, d_v=D, K_top=4, log_interval=100, save_interval=0)
    cfg.stage_a.time_steps, cfg.stage_a.time_lr, cfg.stage_a.time_batch, cfg.stage_a.time_eval_interval = 60, 0.2, 5, 0
    layer = KBInjection(1, 6, D, D, D, 4, gamma=1.0, eta=1.0, temperature=1.0)
    with torch.no_grad():
        layer.kb_time_scorer.weight.zero_()  # no prior: every sibling scores the same
    trainer = TimeTrainer(cfg, {1: layer}, table(), data(), keys=torch.zeros(4, D))
    assert sibling_rows(trainer.train, trainer.siblings).tolist() == [0, 1, 2, 3, 4]
    before = trainer.evaluate(trainer.train)
    assert before["n"] == 5 and before["sibling_top1"] < 1.0
    holder = torch.nn.ModuleDict({"model": torch.nn.ModuleDict({"kb_layers": torch.nn.ModuleDict({"1": layer})})})
    result = Trainer(cfg, holder, tmp_path, progress=False).run(trainer.phase({1: "model.kb_layers.1"}))
    assert result["train"]["sibling_top1"] == 1.0
    assert result["train"]["first/sibling_top1"] == 1.0 and result["train"]["after/n"] == 1
    others = [k for k in range(layer.kb_time_scorer.weight.shape[0])
              if k not in {kind_index(x) for x in ("first", "last", "before", "after", "at")}]
    assert torch.equal(layer.kb_time_scorer.weight[others], torch.zeros(len(others), layer.kb_time_scorer.weight.shape[1]))
