"""The Milvus backend (on Milvus Lite) behind the KnowledgeIndex API: the faiss index tests, run on Milvus."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kblampp.knowledge_index import IndexMismatchError, KnowledgeIndex, exact_search, recall_at_k
from test_kb_store import embedder, store_dir, world  # noqa: F401 - the store tests' fixtures


def _keys(n=600, d=32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _build(tmp_path, keys, similarity="cosine", **kw):
    return KnowledgeIndex.build(keys, "milvus", similarity, uri=str(tmp_path / "index_milvus" / "milvus.db"), **kw)


def test_module_does_not_import_torch_or_pymilvus_at_import():
    import kblampp.milvus_index as mi

    text = open(mi.__file__).read()
    assert "import torch" not in text and "\nfrom pymilvus" not in text and "\nimport pymilvus" not in text


@pytest.mark.parametrize("similarity", ["cosine", "ip"])
def test_search_agrees_with_exact_search(tmp_path, similarity):
    keys, q = _keys(), _keys(20, seed=1)
    index = _build(tmp_path, keys, similarity)
    scores, ids = index.search(q, 5, batch_size=7)
    ref_scores, ref_ids = exact_search(keys, q, 5, similarity)
    assert index.ntotal == 600 and type(index).__name__ == "MilvusIndex"
    assert ids.tolist() == ref_ids.tolist()  # HNSW at ef 128 over 600 keys finds the exact top 5
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert recall_at_k(index, keys, q, 8)["recall"] == 1.0


def test_remove_add_and_replace_by_fact_id(tmp_path):
    """The faiss test's edit sequence, run on Milvus (imported here so pytest collects it once)."""
    from test_knowledge_index import test_remove_add_and_replace_by_fact_id as same_on

    same_on("milvus", {"uri": str(tmp_path / "milvus.db")})
    index = _build(tmp_path, _keys(10))
    with pytest.raises(ValueError, match="fact id 600 appears twice in one add"):
        index.add(_keys(2, seed=3), [600, 600])
    index.add(_keys(1, seed=3), [600])
    assert index.n == 601 and index.n_live == 11


