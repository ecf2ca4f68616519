"""Serve a trained KBLaM++ model over HTTP (SPEC section 8): answers with evidence, live KB edits.

    export KBLAMPP_SERVER_TOKEN=$(python -c "import secrets; print(secrets.token_hex(16))")
    python infer/infer_server.py --config configs/embedded_default.yaml --checkpoint runs/main/kb_final.safetensors
"""
from __future__ import annotations

import argparse
import sys

from kblampp.cli import report_error
from kblampp.config import ConfigError, add_config_args, config_from_args
from kblampp.serving.auth import load_token
from kblampp.serving.config import LOCAL_HOSTS, TOKEN_ENV, ServerSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--checkpoint", required=True, help="KB checkpoint (safetensors) from train_stageA/B")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token_file", help=f"file holding the bearer token for KB changes (else ${TOKEN_ENV})")
    parser.add_argument("--read_only", action="store_true",
                        help="disable fact changes (no token needed); never takes the store's writer lock nor "
                             "reads the write-ahead log: serves the store as last compacted")
    parser.add_argument("--wal", help="write-ahead log path (default: <store_dir>.wal.jsonl beside the store)")
    parser.add_argument("--audit_log", help="append-only audit trail, one line per change "
                                            "(default: <store_dir>.audit.jsonl beside the store)")
    parser.add_argument("--allowed_hosts", default=",".join(LOCAL_HOSTS),
                        help="comma-separated Host header names accepted (default: %(default)s, plus --host; "
                             "'*' accepts any)")
    parser.add_argument("--max_new_tokens_cap", type=int, default=64)
    parser.add_argument("--max_question_chars", type=int, default=2000)
    parser.add_argument("--max_body_bytes", type=int, default=1_000_000)
    parser.add_argument("--request_timeout_s", type=float, default=60.0,
                        help="longest wait for the model lock (or for a batch to take a question)")
    parser.add_argument("--batch_max_size", type=int, default=16,
                        help="most questions answered by one batched generate() (1: one at a time)")
    parser.add_argument("--batch_max_wait_ms", type=float, default=10.0,
                        help="longest a question waits for others to join its batch (a lone request's delay)")
    parser.add_argument("--compact_every", type=int, default=0,
                        help="fold the WAL into the store every N changes (0: at start and clean shutdown)")
    parser.add_argument("--rebuild_fraction", type=float, default=0.1,
                        help="compaction rebuilds the ANN index once facts edited since its build (searched "
                             "exactly) plus deleted entries exceed this share of the live facts")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        token = None if args.read_only else load_token(args.token_file)
        settings = ServerSettings(
            host=args.host, port=args.port, read_only=args.read_only, token=token,
            max_new_tokens_cap=args.max_new_tokens_cap, max_question_chars=args.max_question_chars,
            default_max_new_tokens=min(cfg.max_new_tokens, args.max_new_tokens_cap),
            max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout_s,
            batch_max_size=args.batch_max_size, batch_max_wait_ms=args.batch_max_wait_ms,
            compact_every=args.compact_every, model_name=cfg.backbone, rebuild_fraction=args.rebuild_fraction,
            allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()))
        settings.validate()
    except (ConfigError, ValueError) as err:
        return report_error(err)
    from kblampp.serving.server import serve

    return serve(cfg, args.checkpoint, settings, wal_path=args.wal, audit_path=args.audit_log)


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
