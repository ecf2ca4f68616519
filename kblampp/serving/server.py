"""Run the app under uvicorn; compact the WAL into the store on a clean shutdown."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from kblampp.config import KBConfig
from kblampp.serving.config import ServerSettings

log = logging.getLogger("kblampp.serving")


def serve(cfg: KBConfig, checkpoint: str | Path, settings: ServerSettings, wal_path: str | Path | None = None,
          audit_path: str | Path | None = None) -> int:
    """Load once, serve until SIGINT/SIGTERM; returns the exit code (3: the store is in use)."""
    import uvicorn

    from kblampp.serving.app import create_app
    from kblampp.serving.build import build_engine
    from kblampp.store_io import StoreLockedError

    settings.validate()
    try:
        engine = build_engine(cfg, checkpoint, settings, wal_path, audit_path)
    except StoreLockedError as err:
        print(f"infer_server: {err}", file=sys.stderr, flush=True)
        return 3
    app = create_app(engine, settings)
    print(f"kblampp server: N={engine.kb.num_live()} index={engine.kb.stats()['index_type']} "
          f"recovered={engine.recovered} load_s={engine.info['load_s']} read_only={settings.read_only} "
          f"on http://{settings.host}:{settings.port}", flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                    timeout_keep_alive=30, limit_concurrency=256)
    finally:
        engine.close()  # fold the WAL into the store (a crash skips this; the next start replays)
    return 0
