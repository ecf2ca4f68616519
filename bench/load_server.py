"""Bounded load test of a running infer_server (loopback only): concurrent clients mixing questions
and fact edits for a fixed time; prints p50/p99 latency, throughput, status codes and lost edits.

    KBLAMPP_SERVER_TOKEN=... python bench/load_server.py --url http://127.0.0.1:8000 --clients 16 --duration 30
Exit status 1 if any 5xx, transport error or lost edit was seen.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from kblampp.serving.auth import load_token
from kblampp.serving.config import TOKEN_ENV
from kblampp.serving.loadgen import run_load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    parser.add_argument("--token_file", help=f"bearer token file (else ${TOKEN_ENV})")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (then in-flight requests finish)")
    parser.add_argument("--edit_fraction", type=float, default=0.2, help="share of requests that edit facts")
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the summary to this JSON file")
    args = parser.parse_args(argv)
    token = load_token(args.token_file)
    if not token:
        parser.error(f"no token: export {TOKEN_ENV}=... or pass --token_file")
    if not 0 <= args.edit_fraction <= 1 or args.clients < 1 or not 0 < args.duration <= 3600:
        parser.error("need 0 <= edit_fraction <= 1, clients >= 1, 0 < duration <= 3600")
    report = asyncio.run(run_load(args.url, token, args.clients, args.duration, args.edit_fraction,
                                  args.max_new_tokens, args.seed, args.timeout))
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
    return 1 if summary["5xx"] or summary["transport_errors"] or summary["lost_edits"] else 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
