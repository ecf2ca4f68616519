"""KBLaMPP: a patched Hugging Face causal LM plus every `kb_` module (SPEC sections 6-7).

    model = KBLaMPP(backbone, cfg, d_ctx=384)
    ctx = KBContext(source=TensorKB(...), e_q=e_q, tau=tau, record=True)
    with model.kb_request(ctx):
        out = model.generate(input_ids, max_new_tokens=16)   # each new token retrieves (retrieval_positions "all")
    ctx.records[layer] -> [LayerRecord(alpha, cand_ids, beta, hidden), ...]
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from kblampp import hf_arch
from kblampp.backbone import check_backbone
from kblampp.config import ConfigError, KBConfig, check_retrieval_positions
from kblampp.injection_wrapper import KBInjection, is_patched, patch_layers, unpatch_layers
from kblampp.kb_context import ContextHolder, KBContext

KB_PREFIX = "kb_"


class KBLaMPP(nn.Module):
    """Owns the backbone (patched at `cfg.inject_layers`) and all KB modules (`kb_layers`, `kb_*`)."""

    def __init__(self, backbone: nn.Module, cfg: KBConfig, d_ctx: int | None = None, patch: bool = True):
        super().__init__()
        hf_arch.check_supported(backbone)
        check_backbone(cfg, backbone)  # d_model and inject layers, one wording everywhere
        d_model = hf_arch.hidden_size(backbone)
        if d_ctx is None:
            d_ctx = cfg.d_ctx
        if d_ctx is None:
            raise ConfigError("d_ctx: not set in the config and not given (use the embedding model's dimension)")
        if cfg.d_ctx is not None and cfg.d_ctx != d_ctx:
            raise ConfigError(f"d_ctx: config says {cfg.d_ctx} but the embedding dimension is {d_ctx}")
        layers = list(cfg.inject_layers)
        if cfg.K_top < 1:
            raise ConfigError(f"K_top: must be >= 1, got {cfg.K_top}")
        if cfg.K_pool is not None and cfg.K_pool < cfg.K_top:
            raise ConfigError(f"K_pool: must be >= K_top ({cfg.K_top}) or null, got {cfg.K_pool}")
        check_retrieval_positions(cfg.retrieval_positions)
        self.backbone = backbone
        self.retrieval_positions = cfg.retrieval_positions  # what serving and evaluation put in each KBContext
        self.d_model, self.d_ctx, self.inject_layers = d_model, d_ctx, layers
        self.kb_layers = nn.ModuleDict({str(idx): KBInjection(
            idx, d_model, cfg.d_k, cfg.d_v, d_ctx, cfg.K_top, cfg.gamma, cfg.eta, cfg.temperature,
            k_pool=cfg.K_pool)
            for idx in layers})
        self.kb_layers[str(layers[0])].links_names = True  # name linking (`name_link`) feeds the first hop only
        self.kb_layers[str(layers[0])].links_only = cfg.name_link_only
        if len(layers) > 1:  # which layer's candidates the answer head copies from (kblampp.hops)
            from kblampp.hops import KBHopChoice

            self.kb_hop_choice = KBHopChoice(d_model, len(layers))
        self.holder = ContextHolder()
        if patch:
            self.patch()

    # -- patching -------------------------------------------------------------------------------
    def patch(self) -> None:
        patch_layers(self.backbone, {int(k): m for k, m in self.kb_layers.items()}, self.holder)

    def unpatch(self) -> None:
        unpatch_layers(self.backbone, self.inject_layers)

    @property
    def patched(self) -> bool:
        return all(is_patched(self.backbone, idx) for idx in self.inject_layers)

    def register_kb_module(self, name: str, module: nn.Module) -> None:
        """Attach another KB module (answer head copy gate, trainable K/V encoder) under a `kb_` name."""
        if not name.startswith(KB_PREFIX) or "." in name:
            raise ValueError(f"KB module name {name!r} must start with {KB_PREFIX!r} and contain no dot")
        if hasattr(self, name):
            raise ValueError(f"KBLaMPP already has an attribute {name!r}")
        self.add_module(name, module)

    # -- running --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def kb_request(self, ctx: KBContext) -> Iterator[KBContext]:
        """Every inject layer sees `ctx` inside the block (forward, generate); cleared on exit."""
        with self.holder.activate(ctx):
            yield ctx

    def forward(self, **hf_kwargs: Any) -> Any:
        return self.backbone(**hf_kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.backbone.generate(*args, **kwargs)

    def compute_query(self, hidden: torch.Tensor, e_q: torch.Tensor | None, layer: int | None = None) -> torch.Tensor:
        """Q = kb_linear_q(h) + kb_query_ctx(e_q) at `layer` (default: the first inject layer), without
        running the backbone; `hidden` (B, T, d_model) or (B, d_model) as recorded in LayerRecord.hidden."""
        kb = self.kb_layers[str(self.inject_layers[0] if layer is None else layer)]
        if hidden.dim() == 2:
            return kb.query(hidden.unsqueeze(1), e_q).squeeze(1)
        return kb.query(hidden, e_q)

    def retrieval_scores(self, q: torch.Tensor, keys: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """sem over ALL keys, (..., N) = q @ keys.T / sqrt(d_k), for a contrastive retrieval loss."""
        return self.kb_layers[str(self.inject_layers[0] if layer is None else layer)].sem(q, keys)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that currently require grad (after `freeze_non_kb`: exactly the `kb_` ones)."""
        return [p for p in self.parameters() if p.requires_grad]

    def kb_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters():
            if any(part.startswith(KB_PREFIX) for part in name.split(".")):
                yield name, param