def test_fewer_keys_than_k_fills_missing_slots(tmp_path):
    scores, ids = _build(tmp_path, _keys(3)).search(_keys(2, seed=1), 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all() and sorted(ids[0, :3]) == [0, 1, 2]


def test_save_load_round_trip_and_mismatch_messages(tmp_path):
    keys = _keys(300)
    folder = tmp_path / "index_milvus"
    index = _build(tmp_path, keys, store_id="abc@0", hnsw_m=16, ids=np.arange(300) + 10)
    index.remove([13])
    index.save(folder)
    manifest = json.loads((folder / "params.json").read_text())
    assert manifest["method"] == "milvus" and manifest["params"]["hnsw_m"] == 16
    assert manifest["params"]["uri"] == "milvus.db" and manifest["ntotal"] == 299 and manifest["n"] == 310
    q = _keys(10, seed=4)
    before = [a.tolist() for a in index.search(q, 8)]
    index.close()
    back = KnowledgeIndex.load(folder, expect_n=310, expect_dim=32, expect_store_id="abc@0")
    assert [a.tolist() for a in back.search(q, 8)] == before and back.ntotal == 299
    with pytest.raises(IndexMismatchError, match="store_id: index was built for store 'abc@0', this store is 'xyz@0'"):
        KnowledgeIndex.load(folder, expect_store_id="xyz@0")
    with pytest.raises(IndexMismatchError, match="n: index covers 310 facts, the store has 301"):
        KnowledgeIndex.load(folder, expect_n=301)
    with pytest.raises(IndexMismatchError, match="dim: index dimension 32, the store's keys have 64"):
        KnowledgeIndex.load(folder, expect_dim=64)
    back.remove([14])  # the collection changed after the manifest was written
    with pytest.raises(IndexMismatchError, match="ntotal: params say 299, the collection has 298"):
        KnowledgeIndex.load(folder)
    back.close()
    manifest["params"]["collection"] = "other"
    (folder / "params.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="collection: 'other' is not in Milvus at .*milvus.db"):
        KnowledgeIndex.load(folder)


def test_manifest_commits_with_a_store_edit(tmp_path):
    """`writers()` is what a store edit commits: the manifest with the new store id and counts."""
    folder = tmp_path / "index_milvus"
    index = _build(tmp_path, _keys(50), store_id="s@0")
    index.save(folder)
    index.remove([1])
    index.store_id = "s@1"
    index.writers()["params.json"](folder / "params.json")
    back = KnowledgeIndex.load(folder, expect_n=50, expect_store_id="s@1")
    assert back.ntotal == 49


def test_bad_arguments_are_clear_errors(tmp_path):
    keys = _keys(50)
    with pytest.raises(ValueError, match="method: 'annoy' is not one of hnsw, ivfflat, ivfpq, flat, milvus"):
        KnowledgeIndex.build(keys, "annoy")
    with pytest.raises(ValueError, match=r"unknown milvus parameter\(s\) \['pq_m'\]"):
        _build(tmp_path, keys, pq_m=3)
    with pytest.raises(ValueError, match="milvus_index_type: 'DISKANN' is not one of HNSW, IVF_FLAT"):
        _build(tmp_path, keys, milvus_index_type="DISKANN")
    with pytest.raises(ValueError, match="similarity: 'l2' is not one of cosine, ip"):
        _build(tmp_path, keys, "l2")
    with pytest.raises(ValueError, match="index: uri: 'kb.sqlite' is neither a Milvus Lite path ending in .db"):
        KnowledgeIndex.build(keys, "milvus", uri="kb.sqlite")
    with pytest.raises(ValueError, match=r"index: uri: empty \(a Milvus Lite path ending in .db"):
        KnowledgeIndex.build(keys, "milvus")
    index = _build(tmp_path, keys)
    with pytest.raises(ValueError, match=r"queries: expected shape \(n, 32\), got \(2, 3\)"):
        index.search(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="keys: contains NaN or inf"):
        index.add(np.full((1, 32), np.nan), [99])
    with pytest.raises(IndexMismatchError, match="uri: Milvus Lite file .*gone.db is missing"):
        (tmp_path / "x").mkdir()
        (tmp_path / "x/params.json").write_text(json.dumps({"method": "milvus", "similarity": "ip", "dim": 32,
                                                            "params": {"uri": "gone.db", "collection": "c"}}))
        KnowledgeIndex.load(tmp_path / "x")


def test_store_builds_edits_and_opens_a_milvus_index(store_dir, embedder):  # noqa: F811 - the fixtures
    """offline/build_index.py's step with `index.method: milvus` (default Lite file inside index_milvus/),
    then a store edit that commits the index manifest, then open_kb."""
    from kblampp.kb_store import build_store_index, open_kb

    report = build_store_index(store_dir, "milvus", "cosine", uri="", collection="kb")
    assert report["path"].endswith("index_milvus") and (store_dir / "index_milvus/milvus.db").exists()
    store, index = open_kb(store_dir, "milvus", embedder=embedder)
    assert index.ntotal == store.n and index.store_id == store.store_id
    store.delete_fact(3, index=index)
    store.replace_fact(5, store.fact(5), index=index)  # the index entry is swapped through index.add(..., exact=True)
    index.close()
    store, index = open_kb(store_dir, "milvus")  # checks store id, N and the collection's count
    assert index.ntotal == store.n - 1 and 3 not in index.search(store.keys_tensor().numpy()[[4]], 5)[1]
    assert 5 in index.search(store.keys_tensor().numpy()[[5]], 5)[1]


def test_inner_product_searches_as_l2_with_an_exact_collection_for_longer_keys(tmp_path):
    """The trained model's queries (long, along a shared direction) against keys of varied norms: the
    L2 form returns the exact inner-product order and scores; a key added later that is longer than
    mips_norm is found through the exact collection, also after save/load; removal reaches both."""
    from test_knowledge_index import _far_queries

    keys = _keys(800) * np.random.default_rng(5).uniform(0.3, 2.0, (800, 1)).astype(np.float32)
    q = _far_queries(keys, 30, seed=6)
    index = _build(tmp_path, keys, "ip", ef_search=800)  # mips "l2" is the default
    assert index.mips_l2 and index.dim == 32
    assert index.params["mips_norm"] == pytest.approx(1.01 * float(np.linalg.norm(keys, axis=1).max()))
    scores, ids = index.search(q, 8)
    ref = q @ keys.T
    assert ids.tolist() == np.argsort(-ref, axis=1)[:, :8].tolist()
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ids, 1), rtol=1e-4, atol=1e-2)
    long_key = 10 * keys[:1] / np.linalg.norm(keys[:1]) * index.params["mips_norm"]
    index.add(np.concatenate([long_key, keys[1:2]]), [800, 801])
    assert index.ntotal == 802 and index._live_among(np.array([800]), index.exact_collection).tolist() == [800]
    assert index.search(long_key, 1)[1][0, 0] == 800
    index.add(keys[2:3], [802], exact=True)  # a store / server edit: searched exactly
    assert index._live_among(np.array([801, 802]), index.exact_collection).tolist() == [802]
    assert index.search(keys[2:3], 1)[1][0, 0] in (2, 802)  # the edit is a copy of key 2
    index.remove([802])
    folder = tmp_path / "index_milvus"
    index.save(folder)
    back = KnowledgeIndex.load(folder, expect_dim=32)
    assert back.mips_l2 and back.ntotal == 802 and back.search(long_key, 1)[1][0, 0] == 800
    assert back.remove([800, 801, 5]) == 3 and back.ntotal == 799 and 800 not in back.search(long_key, 8)[1]
    back.close()
    index.close()
    native = _build(tmp_path, keys, "ip", mips="ip", collection="native")
    assert not native.mips_l2 and native.collections == ("native",)
    with pytest.raises(ValueError, match="mips: 'cos' is not one of l2, ip"):
        _build(tmp_path, keys, "ip", mips="cos")


