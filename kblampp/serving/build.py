"""Load everything a server needs once: config, backbone, embedder, KB checkpoint, live store + index.

Why here and not in the script: tests and the load benchmark build the same engine without argparse.
"""
from __future__ import annotations

import time
from pathlib import Path

from kblampp.config import KBConfig
from kblampp.serving.config import ServerSettings
from kblampp.serving.engine import Engine


def build_engine(cfg: KBConfig, checkpoint: str | Path, settings: ServerSettings,
                 wal_path: str | Path | None = None) -> Engine:
    """The engine for `cfg` (backbone, embedding model, store_dir, index.method) and a KB checkpoint."""
    import torch

    from kblampp.answer_head import KBCopyGate
    from kblampp.backbone import load_backbone
    from kblampp.embedding import load_embedder
    from kblampp.kb_params import load_kb_checkpoint, read_kb_checkpoint
    from kblampp.model import KBLaMPP
    from kblampp.serving.live_kb import StoreLiveKB
    from kblampp.serving.model_answerer import KBModelAnswerer

    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    backbone, tokenizer = load_backbone(cfg)
    embedder = load_embedder(cfg.embedding_model, device=cfg.device)
    model = KBLaMPP(backbone, cfg, d_ctx=embedder.dim)
    tensors, _ = read_kb_checkpoint(checkpoint)
    if any(".kb_copy_gate." in f".{name}" for name in tensors):  # a checkpoint with the answer head
        model.register_kb_module("kb_copy_gate", KBCopyGate(model.d_model))
    load_kb_checkpoint(model, checkpoint)
    model.to(cfg.device).eval()
    store_dir = Path(cfg.store_dir)
    method = cfg.index.method if (store_dir / f"index_{cfg.index.method}").is_dir() else None
    kb = StoreLiveKB(store_dir, embedder, method=method)
    answerer = KBModelAnswerer(model, tokenizer, kb)
    info = {"model": cfg.backbone, "checkpoint": str(checkpoint), "inject_layers": list(cfg.inject_layers),
            "K_top": cfg.K_top, "answer_head": answerer.answer_head, "load_s": round(time.perf_counter() - t0, 3)}
    wal = Path(wal_path) if wal_path else store_dir.parent / f"{store_dir.name}.wal.jsonl"
    return Engine(kb, answerer, embedder, wal, settings, info=info)
