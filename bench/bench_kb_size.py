"""Answer quality against KB size (issue 16): the trained main-job model (not retrained) on the whole
test split with its KB grown by distractor facts from freshly generated worlds.

    python bench/bench_kb_size.py --sizes base 10000 100000 --out_dir runs/kb_size --doc_dir docs/results
    python bench/bench_kb_size.py --sizes 10000 --before mips=ip --before_em   # also the pre-fix HNSW's EM
    python bench/bench_kb_size.py --million --out_dir runs/kb_size            # adds 10^6 (hours on 2 cores)
    python bench/bench_kb_size.py --keys_only --sizes base 10000 100000 --before mips=ip   # retrieval only
    python bench/bench_kb_size.py --table_only --out_dir runs/kb_size --doc_dir docs/results
    python bench/bench_kb_size.py --build_only --sizes 100000 --distractor_seed 2 --out_dir runs/kb_grown

Per size N ("base" = the main job's store alone): the base store's facts first and unchanged (QA
records name facts by position), then N - base distractor facts from new worlds (`--distractor_seed`,
world indices after the base's, every base entity name reserved: `kblampp.synth.distractors`), embedded
with the store's embedding model and encoded with the store's trained K/V encoder; an HNSW index and the
config's own method's (IVF-flat by default), with the parameters of the config's `index` section; rows
`lookup` and `kblampp` (exact search and each ANN index of `--retrievals`) with official EM, 95%
bootstrap intervals, recall@1 and recall@K_top; each index's recall of exact top-K on the real questions'
queries (the first inject layer's query at each prompt's last token). Each size runs in its own process
(peak RSS is per size) and writes `<out_dir>/n<N>/result.json`; a size with a result is skipped unless
--force (or stale: built for another encoder or other distractors). The table (`kb_size.md/.json`) and
plot (`kb_size.png`) go to --doc_dir. `--build_only` stops after the stores: a grown KB of other
distractor worlds for `abstention.grown_stores` (the decision calibrated among a big KB's neighbours).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kblampp.config import KBConfig, add_config_args, config_from_args  # noqa: E402
from kblampp.knowledge_index import config_params, recalls_of  # noqa: E402
from kblampp.progress import status  # noqa: E402

MILLION = 1_000_000


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parse_params(text: str | None) -> dict[str, Any]:
    """`mips=ip,ef_search=64` -> {"mips": "ip", "ef_search": 64} (ints where they parse)."""
    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--before: {item!r} is not KEY=VALUE")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


ANN_METHODS = {"hnsw": "HNSW", "ivfflat": "IVF-flat", "ivfpq": "IVF-PQ"}  # --retrievals beside "exact"


def describe_index(params: dict[str, Any], similarity: str, method: str = "hnsw") -> str:
    shown = {k: v for k, v in params.items() if k not in ("mips_norm",)}
    return f"{ANN_METHODS[method]} {similarity} " + " ".join(f"{k}={v}" for k, v in shown.items())


def wanted_retrievals(args: argparse.Namespace) -> list[str]:
    """--retrievals as a list, checked: exact and the ANN methods (each searched through its own index);
    by default exact, the HNSW and the config's own method."""
    text = args.retrievals or f"exact,hnsw,{args.config_method}"
    runs = list(dict.fromkeys(r.strip() for r in text.split(",") if r.strip()))
    bad = [r for r in runs if r != "exact" and r not in ANN_METHODS]
    if bad:
        raise SystemExit(f"--retrievals: {bad[0]!r} is not one of exact, {', '.join(ANN_METHODS)}")
    return runs


def ann_runs(args: argparse.Namespace) -> list[str]:
    """The ANN indexes a size needs: those asked (by default the HNSW and the config's method), and the
    HNSW whenever --before compares against it."""
    asked = [r for r in wanted_retrievals(args) if r in ANN_METHODS]
    return list(dict.fromkeys((["hnsw"] if args.before else []) + asked))