def test_graph_parameters_reach_the_collection(tmp_path):
    """M and efConstruction are the configured ones (pymilvus 3 flattens build parameters, and Milvus
    Lite read none of them, building every graph at its defaults M 16 / efConstruction 200)."""
    index = _build(tmp_path, _keys(50), "ip", hnsw_m=24, ef_construction=123)
    described = index.client.describe_index(index.collection, "key")
    assert described["params"] == {"M": 24, "efConstruction": 123}


def test_ivf_flat_collection_takes_the_lists_and_searches_exactly_with_every_list(tmp_path):
    """IVF_FLAT (the faiss `ivfflat`'s lists): nlist reaches the collection, nprobe is read at search,
    and with every list probed the result is exact search's; the folder reloads as IVF_FLAT."""
    keys, q = _keys(2000), 40 * _keys(30, seed=1)
    index = _build(tmp_path, keys, "ip", milvus_index_type="IVF_FLAT", ivf_nlist=16, nprobe=16)
    assert index.client.describe_index(index.collection, "key")["index_type"] == "IVF_FLAT"
    assert index.client.describe_index(index.collection, "key")["params"] == {"nlist": 16}
    assert index.params["ivf_nlist_used"] == 16
    scores, ids = index.search(q, 8)
    ref_scores, ref_ids = exact_search(keys, q, 8, "ip")
    assert ids.tolist() == ref_ids.tolist()
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-3)
    index.params["nprobe"] = 1
    assert recall_at_k(index, keys, q, 8)["recall"] < 1.0
    index.save(tmp_path / "index_milvus")
    index.close()
    back = KnowledgeIndex.load(tmp_path / "index_milvus", expect_dim=32)
    assert back.index_type == "IVF_FLAT" and back.params["nprobe"] == 1
