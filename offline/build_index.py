"""Build the faiss index over a store's keys into `STORE/index_<method>/` and check ntotal == N.

    python offline/build_index.py --store_dir store/synth_world --method hnsw --similarity cosine
    python offline/build_index.py --store_dir store/synth_world --method ivfflat --nprobe 128   # large KBs
    python offline/build_index.py --store_dir store/synth_world --method ivfpq --pq_m 16 --nprobe 16
    python offline/build_index.py --store_dir store/synth_world --method milvus   # Milvus Lite: store/index_milvus/milvus.db
    python offline/build_index.py --store_dir store/synth_world --method milvus --uri http://host:19530 --collection kb
    python offline/build_index.py --config configs/embedded_default.yaml   # store_dir and index.* from the config
Parameters not given on the command line come from the config's `index` section (or its defaults);
the index folder records them with the store id it was built for.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kblampp.config import add_config_args, config_from_args  # noqa: E402
from kblampp.kb_store import build_store_index  # noqa: E402
from kblampp.knowledge_index import DEFAULTS, config_params  # noqa: E402

INT_PARAMS = ("hnsw_m", "ef_construction", "ef_search", "ivf_nlist", "pq_m", "pq_bits", "nprobe")
STR_PARAMS = ("uri", "collection", "milvus_index_type", "mips")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    p.add_argument("--store_dir", help="store folder (default: the config's store_dir)")
    p.add_argument("--method", choices=tuple(DEFAULTS))
    p.add_argument("--similarity", choices=("cosine", "ip"))
    for name in INT_PARAMS:
        p.add_argument(f"--{name}", type=int, help="default from the config's index section")
    for name in STR_PARAMS:
        p.add_argument(f"--{name}", help="uri, collection, milvus_index_type (HNSW | IVF_FLAT): milvus only; mips (l2 | ip): hnsw, ivfflat and milvus with ip only; "
                                         "default from the config's index section")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    method = args.method or cfg.index.method
    params = {k: v if getattr(args, k) is None else getattr(args, k)
              for k, v in config_params(cfg.index, method).items()}
    report = build_store_index(args.store_dir or cfg.store_dir, method, args.similarity or cfg.index.similarity,
                               **params)
    report["build_s"] = round(report["build_s"], 3)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
