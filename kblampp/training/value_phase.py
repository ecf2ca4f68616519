"""Stage A, value/decoding warm-up: end-to-end answer CE with the gold supporting facts forced into
the candidates (teacher forcing), so the value MLP, linear_v, fusion and gate learn to turn a
retrieved fact into the answer tokens. The query side stays as the retrieval phase left it.

SPEC section 7: on CPU this path does not learn to decode names in a few hundred steps; it is kept,
trained and reported as its own row (it is what a GPU budget can push).
"""
from __future__ import annotations

import torch

from kblampp.data import QADataset, batch_schedule
from kblampp.training.common import StageModules
from kblampp.training.losses import answer_ce
from kblampp.training.loop import Phase


class ValueTrainer:
    def __init__(self, mods: StageModules, train: QADataset, rank: int = 0, world: int = 1):
        self.mods, self.train, self.rank, self.world = mods, train, rank, world
        self.cfg = mods.cfg

    def step(self, micro: int) -> tuple[torch.Tensor, dict[str, float], int]:
        rows = batch_schedule(len(self.train), self.cfg.batch_size, micro, self.cfg.seed + 1, self.rank, self.world)
        batch = self.mods.batch(self.train, rows)
        out, _ = self.mods.forward(batch, self.mods.tensor_kb(grad=True), forced=True)
        loss = answer_ce(out.logits, batch["labels"])
        return loss, {}, int(batch["attention_mask"].sum())

    def phase(self) -> Phase:
        sa = self.cfg.stage_a
        params = self.mods.params(value=True)
        return Phase(name="value", params=params, step_fn=self.step, steps=sa.value_steps, lr=sa.value_lr,
                     grad_accum=max(1, self.cfg.grad_accum))