# ---- one size -------------------------------------------------------------------------------------

def size_facts(base_store: Any, n_facts: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(the base store's facts, the n_facts - base distractor facts of `seed`) as dicts."""
    from kblampp.synth.distractors import distractor_facts

    base_dicts = [json.loads(x) for x in (base_store.root / "facts.jsonl").read_text(encoding="utf-8").splitlines()]
    return base_dicts, distractor_facts(base_dicts, n_facts - base_store.n, seed=seed)


def build_identity(base_store: Any, extra: list[dict], seed: int) -> dict[str, Any]:
    """What a size's keys depend on: the base store's facts and K/V encoder, and the distractors drawn
    (their digest: a change of the world generator changes them even under the same seed)."""
    digest = hashlib.sha256()
    for f in extra:
        digest.update(json.dumps(f, sort_keys=True).encode())
        digest.update(b"\n")
    return {"base_facts_sha256": base_store.manifest["source"]["sha256"],
            "kv_encoder_sha256": base_store.manifest["kv_encoder"]["sha256"],
            "distractor_seed": seed, "distractors_sha256": digest.hexdigest()}


def current_identity(args: argparse.Namespace, n_facts: int) -> dict[str, Any]:
    """`build_identity` of size n_facts as the base store and distractor seed give it now."""
    from kblampp.kb_store import KBValueStore

    base = KBValueStore.load(args.base_store)
    return build_identity(base, size_facts(base, n_facts, args.distractor_seed)[1], args.distractor_seed)


def stale_reason(recorded: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Why a cached build or key file cannot serve `current` (None when it can)."""
    if recorded is None:
        return "no identity recorded (built by an older version)"
    changed = [k for k in current if recorded.get(k) != current[k]]
    return f"{', '.join(changed)} changed" if changed else None


def base_key_drift(store: Any, base: Any, size_dir: Path) -> float:
    """Largest difference between a size store's first keys and the base store's; the same encoder on
    the same raw embeddings must give the base keys, so a drift above 1e-4 stops the benchmark."""
    drift = float(np.abs(np.asarray(store.arrays["K.npy"][:base.n]) - np.asarray(base.arrays["K.npy"])).max())
    if drift > 1e-4:
        raise SystemExit(f"{size_dir / 'store'}: base keys differ from {base.root} by {drift}")
    return drift


def build_size(cfg: KBConfig, args: argparse.Namespace, n_facts: int, size_dir: Path) -> dict[str, Any]:
    """Facts file, store (trained encoder) and HNSW index of one size; returns the build record."""
    from kblampp.embedding import load_embedder
    from kblampp.kb_store import KBValueStore, RAW, build_store_index, embed_facts_in_parts, write_store
    from kblampp.schema import load_facts
    from kblampp.synth.distractors import collisions
    from kblampp.synth.jsonl import write_jsonl

    base = KBValueStore.load(args.base_store)
    t0 = time.perf_counter()
    base_dicts, extra = size_facts(base, n_facts, args.distractor_seed)
    identity = build_identity(base, extra, args.distractor_seed)
    clash = collisions(base_dicts, extra)
    if clash.names or clash.ids:
        raise SystemExit(f"distractors share {clash.names} names / {clash.ids} ids with the base KB: {clash.examples}")
    facts_path = size_dir / "facts.jsonl"
    write_jsonl(facts_path, base_dicts + extra)
    facts = load_facts(facts_path)  # validated like any KB file
    generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    embedder = load_embedder(base.manifest["embedding_model"])
    parts = size_dir / f"embed_parts_{identity['distractors_sha256'][:16]}"  # a stopped build resumes there
    new_raw = embed_facts_in_parts(embedder, facts[base.n:], parts, batch_size=128) if extra else {}
    embed_s = time.perf_counter() - t0
    raw = {}
    for k in RAW:  # each distractor array is freed as soon as it is joined (peak memory: one copy, not two)
        raw[k] = np.concatenate([np.asarray(base.raw(k)), new_raw.pop(k)]) if extra else np.asarray(base.raw(k))
    t0 = time.perf_counter()
    write_store(size_dir / "store", facts, raw, base.encoder.eval(), base.manifest["embedding_model"], facts_path)
    kv_write_s = time.perf_counter() - t0
    del raw
    store = KBValueStore.load(size_dir / "store")
    key_drift = base_key_drift(store, base, size_dir)
    report = build_store_index(size_dir / "store", "hnsw", cfg.index.similarity, **config_params(cfg.index, "hnsw"))
    return {"n_facts": store.n, "n_distractors": len(extra), "distractor_seed": args.distractor_seed, "identity": identity,
            "collisions": dataclasses.asdict(clash) | {"rate": clash.rate},
            "build": {"generate_s": generate_s, "embed_s": embed_s, "kv_write_s": kv_write_s,
                      "hnsw_build_s": report["build_s"], "strings_embedded": None if not extra else
                      len({s for f in facts[base.n:] for s in (f.head_name, f.relation_name, f.tail_name, f.sentence)})},
            "index": {"method": "hnsw", "similarity": cfg.index.similarity, "params": report["params"]},
            "base_key_max_diff": key_drift, "peak_rss_build_bytes": peak_rss_bytes()}


def only_encoder_changed(recorded: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """True when a size's facts are the same and only the K/V encoder differs (a retrained checkpoint):
    its store keeps the raw embeddings, so re-encoding replaces a rebuild (hours at 10^6 facts)."""
    if recorded is None:
        return False
    changed = {k for k in current if recorded.get(k) != current[k]}
    return changed == {"kv_encoder_sha256"}


def reencode_size(cfg: KBConfig, args: argparse.Namespace, size_dir: Path, record: dict[str, Any],
                  identity: dict[str, Any]) -> dict[str, Any]:
    """Keys and values of a size's store recomputed by the base store's (new) encoder from the stored raw
    embeddings; the store's indexes go with the old keys (refresh_index builds them again)."""
    from kblampp.kb_store import KBValueStore, encode_file

    base = KBValueStore.load(args.base_store)
    old = KBValueStore.load(size_dir / "store")
    t0 = time.perf_counter()
    report = encode_file(size_dir / "facts.jsonl", size_dir / "store", base.manifest["embedding_model"], base.d_k,
                         base.d_v, int(base.manifest.get("d_tau", cfg.d_tau)), base.d_ctx,
                         base.root / "kv_encoder.safetensors", old.manifest["dtype"])
    if not report["reused_raw"]:
        raise SystemExit(f"{size_dir / 'store'}: the raw embeddings were not reused (the store changed under it)")
    store = KBValueStore.load(size_dir / "store")
    key_drift = base_key_drift(store, base, size_dir)
    out = {k: v for k, v in record.items() if k not in ("ann_indexes", "rows")}
    out["identity"], out["base_key_max_diff"] = identity, key_drift
    out["build"] = {**record.get("build", {}), "reencode_s": time.perf_counter() - t0}
    out.pop("index", None)  # every index is built again by refresh_index
    return out


KEYLESS_ROWS = ("lookup",)  # rows that never read the K/V encoder's keys or values
KEPT_ROWS = "kept_rows.json"  # a re-encoded size's keyless rows, until its next result.json


def keep_keyless_rows(size_dir: Path, same_facts: bool) -> None:
    """A size whose store changes loses its result.json. With the same facts (a re-encode) the rows
    that never read keys stay valid: they wait in kept_rows.json for the size's next result."""
    result_path = size_dir / "result.json"
    if not result_path.is_file():
        return
    if same_facts:
        from kblampp.store_io import write_json_atomic

        rows = json.loads(result_path.read_text(encoding="utf-8")).get("rows", {})
        write_json_atomic(size_dir / KEPT_ROWS, {k: v for k, v in rows.items() if k in KEYLESS_ROWS})
    result_path.unlink()


def question_queries(ec: Any, records: list, out_dir: Path, checkpoint: Path) -> np.ndarray:
    """The last-token queries of the test questions (independent of the KB: computed once, cached)."""
    from kblampp.backbone import answer_instruction
    from kblampp.evaluation.baselines import backbone_prompts
    from kblampp.evaluation.kb_size import last_token_queries
    from kblampp.store_io import sha256_file

    import torch

    meta = {"checkpoint_sha256": sha256_file(checkpoint), "qids": [r.qid for r in records]}
    path, meta_path = out_dir / "queries.npy", out_dir / "queries.json"
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text(encoding="utf-8")) == meta:
        return np.load(path, allow_pickle=False)
    e_q = torch.from_numpy(np.asarray(ec.embed([r.question for r in records]), dtype=np.float32))
    prompts = backbone_prompts(ec.tokenizer, records, answer_instruction(ec.cfg.abstain_answer))
    q = last_token_queries(ec.model, ec.tokenizer, prompts, e_q, ec.source, batch_size=64)
    from kblampp.store_io import save_npy, write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)  # a fresh --out_dir: the queries are its first file
    tmp = out_dir / ".queries.npy.tmp"
    save_npy(tmp, q)
    tmp.replace(path)
    write_json_atomic(meta_path, meta)
    return q


def base_store_queries(cfg: KBConfig, args: argparse.Namespace, records: list) -> np.ndarray:
    """`question_queries` of the checkpoint, loaded on the base store when they are not cached yet
    (the queries do not depend on the KB, and the cache is keyed by the checkpoint's hash)."""
    import torch

    from kblampp.evaluation.runner import load_eval_context
    from kblampp.inference.loading import resolve_checkpoint

    torch.set_grad_enabled(False)
    checkpoint = resolve_checkpoint(args.checkpoint or cfg.output_dir)
    ec = load_eval_context(dataclasses.replace(cfg, store_dir=str(args.base_store), retrieval="exact"), checkpoint)
    return question_queries(ec, records, Path(args.out_dir), checkpoint)


def eval_size(cfg: KBConfig, args: argparse.Namespace, size_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Rows lookup + kblampp (exact, HNSW[, HNSW before]) on the whole test split, index recall."""
    import torch

    from kblampp.evaluation.kb_size import row_metrics
    from kblampp.evaluation.report import seen_answers, summarize_row, write_report
    from kblampp.evaluation.runner import load_eval_context, run_rows
    from kblampp.inference.loading import resolve_checkpoint
    from kblampp.knowledge_index import KnowledgeIndex, apply_search_params
    from kblampp.retrieval import IndexedKB
    from kblampp.schema import load_qa

    torch.set_grad_enabled(False)
    checkpoint = resolve_checkpoint(args.checkpoint or cfg.output_dir)
    ec = load_eval_context(dataclasses.replace(cfg, store_dir=str(size_dir / "store"), retrieval="exact"), checkpoint)
    records = list(load_qa(args.qa or cfg.test_dataset, num_facts=len(ec.facts)))
    train = Path(cfg.train_dataset) if cfg.train_dataset else None
    seen = seen_answers(load_qa(train)) if train is not None and train.is_file() else set()
    queries = question_queries(ec, records, Path(args.out_dir), checkpoint)
    keys = ec.store.keys_tensor().numpy()
    ks = (1, cfg.K_top)
    variants = {}
    for method in ann_runs(args):
        ix = KnowledgeIndex.load(ec.store.index_dir(method), expect_n=ec.store.n, expect_store_id=ec.store.store_id)
        apply_search_params(ix, cfg.index)  # --set index.ef_search=N / index.nprobe=N: another search, no rebuild
        variants[method] = (ix, describe_index(ix.params, ix.similarity, method))
    before = parse_params(args.before)
    if before:
        hnsw = variants["hnsw"][0]  # ann_runs adds it whenever --before is given
        t0 = time.perf_counter()
        params = {**{k: v for k, v in hnsw.params.items() if k != "mips_norm"}, **before}  # an HNSW's own keys
        old = KnowledgeIndex.build(keys, "hnsw", cfg.index.similarity, **params)
        record["build"]["hnsw_before_build_s"] = time.perf_counter() - t0
        variants["hnsw_before"] = (old, describe_index(old.params, old.similarity) + " (before)")
    founds = {name: ix.search(queries, max(ks))[1] for name, (ix, _) in variants.items()}
    record["index_recall"] = {name: rec | {"index": variants[name][1]}  # one pass of exact scores for all
                              for name, rec in recalls_of(founds, keys, queries, ks, cfg.index.similarity).items()}
    status(f"index recall on the questions' queries: {json.dumps(record['index_recall'])}")
    kw = dict(batch_size=args.batch_size, batch_tokens=args.batch_tokens or None)
    rows: dict[str, dict[str, Any]] = dict(record.get("rows", {}))  # rows of earlier runs of this size stay
    wanted_runs = wanted_retrievals(args) + (["hnsw_before"] if args.before_em else [])
    runs = [("exact", ec.source, ["lookup", "kblampp"])] if "exact" in wanted_runs else []
    runs += [(name, IndexedKB(ix, ec.store), ["kblampp"]) for name, (ix, _) in variants.items() if name in wanted_runs]
    for name, source, wanted in runs:
        ec.source = source
        t0 = time.perf_counter()
        results, _, seconds = run_rows(ec, records, wanted, seen, **kw)
        write_report(size_dir / f"eval_{name}", results, meta={"n_facts": ec.store.n, "retrieval": name},
                     extra={"row_seconds": seconds})
        for row, res in results.items():
            key = row if row == "lookup" else f"{row}_{name}"
            label = variants[name][1] if name in variants else "exact"
            rows[key] = row_metrics(summarize_row(res)) | {
                "label": row, "retrieval": "–" if row == "lookup" else label,
                "index": name if name in variants and row != "lookup" else "", "seconds": seconds[row]}
        status(f"n={ec.store.n}: {name} done in {time.perf_counter() - t0:.0f} s")
    record.update(rows=rows, K_top=cfg.K_top, store_bytes=folder_bytes(size_dir / "store"),
                  index_bytes=folder_bytes(ec.store.index_dir("hnsw")), peak_rss_bytes=peak_rss_bytes(),
                  questions=len(records), checkpoint=str(checkpoint))
    return record


def refresh_index(cfg: KBConfig, size_dir: Path, record: dict[str, Any], build_path: Path,
                  method: str = "hnsw") -> dict[str, Any]:
    """Build the size's `method` index when it is missing or the config's build parameters changed since
    it was built (the HNSW's record is `index`, the others' `ann_indexes[method]`)."""
    from kblampp.kb_store import build_store_index
    from kblampp.knowledge_index import SEARCH_PARAMS
    from kblampp.store_io import write_json_atomic

    not_built = ("mips_norm", "ivf_nlist_used") + SEARCH_PARAMS  # derived from the keys / applied at search time
    had = record.get("index") if method == "hnsw" else record.get("ann_indexes", {}).get(method)
    wanted = {k: v for k, v in config_params(cfg.index, method).items() if k not in not_built}
    if had is not None and (size_dir / "store" / f"index_{method}").is_dir():
        built = {k: v for k, v in had["params"].items() if k not in not_built}
        if built == wanted and had["similarity"] == cfg.index.similarity:
            return record
        status(f"{size_dir}: {method} parameters changed ({built} -> {wanted}): rebuilding the index")
    report = build_store_index(size_dir / "store", method, cfg.index.similarity, **config_params(cfg.index, method))
    entry = {"method": method, "similarity": cfg.index.similarity, "params": report["params"]}
    if method == "hnsw":
        record["build"]["hnsw_build_s"] = report["build_s"]
        record["index"] = entry
    else:
        record.setdefault("ann_indexes", {})[method] = entry | {"build_s": report["build_s"]}
    write_json_atomic(build_path, record)
    return record


def keys_only_size(cfg: KBConfig, args: argparse.Namespace, n_facts: int, records: list,
                   queries: np.ndarray) -> dict[str, Any]:
    """Retrieval at the last prompt token without generating: the keys of an N-fact KB (distractor keys
    from their head and relation embeddings only, which is all a key depends on), exact search against
    the HNSW of the config and the --before HNSW, on the real questions' queries (`records`, their
    `queries`: the same at every size). Cheap enough for 10^6."""
    import torch

    from kblampp.embedding import embed_unique, load_embedder
    from kblampp.evaluation.kb_size import exact_top, gold_recall
    from kblampp.evaluation.retrieval_metrics import answer_fact_of
    from kblampp.kb_store import KBValueStore
    from kblampp.knowledge_index import KnowledgeIndex
    from kblampp.store_io import save_npy, write_json_atomic
    from kblampp.synth.distractors import collisions

    out = Path(args.out_dir) / f"n{n_facts}"
    out.mkdir(parents=True, exist_ok=True)
    base = KBValueStore.load(args.base_store)
    base_dicts, extra = size_facts(base, n_facts, args.distractor_seed)
    identity = build_identity(base, extra, args.distractor_seed)
    record: dict[str, Any] = {"n_facts": n_facts, "n_distractors": n_facts - base.n, "identity": identity}
    key_path, key_meta = out / "keys_only_K.npy", out / "keys_only_K.json"
    build_path = out / "build.json"
    if build_path.is_file() and stale_reason(json.loads(build_path.read_text(encoding="utf-8")).get("identity"),
                                             identity) is None:  # the full store of this size holds the same keys
        keys = KBValueStore.load(out / "store").keys_tensor().numpy()
    elif key_path.is_file() and key_meta.is_file() and stale_reason(
            json.loads(key_meta.read_text(encoding="utf-8")), identity) is None:
        keys = np.load(key_path, allow_pickle=False)
    else:
        clash = collisions(base_dicts, extra)
        record["collisions"] = dataclasses.asdict(clash) | {"rate": clash.rate}
        t0 = time.perf_counter()
        names = [f["head"]["name"].strip() for f in extra] + [f["relation"]["name"].strip() for f in extra]
        table, idx = embed_unique(load_embedder(base.manifest["embedding_model"]), names, 128)
        n = len(extra)
        with torch.no_grad():
            new = base.encoder.eval().encode_keys(torch.from_numpy(table[idx[:n]]), torch.from_numpy(table[idx[n:]]))
        keys = np.concatenate([np.asarray(base.arrays["K.npy"], np.float32), new.numpy()])
        record["embed_s"] = time.perf_counter() - t0
        tmp = out / ".keys_only_K.npy.tmp"
        save_npy(tmp, keys)
        tmp.replace(key_path)
        write_json_atomic(key_meta, identity)
    supports = [list(r.supporting_facts) if r.answerable else [] for r in records]
    answers = [answer_fact_of(r) if s else None for r, s in zip(records, supports)]
    k, sim = cfg.K_top, cfg.index.similarity
    exact = exact_top(keys, queries, k, sim)
    record["retrieval"] = {"exact": gold_recall(exact, supports, answers, k) | {"index": "exact"}}
    indexes = {m: (m, config_params(cfg.index, m)) for m in ann_runs(args)}
    if args.before:
        indexes["hnsw_before"] = ("hnsw", {**config_params(cfg.index, "hnsw"), **parse_params(args.before)})
    founds, about = {}, {}
    for name, (method, params) in indexes.items():
        t0 = time.perf_counter()
        index = KnowledgeIndex.build(keys, method, sim, **params)
        build_s = time.perf_counter() - t0
        _, founds[name] = index.search(queries, k)
        label = describe_index(index.params, sim, method) + (" (before)" if name == "hnsw_before" else "")
        about[name] = {"index": label, "build_s": build_s}
        record["retrieval"][name] = gold_recall(founds[name], supports, answers, k) | {"index": label}
        del index  # one index in memory at a time
    record["index_recall"] = {name: rec | about[name] for name, rec in recalls_of(founds, keys, queries, (1, k), sim).items()}
    record["K_top"] = k
    status(f"n={n_facts} keys only: {json.dumps(record['retrieval'])} {json.dumps(record['index_recall'])}")
    return record


def run_worker(cfg: KBConfig, args: argparse.Namespace) -> int:
    from kblampp.store_io import write_json_atomic

    n = int(args.worker)
    size_dir = Path(args.out_dir) / f"n{n}"
    size_dir.mkdir(parents=True, exist_ok=True)
    build_path = size_dir / "build.json"
    old = json.loads(build_path.read_text(encoding="utf-8")) if build_path.is_file() else None
    reason = "--force" if args.force else None if old is not None else "not built yet"
    current = current_identity(args, n) if old is not None else None
    reencode = False
    if reason is None:
        reason = stale_reason(old.get("identity"), current)
        reencode = bool(reason) and (size_dir / "store").is_dir() and only_encoder_changed(old.get("identity"), current)
        if reason:
            keep_keyless_rows(size_dir, reencode)  # the other rows were measured on the old keys
    if reason and reencode:
        status(f"n={n}: re-encoding ({reason}; the raw embeddings are reused)")
        write_json_atomic(build_path, reencode_size(cfg, args, size_dir, old, current))
    elif reason:
        status(f"n={n}: building ({reason})")
        write_json_atomic(build_path, build_size(cfg, args, n, size_dir))
    if args.build_only:
        status(f"n={n}: built {size_dir / 'store'}")
        return 0
    record = json.loads(build_path.read_text(encoding="utf-8"))
    for method in ann_runs(args):
        record = refresh_index(cfg, size_dir, record, build_path, method)
    if (size_dir / "result.json").is_file():  # keep the rows of earlier retrievals
        record["rows"] = json.loads((size_dir / "result.json").read_text(encoding="utf-8")).get("rows", {})
    elif (size_dir / KEPT_ROWS).is_file():  # re-encoded: the rows that never read keys
        record["rows"] = json.loads((size_dir / KEPT_ROWS).read_text(encoding="utf-8"))
    record = eval_size(cfg, args, size_dir, record)
    write_json_atomic(size_dir / "result.json", record)
    (size_dir / KEPT_ROWS).unlink(missing_ok=True)
    status(f"n={n}: wrote {size_dir / 'result.json'}")
    return 0


# ---- driver ---------------------------------------------------------------------------------------

def requested_sizes(args: argparse.Namespace, base_n: int) -> list[int]:
    from kblampp.evaluation.kb_size import size_plan

    sizes = [base_n if s == "base" else int(s) for s in args.sizes] + ([MILLION] if args.million else [])
    return size_plan(base_n, sizes)


def write_outputs(out_dir: Path, doc_dir: Path) -> None:
    from kblampp.evaluation.kb_size import plot_size, write_size_table

    found = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out_dir.glob("n*/result.json"))]
    keys_only = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out_dir.glob("n*/keys_only.json"))]
    if not found and not keys_only:
        raise SystemExit(f"{out_dir}: no n*/result.json or n*/keys_only.json yet")
    paths = write_size_table(found, doc_dir, keys_only=keys_only)
    plot = plot_size(found, doc_dir / "kb_size.png", keys_only=keys_only)
    print(paths["md"].read_text(encoding="utf-8"))
    print(f"wrote {paths['md']}, {paths['json']}, {plot}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    p.set_defaults(config=str(ROOT / "configs/embedded_default.yaml"))
    p.add_argument("--checkpoint", help="trained run folder or checkpoint (default: the config's output_dir)")
    p.add_argument("--base_store", help="the trained store the sizes grow from (default: the config's store_dir)")
    p.add_argument("--qa", help="questions (default: the config's test_dataset; every question is asked)")
    p.add_argument("--sizes", nargs="+", default=["base", "10000", "100000"],
                   help="KB sizes in facts; 'base' = the base store alone (default: base 10000 100000)")
    p.add_argument("--million", action="store_true", help="also 10^6 facts (~2 h of embedding on 2 cores)")
    p.add_argument("--distractor_seed", type=int, default=1, help="seed of the distractor worlds (main job: 0)")
    p.add_argument("--before", help="a second HNSW measured beside the config's, as KEY=VALUE overrides "
                                    "(e.g. mips=ip,ef_search=128: the index before issue 16's fix)")
    p.add_argument("--before_em", action="store_true", help="also run kblampp through the --before index")
    p.add_argument("--retrievals",
                   help="kblampp runs: exact (with the lookup row), hnsw, ivfflat, ivfpq (each ANN index is built "
                        "into the size's store with the config's parameters; default: exact, hnsw and the config's "
                        "index.method); rows of earlier runs of a size are kept")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--batch_tokens", type=int, default=5120)
    p.add_argument("--out_dir", default="runs/kb_size", help="stores, reports and per-size results")
    p.add_argument("--doc_dir", help="where kb_size.md/.json/.png go (default: --out_dir)")
    p.add_argument("--force", action="store_true", help="rebuild and rerun sizes that have results")
    p.add_argument("--rerun", action="store_true", help="run the --retrievals again on sizes that have results "
                                                       "(the store is kept; the index is rebuilt if its parameters changed)")
    p.add_argument("--keys_only", action="store_true",
                   help="retrieval only (no generation): exact vs HNSW top-K on the real queries, per size")
    p.add_argument("--table_only", action="store_true", help="only write the table and plot from results")
    p.add_argument("--build_only", action="store_true", help="only build each size's store and index (a grown KB "
                                                             "for abstention.grown_stores: give another --distractor_seed)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    args.base_store = args.base_store or cfg.store_dir
    args.config_method = cfg.index.method if cfg.index.method in ANN_METHODS else "hnsw"
    if args.worker:
        return run_worker(cfg, args)
    if args.keys_only:
        from kblampp.kb_store import KBValueStore
        from kblampp.schema import load_qa
        from kblampp.store_io import write_json_atomic

        base_n = KBValueStore.load(args.base_store).n
        records = list(load_qa(args.qa or cfg.test_dataset, num_facts=base_n))
        queries = base_store_queries(cfg, args, records)  # the model runs once, not once per size
        for n in requested_sizes(args, base_n):
            write_json_atomic(Path(args.out_dir) / f"n{n}" / "keys_only.json",
                              keys_only_size(cfg, args, n, records, queries))
        write_outputs(Path(args.out_dir), Path(args.doc_dir or args.out_dir))
        return 0
    out_dir, doc_dir = Path(args.out_dir), Path(args.doc_dir or args.out_dir)
    if not args.table_only:
        from kblampp.kb_store import KBValueStore

        for n in requested_sizes(args, KBValueStore.load(args.base_store).n):
            result = out_dir / f"n{n}" / ("build.json" if args.build_only else "result.json")
            if result.is_file() and not (args.force or args.rerun):
                stale = stale_reason(json.loads(result.read_text(encoding="utf-8")).get("identity"),
                                     current_identity(args, n))
                if stale is None:
                    status(f"n={n}: {result.name} exists (--force to redo)")
                    continue
                status(f"n={n}: result is stale ({stale}): rebuilding")
            status(f"== n={n}")
            argv_now = list(sys.argv[1:] if argv is None else argv)
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv_now, "--worker", str(n)])
            if done.returncode:
                raise SystemExit(f"size {n}: worker failed (exit {done.returncode})")
    if args.build_only:
        return 0
    write_outputs(out_dir, doc_dir)
    return 0


if __name__ == "__main__":
    from kblampp.cli import run_main
    sys.exit(run_main(main))
