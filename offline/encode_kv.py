"""Embed the 5-tuples and write the K/V store (SPEC section 5), atomically.

    python offline/encode_kv.py --config configs/synth_world_stageA_llama1b.yaml
    python offline/encode_kv.py --config CFG --tuples data/5tuple/synth_world.jsonl --store_dir store --fp16
    python offline/encode_kv.py --config CFG --kv_encoder runs/x/kb_weights.safetensors   # trained MLPs
Head, relation, tail and evidence texts are embedded once per distinct string; the raw embeddings
and the K/V encoder weights are saved beside K/V so edits and re-encodes are identical.
Then run offline/build_index.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.config import add_config_args, config_from_args  # noqa: E402
from kblampp.kb_store import encode_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    p.add_argument("--tuples", help="5-tuple JSONL (default: the config's tuples_path)")
    p.add_argument("--store_dir", help="output store folder (default: the config's store_dir)")
    p.add_argument("--kv_encoder", help="safetensors with trained K/V MLPs (kb_key_mlp/kb_value_mlp/kb_time_mlp)")
    p.add_argument("--fp16", action="store_true", help="store K, V and ctx_vec as float16")
    p.add_argument("--batch_size", type=int, default=64, help="embedding batch size")
    p.add_argument("--kv_hidden", type=int, default=512, help="hidden width of the K/V MLPs (fresh encoder)")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    report = encode_file(args.tuples or cfg.tuples_path, args.store_dir or cfg.store_dir, cfg.embedding_model,
                         cfg.d_k, cfg.d_v, cfg.d_tau, cfg.d_ctx, args.kv_encoder,
                         "float16" if args.fp16 else "float32", args.batch_size, args.kv_hidden, cfg.seed,
                         progress=not args.no_progress)
    m = report["manifest"]
    print(json.dumps({"store_dir": args.store_dir or cfg.store_dir, "n": m["n"], "d_k": m["d_k"], "d_v": m["d_v"],
                      "d_ctx": m["d_ctx"], "dtype": m["dtype"], "embedding_model": m["embedding_model"],
                      "store_id": f"{m['store_uid']}@{m['keys_version']}", "reused_raw": report["reused_raw"],
                      "embed_s": round(report["embed_s"], 2), "kv_and_write_s": round(report["kv_and_write_s"], 2),
                      "facts_per_s": round(m["n"] / report["total_s"], 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
