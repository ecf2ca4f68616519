"""The model path that evaluation and serving share: the KB checkpoint, the patched model with its
answer head and abstention decision, and the KB source it retrieves from.

Why its own module: evaluation and serving must answer with the same model; neither imports the
other, both import this (and `kblampp.inference.generate` for greedy generation).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from kblampp.config import ConfigError, KBConfig

FINAL_CHECKPOINT = "kb_final.safetensors"
log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A KB checkpoint file, or a Stage A/B run folder holding `kb_final.safetensors`."""
    p = Path(path)
    if p.is_dir():
        if (p / FINAL_CHECKPOINT).is_file():
            return p / FINAL_CHECKPOINT
        raise FileNotFoundError(f"{p}: no {FINAL_CHECKPOINT} in this run folder (did training finish?)")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    return p


def with_checkpoint_layers(cfg: KBConfig, metadata: dict[str, str], checkpoint: str | Path) -> KBConfig:
    """`cfg` with the inject layers the checkpoint was trained with (saved in its config): a one-layer
    config can load a multi-hop checkpoint and the other way round; the change is logged."""
    try:
        saved = json.loads(metadata.get("config", "{}")).get("inject_layers")
    except json.JSONDecodeError:
        return cfg
    if saved and [int(x) for x in saved] != [int(x) for x in cfg.inject_layers]:
        log.warning("%s: trained with inject_layers %s; using them instead of the config's %s", checkpoint, saved,
                    list(cfg.inject_layers))
        return dataclasses.replace(cfg, inject_layers=[int(x) for x in saved])
    return cfg


def load_model(cfg: KBConfig, checkpoint: str | Path, d_ctx: int) -> tuple[Any, Any]:
    """(KBLaMPP with the checkpoint's KB tensors, tokenizer); the copy gate is registered when the
    checkpoint has one, and a Stage B run (stage_b_adapter.json beside it) gets its LoRA adapters."""
    from kblampp.abstention import head_from_tensors
    from kblampp.answer_head import KBCopyGate
    from kblampp.backbone import load_backbone
    from kblampp.kb_params import load_kb_checkpoint, read_kb_checkpoint
    from kblampp.model import KBLaMPP

    tensors, metadata = read_kb_checkpoint(checkpoint)
    cfg = with_checkpoint_layers(cfg, metadata, checkpoint)
    backbone, tokenizer = load_backbone(cfg)
    model = KBLaMPP(backbone, cfg, d_ctx=d_ctx)
    if any(".kb_copy_gate." in f".{name}" for name in tensors):
        model.register_kb_module("kb_copy_gate", KBCopyGate(model.d_model))
    abstain = head_from_tensors(tensors)
    if abstain is not None:  # a run with the trained abstention decision
        model.register_kb_module("kb_abstain", abstain)
    skip = ("kb_abstain.",) if abstain is None else ()  # a decision of an older feature set is not loaded
    if (Path(checkpoint).parent / "stage_b_adapter.json").is_file():  # a Stage B run: LoRA / top layers too
        from kblampp.training.stage_b import load_stage_b

        load_stage_b(model, Path(checkpoint).parent)
    else:
        load_kb_checkpoint(model, checkpoint, skip)
    return model.to(cfg.device).eval(), tokenizer


def build_source(cfg: KBConfig, store: Any) -> tuple[Any, Any]:
    """(KB source, index or None): the faiss index when cfg.retrieval == 'faiss', else exact top-k."""
    from kblampp.retrieval import IndexedKB, TensorKB

    if cfg.retrieval == "faiss":
        from kblampp.knowledge_index import KnowledgeIndex, apply_search_params

        index = KnowledgeIndex.load(store.index_dir(cfg.index.method), expect_n=store.n, expect_dim=store.d_k,
                                    expect_store_id=store.store_id)
        apply_search_params(index, cfg.index)
        return IndexedKB(index, store), index
    if cfg.retrieval != "exact":
        raise ConfigError(f"retrieval: {cfg.retrieval!r} is not one of exact, faiss")
    return TensorKB.from_store(store, device=cfg.device, similarity=cfg.index.similarity), None
