"""Embed the 5-tuples and write the K/V store (SPEC section 5), atomically.

    python offline/encode_kv.py --config configs/embedded_default.yaml
    python offline/encode_kv.py --config CFG --tuples data/5tuple/synth_world.jsonl --store_dir store/x --fp16
    python offline/encode_kv.py --kv_encoder runs/main --tuples data/5tuple/new.jsonl --store_dir store/new
--kv_encoder takes the trained K/V MLPs as a training run folder, its kb_final.safetensors (Stage A
saves kv_encoder.safetensors beside it), a step checkpoint's kb.safetensors, or a kv_encoder.safetensors
(a store's own). Without --config, the encoder's training settings (embedding model, d_k, d_v, d_tau)
are used; with one they must agree.
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
from kblampp.kv_encoder import adopt_training_settings, encoder_source  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    p.add_argument("--tuples", help="5-tuple JSONL (default: the config's tuples_path)")
    p.add_argument("--store_dir", help="output store folder (default: the config's store_dir)")
    p.add_argument("--kv_encoder", help="trained K/V MLPs: a training run folder, its kb_final.safetensors, "
                                        "or a kv_encoder.safetensors")
    p.add_argument("--fp16", action="store_true", help="store K, V and ctx_vec as float16")
    p.add_argument("--batch_size", type=int, default=64, help="embedding batch size")
    p.add_argument("--kv_hidden", type=int, default=512, help="hidden width of the K/V MLPs (fresh encoder)")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.kv_encoder:
        trained = encoder_source(args.kv_encoder)[1]  # the training config, when the encoder comes with one
        cfg = adopt_training_settings(cfg, trained, args.kv_encoder, explicit_config=args.config is not None)
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
    from kblampp.cli import run_main
    sys.exit(run_main(main))
