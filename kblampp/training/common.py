"""What the LM phases share: the trainable pieces in one holder, a TensorKB recomputed from the
trainable K/V encoder, and one patched forward with a KB context built from a batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kblampp.config import KBConfig
from kblampp.kb_context import KBContext
from kblampp.retrieval import TensorKB
from kblampp.training.facts import FactTable

VALUE_PARTS = ("kb_fusion",)


@dataclass
class StageModules:
    """The model, the K/V encoder and the fact table; `holder` names every kb_ tensor a checkpoint holds
    (`model.` for KBLaMPP's modules, `kv.` for the encoder)."""

    cfg: KBConfig
    model: Any  # KBLaMPP
    kv: Any  # KVEncoder
    table: FactTable

    def __post_init__(self) -> None:
        self.holder = nn.ModuleDict({"model": self.model, "kv": self.kv})
        self.group_ids = self.table.group_ids()  # (head_id, rel_id): the candidates' siblings in the model
        self.siblings = self.table.sibling_index()  # (N, L): the same siblings for scores over all facts

    @property
    def device(self) -> torch.device:
        return self.table.e_h.device

    def batch(self, dataset: Any, rows: list[int]) -> dict[str, torch.Tensor]:
        """A collated batch of `dataset` rows on the model's device."""
        return {k: v.to(self.device) for k, v in dataset.batch(rows).items()}

    @property
    def first_layer(self) -> int:
        return int(self.model.inject_layers[0])

    def layer_modules(self) -> dict[int, Any]:
        return {int(k): m for k, m in self.model.kb_layers.items()}

    def layer_names(self) -> dict[int, str]:
        return {int(k): f"model.kb_layers.{k}" for k in self.model.kb_layers}

    def params(self, *, query: bool = False, value: bool = False, keys: bool = False, gate: bool = False
               ) -> dict[str, nn.Parameter]:
        """Named parameters of the chosen groups: query side, value side (value/time MLP, fusion),
        key MLP, answer-head copy gate."""
        out: dict[str, nn.Parameter] = {}
        for layer, kb in self.layer_modules().items():
            for name, p in kb.named_parameters():
                part = name.split(".")[0]
                if (query and part != "kb_fusion") or (value and part in VALUE_PARTS):
                    out[f"{self.layer_names()[layer]}.{name}"] = p
        if value:
            for mod in ("kb_value_mlp", "kb_time_mlp"):
                out.update({f"kv.{mod}.{n}": p for n, p in getattr(self.kv, mod).named_parameters()})
        if keys:
            out.update({f"kv.kb_key_mlp.{n}": p for n, p in self.kv.kb_key_mlp.named_parameters()})
        if gate:
            gate_mod = getattr(self.model, "kb_copy_gate", None)
            if gate_mod is None:
                raise ValueError("the model has no kb_copy_gate (register the answer head's gate first)")
            out.update({f"model.kb_copy_gate.{n}": p for n, p in gate_mod.named_parameters()})
        return out

    def tensor_kb(self, grad: bool) -> TensorKB:
        """Every fact's K and V through the current encoder (with grad when `grad`)."""
        t = self.table
        with torch.set_grad_enabled(grad):
            K = self.kv.encode_keys(t.e_h, t.e_r)
            V = self.kv.encode_values(t.e_t, t.e_c, t.tau_min.float(), t.tau_max.float())
        head_id, rel_id = self.group_ids
        return TensorKB(K, V, t.ctx_vec, t.tau_min.float(), t.tau_max.float(), similarity=self.cfg.index.similarity,
                        head_id=head_id, rel_id=rel_id)

    def forward(self, batch: dict[str, torch.Tensor], kb: TensorKB, forced: bool = False, record: bool = False
                ) -> tuple[Any, KBContext]:
        """One patched forward over the batch with its e_q / tau (and gold facts forced if asked)."""
        ctx = KBContext(source=kb, e_q=batch["e_q"], tau=batch["tau"], time_kind=batch.get("time_kind"),
                        forced_ids=batch["supporting"] if forced else None, record=record)
        with self.model.kb_request(ctx):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out, ctx


def answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) token that position t must predict (labels shifted left), -100 where none."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
