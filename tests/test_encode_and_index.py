"""End to end: generated world -> offline/encode_kv.py -> offline/build_index.py -> open_kb.

The scripts' `main(argv)` run in-process with a tiny random BERT as the embedding model."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from kblampp.kb_store import KBValueStore, compute_kv, open_kb
from kblampp.kv_encoder import KVEncoder, save_kv_encoder
from kblampp.schema import SchemaError
from kblampp.synth.pipeline import make_world_file
from kblampp.synth.world import WorldSizes
from test_embedding import make_tiny_embedder_dir

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "offline" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    emb = make_tiny_embedder_dir(tmp / "emb")
    world = tmp / "world.jsonl"
    make_world_file(world, seed=1, num_worlds=1, sizes=WorldSizes(persons=40, organisations=6))
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"embedding_model: {json.dumps(str(emb))}\nd_k: 24\nd_v: 16\nd_tau: 8\n"
                   f"tuples_path: {json.dumps(str(world))}\nstore_dir: {json.dumps(str(tmp / 'store'))}\n")
    assert _script("encode_kv")(["--config", str(cfg), "--no_progress", "--kv_hidden", "32"]) == 0
    return tmp, cfg, world


def test_encode_then_build_index_gives_loadable_store(setup, capsys):
    tmp, cfg, world = setup
    store = tmp / "store"
    n = sum(1 for _ in open(world, "rb"))
    build = _script("build_index")
    assert build(["--store_dir", str(store), "--method", "hnsw", "--similarity", "cosine"]) == 0
    assert build(["--config", str(cfg), "--method", "ivfpq", "--pq_m", "8", "--pq_bits", "4", "--similarity", "cosine"]) == 0
    assert build(["--config", str(cfg), "--method", "flat", "--similarity", "cosine"]) == 0
    params = json.loads((store / "index_ivfpq/params.json").read_text())
    assert params["params"]["pq_m"] == 8 and params["params"]["nprobe"] == 128 and params["ntotal"] == n
    for method in ("hnsw", "ivfpq", "flat"):
        kb, index = open_kb(store, method)
        assert kb.n == n == index.ntotal and index.store_id == kb.store_id
        assert (store / f"index_{method}/index.faiss").is_file()
    kb, flat = open_kb(store, "flat")
    _, ids = flat.search(np.asarray(kb.arrays["K.npy"][:20]), 1)
    keys = np.asarray(kb.arrays["K.npy"])
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    assert all(np.allclose(unit[i], unit[j], atol=1e-6) for i, j in zip(range(20), ids[:, 0]))  # self or a same-direction key
    m = kb.manifest
    assert m["source"]["path"] == str(world) and len(m["source"]["sha256"]) == 64 and m["d_ctx"] == 32
    assert json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")["ntotal"] == n


def test_reencode_with_trained_weights_reuses_raw(setup, capsys):
    tmp, cfg, _ = setup
    store = tmp / "store"
    old = KBValueStore.load(store)
    raw = {k: np.array(old.raw(k)) for k in ("e_h", "e_r", "e_t", "e_c")}
    trained = KVEncoder(32, 24, 16, 8, hidden=32, seed=9)
    save_kv_encoder(trained, tmp / "trained.safetensors")
    capsys.readouterr()
    assert _script("encode_kv")(["--config", str(cfg), "--no_progress", "--kv_encoder", str(tmp / "trained.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["reused_raw"] is True
    new, index = open_kb(store)
    K, V = compute_kv(trained, raw, np.asarray(new.arrays["meta/tau_min.npy"]), np.asarray(new.arrays["meta/tau_max.npy"]),
                      progress=False)
    assert np.array_equal(K, new.arrays["K.npy"]) and np.array_equal(V, new.arrays["V.npy"])
    assert index is None and new.store_id != old.store_id  # old indexes went with the old store


def test_bad_tuples_file_names_line_and_field(setup, tmp_path):
    _, cfg, world = setup
    lines = open(world, encoding="utf-8").read().splitlines()
    bad = json.loads(lines[2])
    del bad["relation"]["name"]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:2] + [json.dumps(bad)]) + "\n")
    with pytest.raises(SchemaError, match=r"bad.jsonl:3: relation.name: missing field"):
        _script("encode_kv")(["--config", str(cfg), "--tuples", str(tmp_path / "bad.jsonl"),
                              "--store_dir", str(tmp_path / "s"), "--no_progress"])
    assert not (tmp_path / "s").exists()


def test_stated_d_ctx_must_match_the_embedding_model(setup, tmp_path):
    _, cfg, _ = setup
    with pytest.raises(ValueError, match="d_ctx: config says 384, the embedding model .* gives 32"):
        _script("encode_kv")(["--config", str(cfg), "--set", "d_ctx=384", "--store_dir", str(tmp_path / "s"),
                              "--no_progress"])


def test_sanity_checker_reports_store_and_index_problems(setup, tmp_path):
    import shutil

    from kblampp.sanity import run_check

    tmp, _, _ = setup
    store = tmp_path / "store"
    shutil.copytree(tmp / "store", store)
    _script("build_index")(["--store_dir", str(store), "--method", "flat"])
    ok = run_check(store)
    assert ok.kind == "store" and not ok.problems and "indexes: flat (" in ok.summary
    m = json.loads((store / "index_flat/params.json").read_text())
    m["n"] = 5
    (store / "index_flat/params.json").write_text(json.dumps(m))
    assert [p.format(store) for p in run_check(store).problems] == [
        f"{store}:0: index_flat/params.json: n: index covers 5 facts, the store has {ok.summary.split()[4]}"]
    (store / "K.npy").write_bytes((store / "K.npy").read_bytes()[:-100])
    (bad,) = run_check(store).problems
    assert bad.field == "K.npy" and "truncated" in bad.reason


def test_the_configs_ef_search_applies_when_an_index_is_loaded(setup):
    """efSearch is a search-time setting: the config's value, not the saved folder's, and no rebuild."""
    from kblampp.config import IndexConfig, KBConfig
    from kblampp.inference.loading import build_source

    tmp, _, _ = setup
    store_dir = tmp / "store"
    assert _script("build_index")(["--store_dir", str(store_dir), "--method", "hnsw", "--similarity", "cosine"]) == 0
    saved = json.loads((store_dir / "index_hnsw/params.json").read_text())["params"]["ef_search"]
    cfg = KBConfig(retrieval="faiss", store_dir=str(store_dir), index=IndexConfig(method="hnsw", similarity="cosine",
                                                                                  ef_search=77))
    store = KBValueStore.load(store_dir)
    source, index = build_source(cfg, store)
    assert saved == 1024 and index.params["ef_search"] == 77
    index.search(np.asarray(store.arrays["K.npy"][:3], np.float32), 5)
    assert index.index.hnsw.efSearch == 77
    assert json.loads((store_dir / "index_hnsw/params.json").read_text())["params"]["ef_search"] == saved


def test_the_configs_nprobe_applies_when_an_ivf_index_is_loaded(setup):
    """nprobe, like efSearch, is read at search time: the config's value reaches the faiss index."""
    from kblampp.config import IndexConfig, KBConfig
    from kblampp.inference.loading import build_source

    tmp, _, _ = setup
    store_dir = tmp / "store"
    assert _script("build_index")(["--store_dir", str(store_dir), "--method", "ivfflat", "--nprobe", "2"]) == 0
    assert json.loads((store_dir / "index_ivfflat/params.json").read_text())["params"]["nprobe"] == 2
    cfg = KBConfig(retrieval="faiss", store_dir=str(store_dir), index=IndexConfig(method="ivfflat", nprobe=3))
    store = KBValueStore.load(store_dir)
    _, index = build_source(cfg, store)
    index.search(np.asarray(store.arrays["K.npy"][:3], np.float32), 5)
    assert index.method == "ivfflat" and index.params["nprobe"] == 3 and index.index.nprobe == 3
