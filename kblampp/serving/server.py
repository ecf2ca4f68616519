"""Run the app under uvicorn; compact the WAL into the store on a clean shutdown."""
from __future__ import annotations

import logging
from pathlib import Path

from kblampp.config import KBConfig
from kblampp.serving.config import ServerSettings

log = logging.getLogger("kblampp.serving")


def serve(cfg: KBConfig, checkpoint: str | Path, settings: ServerSettings, wal_path: str | Path | None = None) -> int:
    """Load once, serve until SIGINT/SIGTERM; returns the exit code."""
    import uvicorn

    from kblampp.serving.app import create_app
    from kblampp.serving.build import build_engine

    settings.validate()
    engine = build_engine(cfg, checkpoint, settings, wal_path)
    app = create_app(engine, settings)
    print(f"kblampp server: N={engine.kb.num_live()} index={engine.kb.stats()['index_type']} "
          f"recovered={engine.recovered} on http://{settings.host}:{settings.port}", flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                    timeout_keep_alive=30, limit_concurrency=256)
    finally:
        engine.close()  # fold the WAL into the store (a crash skips this; the next start replays)
    return 0
