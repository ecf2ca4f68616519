"""KBValueStore: recompute from raw, fetch, edits with the store's own encoder, load-time checks,
atomicity under simulated crashes, extra arrays. Tiny random BERT embedder, a small generated world."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kblampp import kb_store as kbs
from kblampp.embedding import load_embedder
from kblampp.kb_store import KBValueStore, compute_kv, embed_facts, open_kb, write_store
from kblampp.knowledge_index import KnowledgeIndex
from kblampp.kv_encoder import KVEncoder, save_kv_encoder
from kblampp.schema import SchemaError, fact_from_dict
from kblampp.store_io import StoreError
from kblampp.synth.world import WorldSizes, generate_worlds
from test_embedding import make_tiny_embedder_dir

SIZES = WorldSizes(persons=10, organisations=2, cities=3, universities=2, clubs=2, events=2)
NEW = {"head": {"id": "X1", "name": "Zorblax Industries", "type": "ORG"},
       "relation": {"id": "R900", "name": "founded by"}, "tail": {"id": None, "name": "Mira Quell"},
       "context": {"sent_span": "Zorblax Industries was founded by Mira Quell in 2011."},
       "time_window": {"start": "2011", "end": None}}


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    return load_embedder(str(make_tiny_embedder_dir(tmp_path_factory.mktemp("emb"))))


@pytest.fixture(scope="module")
def world():
    return [fact_from_dict(f) for f in generate_worlds(0, 1, SIZES)]


def build(path: Path, embedder, world, dtype="float32", seed=0) -> Path:
    enc = KVEncoder(embedder.dim, 24, 20, 8, hidden=32, seed=seed)
    write_store(path, world, embed_facts(embedder, world, progress=False), enc, embedder.name,
                dtype=dtype, progress=False)
    return path


@pytest.fixture
def store_dir(tmp_path, embedder, world):
    return build(tmp_path / "store", embedder, world)


def test_recompute_kv_from_raw_and_encoder_gives_stored_arrays(store_dir, embedder, world):
    store = KBValueStore.load(store_dir)
    assert (store.n, store.d_k, store.d_v, store.d_ctx) == (len(world), 24, 20, 32)
    raw = {k: np.asarray(store.raw(k)) for k in kbs.RAW}
    tau_min, tau_max = np.asarray(store.arrays["meta/tau_min.npy"]), np.asarray(store.arrays["meta/tau_max.npy"])
    K, V = compute_kv(store.encoder, raw, tau_min, tau_max, progress=False)
    assert np.array_equal(K, store.arrays["K.npy"]) and np.array_equal(V, store.arrays["V.npy"])
    np.testing.assert_allclose(raw["e_h"], embedder.encode([f.head_name for f in world], progress=False), atol=1e-5)
    assert np.array_equal(raw["e_c"], store.arrays["meta/ctx_vec.npy"])
    assert store.fact(3) == json.loads(json.dumps(world[3].raw))


def test_fetch_keeps_index_shape_and_rows(store_dir, world):
    store = KBValueStore.load(store_dir)
    idx = torch.tensor([[0, 5, 2], [7, 7, 1]])
    out = store.fetch(idx)
    assert out["K"].shape == (2, 3, 24) and out["V"].shape == (2, 3, 20) and out["ctx_vec"].shape == (2, 3, 32)
    assert out["tau_min"].shape == (2, 3) and out["entity_ids"].shape == (2, 3, 2) and out["K"].dtype == torch.float32
    assert torch.equal(out["K"][1, 0], torch.from_numpy(np.array(store.arrays["K.npy"][7])))
    assert out["tau_max"][0, 0].item() == world[0].tau_max and out["alive"].all()
    assert torch.equal(store.keys_tensor()[5], out["K"][0, 1])
    with pytest.raises(IndexError, match=f"fact index {len(world)} out of range"):
        store.fetch(torch.tensor([len(world)]))


def test_fp16_storage_round_trip(tmp_path, embedder, world):
    store = KBValueStore.load(build(tmp_path / "s16", embedder, world, dtype="float16"))
    assert store.arrays["K.npy"].dtype == np.float16 and store.fetch(torch.tensor([0]))["K"].dtype == torch.float32


def test_added_fact_fetches_what_was_added_and_persists(store_dir, embedder):
    store, _ = open_kb(store_dir, embedder=embedder)
    index = KnowledgeIndex.build(np.asarray(store.arrays["K.npy"]), "flat", "cosine", store_id=store.store_id)
    n0 = store.n
    assert store.add_facts([NEW], index=index) == [n0]
    e = embedder.encode(["Zorblax Industries", "founded by", "Mira Quell",
                         NEW["context"]["sent_span"]], progress=False)
    t = {k: torch.from_numpy(v[None]) for k, v in zip(("h", "r", "t", "c"), e)}
    with torch.no_grad():
        key = store.encoder.encode_keys(t["h"], t["r"])[0]
        val = store.encoder.encode_values(t["t"], t["c"], torch.tensor([14975.0]), torch.tensor([math.inf]))[0]
    for s in (store, KBValueStore.load(store_dir)):  # in memory and after a restart
        got = s.fetch(torch.tensor([n0]))
        torch.testing.assert_close(got["K"][0], key, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["V"][0], val, atol=1e-5, rtol=0)
        assert s.fact(n0)["head"]["name"] == "Zorblax Industries" and got["entity_ids"][0, 1] == -1
        assert got["tau_min"][0].item() == 14975.0 and s.n == n0 + 1
    store2, index2 = open_kb(store_dir, "flat")
    assert index2.search(store2.fetch(torch.tensor([n0]))["K"].numpy(), 1)[1][0, 0] == n0


def test_replace_and_delete_keep_other_indices(store_dir, embedder):
    store = KBValueStore.load(store_dir, embedder=embedder)
    index = KnowledgeIndex.build(np.asarray(store.arrays["K.npy"]), "hnsw", "cosine", store_id=store.store_id)
    before = np.array(store.arrays["K.npy"])
    store.replace_fact(4, NEW, index=index)
    assert store.fact(4)["tail"]["name"] == "Mira Quell" and store.n == len(before)
    assert not np.array_equal(store.arrays["K.npy"][4], before[4])
    assert np.array_equal(np.delete(np.asarray(store.arrays["K.npy"]), 4, 0), np.delete(before, 4, 0))
    store.delete_fact(2, index=index)
    assert not store.alive[2] and not np.asarray(store.arrays["K.npy"][2]).any() and store.fact(2)
    reopened, idx = open_kb(store_dir, "hnsw")
    _, ids = idx.search(before[[2, 6]], 3)
    assert 2 not in ids[0] and 6 in ids[1] and not reopened.alive[2]


def test_bad_added_fact_names_field_and_leaves_store(store_dir, embedder):
    store = KBValueStore.load(store_dir, embedder=embedder)
    bad = json.loads(json.dumps(NEW))
    bad["time_window"]["end"] = "2001"
    with pytest.raises(SchemaError, match=r"<add_facts>:2: time_window.end: window ends"):
        store.add_facts([NEW, bad])
    assert KBValueStore.load(store_dir).n == store.n
    with pytest.raises(RuntimeError, match="editing facts needs the embedding model"):
        KBValueStore.load(store_dir).add_facts([NEW])


def test_truncated_array_fails_with_file_named(store_dir):
    path = store_dir / "V.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"V.npy: file has \d+ bytes, .* \(truncated\)"):
        KBValueStore.load(store_dir)


def test_index_of_another_store_fails(tmp_path, embedder, world):
    a, b = build(tmp_path / "a", embedder, world), build(tmp_path / "b", embedder, world)
    sb = KBValueStore.load(b)
    KnowledgeIndex.build(np.asarray(sb.arrays["K.npy"]), "flat", store_id=sb.store_id, n=sb.n).save(a / "index_flat")
    with pytest.raises(StoreError, match="store_id: index was built for store .* this store is"):
        open_kb(a)


def test_manifest_disagreements_are_named(store_dir, embedder, tmp_path):
    m = json.loads((store_dir / "manifest.json").read_text())
    m["arrays"]["K.npy"]["dtype"] = "float16"
    (store_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="arrays.K.npy: .* disagrees"):
        KBValueStore.load(store_dir)
    m["arrays"]["K.npy"]["dtype"], m["kv_encoder"]["sha256"] = "float32", "0" * 64
    (store_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="kv_encoder.safetensors: weights hash .* does not match"):
        KBValueStore.load(store_dir)
    save_kv_encoder(KVEncoder(32, 24, 20, 8, hidden=32, seed=5), store_dir / "kv_encoder.safetensors")
    m["embedding_model"] = "embedded:all-MiniLM-L6-v2"
    (store_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="kv_encoder.safetensors: weights hash"):
        KBValueStore.load(store_dir)


def test_embedder_mismatch_is_named(store_dir, embedder):
    m = json.loads((store_dir / "manifest.json").read_text())
    m["embedding_model"] = "embedded:all-MiniLM-L6-v2"
    (store_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="embedding_model: store was encoded with 'embedded:all-MiniLM-L6-v2'"):
        KBValueStore.load(store_dir, embedder=embedder)


def test_interrupted_full_write_leaves_old_store(store_dir, embedder, world, monkeypatch):
    old_id = KBValueStore.load(store_dir).store_id
    calls = {"n": 0}
    real = kbs.save_npy

    def dying(path, array):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("power cut")
        real(path, array)

    monkeypatch.setattr(kbs, "save_npy", dying)
    with pytest.raises(KeyboardInterrupt):
        build(store_dir, embedder, world[:5], seed=1)
    assert KBValueStore.load(store_dir).store_id == old_id and KBValueStore.load(store_dir).n == len(world)
    assert [p.name for p in store_dir.parent.iterdir()] == ["store"]


@pytest.mark.parametrize("crash,expect_new", [("stage", False), ("commit", True)])
def test_interrupted_edit_is_all_or_nothing(store_dir, embedder, crash, expect_new):
    store = KBValueStore.load(store_dir, embedder=embedder)
    n0 = store.n
    store._crash_after = crash
    with pytest.raises(KeyboardInterrupt):
        store.add_facts([NEW])
    again = KBValueStore.load(store_dir)  # recovery runs here
    assert again.n == (n0 + 1 if expect_new else n0) and not (store_dir / ".pending").exists()
    if expect_new:
        assert again.fact(n0)["head"]["name"] == "Zorblax Industries"


def test_extra_arrays_round_trip_and_follow_edits(store_dir, embedder):
    store = KBValueStore.load(store_dir, embedder=embedder)
    tokens = np.arange(store.n * 3, dtype=np.int64).reshape(store.n, 3)
    store.write_extra("tail_tokens", tokens)
    assert np.array_equal(KBValueStore.load(store_dir).read_extra("tail_tokens"), tokens)
    with pytest.raises(ValueError, match="per-fact extra array 'tail_tokens' needs rows"):
        store.add_facts([NEW])
    store.extra_builders["tail_tokens"] = lambda facts: np.full((len(facts), 3), 7, np.int64)
    (i,) = store.add_facts([NEW])
    assert KBValueStore.load(store_dir).read_extra("tail_tokens")[i].tolist() == [7, 7, 7]
    store.replace_fact(0, NEW, extra_rows={"tail_tokens": np.array([[1, 2, 3]])})
    assert store.read_extra("tail_tokens")[0].tolist() == [1, 2, 3]


def test_embedding_in_parts_resumes_at_the_first_missing_part(tmp_path, world):
    from kblampp.training.toy import HashEmbedder

    class Counting(HashEmbedder):
        calls = 0

        def encode(self, texts, **kw):
            Counting.calls += 1
            return super().encode(texts, **kw)

    emb = Counting(16)
    whole = embed_facts(emb, world, progress=False)
    parts = tmp_path / "parts"
    got = kbs.embed_facts_in_parts(emb, world, parts, part_size=7, progress=False)
    n_parts = math.ceil(len(world) / 7)
    assert all(np.array_equal(got[k], whole[k]) for k in kbs.RAW)
    assert len(list(parts.glob("part_*.safetensors"))) == n_parts
    (parts / "part_00001.safetensors").unlink()  # stopped before that part was saved
    Counting.calls = 0
    again = kbs.embed_facts_in_parts(emb, world, parts, part_size=7, progress=False)
    assert Counting.calls == 1 and all(np.array_equal(again[k], whole[k]) for k in kbs.RAW)  # only that part
    with pytest.raises(StoreError, match=r"parts.json: embedding parts of .*'part_size': 7.*use another folder"):
        kbs.embed_facts_in_parts(emb, world, parts, part_size=5, progress=False)
