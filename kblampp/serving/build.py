"""Load everything a server needs once: config, backbone, embedder, KB checkpoint, live store + index.

Why here and not in the script: tests and the load benchmark build the same engine without argparse.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from kblampp.config import KBConfig
from kblampp.serving.config import ServerSettings
from kblampp.serving.engine import Engine


def build_engine(cfg: KBConfig, checkpoint: str | Path, settings: ServerSettings,
                 wal_path: str | Path | None = None) -> Engine:
    """The engine for `cfg` (backbone, embedding model, store_dir, index.method) and a KB checkpoint."""
    from kblampp.answer_head import tail_builders
    from kblampp.embedding import load_embedder
    from kblampp.evaluation.runner import load_model
    from kblampp.serving.live_kb import StoreLiveKB
    from kblampp.serving.model_answerer import KBModelAnswerer

    t0 = time.perf_counter()
    embedder = load_embedder(cfg.embedding_model, device=cfg.device)
    model, tokenizer = load_model(cfg, checkpoint, embedder.dim)  # the evaluation's loader: same model
    store_dir = Path(cfg.store_dir)
    method = cfg.index.method if (store_dir / f"index_{cfg.index.method}").is_dir() else None
    # the store may carry tail tables (written by training/evaluation): give edits their rows
    manifest = json.loads((store_dir / "manifest.json").read_text(encoding="utf-8"))
    kb = StoreLiveKB(store_dir, embedder, method=method, extra_builders=tail_builders(manifest, tokenizer))
    answerer = KBModelAnswerer(model, tokenizer, kb)
    info = {"model": cfg.backbone, "checkpoint": str(checkpoint), "inject_layers": list(cfg.inject_layers),
            "K_top": cfg.K_top, "answer_head": answerer.answer_head, "reference_date": cfg.reference_date,
            "load_s": round(time.perf_counter() - t0, 3)}
    wal = Path(wal_path) if wal_path else store_dir.parent / f"{store_dir.name}.wal.jsonl"
    return Engine(kb, answerer, embedder, wal, settings, info=info)
