"""Load everything a server needs once: config, backbone, embedder, KB checkpoint, live store + index.

Why here and not in the script: tests and the load benchmark build the same engine without argparse.
A writable server takes the store's writer lock before anything else (so a second server on the same
store fails at once, before loading a model or touching the write-ahead log); a read-only one never
takes it and never reads the log.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from kblampp.config import KBConfig, name_link_limit
from kblampp.serving.config import ServerSettings
from kblampp.serving.engine import Engine
from kblampp.store_io import StoreError, acquire_writer, release_writer


def build_engine(cfg: KBConfig, checkpoint: str | Path, settings: ServerSettings,
                 wal_path: str | Path | None = None, audit_path: str | Path | None = None) -> Engine:
    """The engine for `cfg` (backbone, embedding model, store_dir, index.method) and a KB checkpoint."""
    store_dir = Path(cfg.store_dir)
    if not (store_dir / "manifest.json").is_file():
        raise StoreError(f"{store_dir}: not a store (no manifest.json; run offline/encode_kv.py)")
    if not settings.read_only:
        acquire_writer(store_dir)  # fail fast; the live KB takes its own hold below
    try:
        return _build(cfg, checkpoint, settings, store_dir, wal_path, audit_path)
    finally:
        if not settings.read_only:
            release_writer(store_dir)


def _build(cfg: KBConfig, checkpoint: str | Path, settings: ServerSettings, store_dir: Path,
           wal_path: str | Path | None, audit_path: str | Path | None) -> Engine:
    from kblampp.abstention import model_abstainer
    from kblampp.answer_head import tail_builders
    from kblampp.embedding import load_embedder
    from kblampp.inference.loading import load_model
    from kblampp.serving.live_kb import StoreLiveKB
    from kblampp.serving.model_answerer import KBModelAnswerer

    t0 = time.perf_counter()
    embedder = load_embedder(cfg.embedding_model, device=cfg.device)
    model, tokenizer = load_model(cfg, checkpoint, embedder.dim)  # the evaluation's loader: same model
    method = cfg.index.method if (store_dir / f"index_{cfg.index.method}").is_dir() else None
    # the store may carry tail tables (written by training/evaluation): give edits their rows
    manifest = json.loads((store_dir / "manifest.json").read_text(encoding="utf-8"))
    kb = StoreLiveKB(store_dir, embedder, method=method, extra_builders=tail_builders(manifest, tokenizer),
                     read_only=settings.read_only, rebuild_fraction=settings.rebuild_fraction, index_cfg=cfg.index)
    try:
        answerer = KBModelAnswerer(model, tokenizer, kb, abstainer=model_abstainer(model, cfg.abstention.threshold),
                                   name_check=cfg.abstention.name_check,
                                   name_link_limit=name_link_limit(cfg),
                                   abstain_answer=cfg.abstain_answer)
        info = {"model": cfg.backbone, "checkpoint": str(checkpoint), "inject_layers": list(cfg.inject_layers),
                "K_top": cfg.K_top, "answer_head": answerer.answer_head,
                "abstain_threshold": None if answerer.abstainer is None else answerer.abstainer.threshold,
                "reference_date": cfg.reference_date}
        wal = Path(wal_path) if wal_path else store_dir.parent / f"{store_dir.name}.wal.jsonl"
        engine = Engine(kb, answerer, embedder, wal, settings, info=info, audit_path=audit_path)
    except BaseException:
        kb.close()
        raise
    engine.info["load_s"] = round(time.perf_counter() - t0, 3)  # includes replaying the WAL
    return engine
