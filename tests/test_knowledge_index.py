"""KnowledgeIndex: exact agreement of flat with brute force, ANN sanity, edits by id, save/load checks."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from kblampp.knowledge_index import IndexMismatchError, KnowledgeIndex, exact_search


def _keys(n=600, d=32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_module_does_not_import_torch():
    import kblampp.knowledge_index as ki

    assert "torch" not in ki.__dict__ and "import torch" not in open(ki.__file__).read()


@pytest.mark.parametrize("similarity", ["cosine", "ip"])
def test_flat_equals_numpy_brute_force(similarity):
    keys, q = _keys(), _keys(20, seed=1)
    scores, ids = KnowledgeIndex.build(keys, "flat", similarity).search(q, 5, batch_size=7)
    if similarity == "cosine":
        keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    ref = q @ keys.T
    assert ids.tolist() == np.argsort(-ref, axis=1)[:, :5].tolist()
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ids, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,params", [("hnsw", {}), ("ivfflat", {"nprobe": 4}),
                                           ("ivfpq", {"pq_m": 8, "ivf_nlist": 8, "nprobe": 8})])
def test_ann_finds_each_key_itself(method, params):
    keys = _keys(2000)
    index = KnowledgeIndex.build(keys, method, "cosine", **params)
    assert index.ntotal == 2000
    _, ids = index.search(keys[:200], 4)
    assert (ids[:, :4] == np.arange(200)[:, None]).any(axis=1).mean() >= 0.95


@pytest.mark.parametrize("method,params", [("flat", {}), ("hnsw", {}), ("ivfflat", {}),
                                           ("ivfpq", {"pq_m": 8, "ivf_nlist": 4, "pq_bits": 6})])
def test_remove_add_and_replace_by_fact_id(method, params):
    keys = _keys(400)
    index = KnowledgeIndex.build(keys, method, "cosine", **params)
    assert index.remove([5, 7]) == 2 and index.remove([5]) == 0
    _, ids = index.search(keys[[5, 7, 9]], 10)
    assert 5 not in ids and 7 not in ids and ids[2, 0] == 9
    new = _keys(1, seed=9)
    index.add(new, [5])  # replace: same id, new key
    _, ids = index.search(new, 1)
    assert ids[0, 0] == 5 and index.n_live == 399
    with pytest.raises(ValueError, match="fact id 5 is already in the index"):
        index.add(new, [5])


def test_save_load_round_trip_and_mismatch_messages(tmp_path):
    keys = _keys(300)
    index = KnowledgeIndex.build(keys, "hnsw", "cosine", store_id="abc@0", hnsw_m=16)
    index.remove([3])
    index.save(tmp_path / "index_hnsw")
    back = KnowledgeIndex.load(tmp_path / "index_hnsw", expect_n=300, expect_dim=32, expect_store_id="abc@0")
    q = _keys(10, seed=4)
    assert [a.tolist() for a in back.search(q, 8)] == [a.tolist() for a in index.search(q, 8)]
    assert json.loads((tmp_path / "index_hnsw/params.json").read_text())["params"]["hnsw_m"] == 16
    with pytest.raises(IndexMismatchError, match="store_id: index was built for store 'abc@0', this store is 'xyz@0'"):
        KnowledgeIndex.load(tmp_path / "index_hnsw", expect_store_id="xyz@0")
    with pytest.raises(IndexMismatchError, match="n: index covers 300 facts, the store has 301"):
        KnowledgeIndex.load(tmp_path / "index_hnsw", expect_n=301)
    with pytest.raises(IndexMismatchError, match="dim: index dimension 32, the store's keys have 64"):
        KnowledgeIndex.load(tmp_path / "index_hnsw", expect_dim=64)


def test_bad_arguments_are_clear_errors():
    keys = _keys(50)
    with pytest.raises(ValueError, match="method: 'annoy' is not one of hnsw, ivfflat, ivfpq, flat, milvus"):
        KnowledgeIndex.build(keys, "annoy")
    with pytest.raises(ValueError, match=r"unknown hnsw parameter\(s\) \['nprobe'\]"):
        KnowledgeIndex.build(keys, "hnsw", nprobe=3)
    with pytest.raises(ValueError, match="pq_m: 5 does not divide the key dimension 32"):
        KnowledgeIndex.build(keys, "ivfpq", pq_m=5)
    with pytest.raises(ValueError, match="ivfpq needs at least 256 keys"):
        KnowledgeIndex.build(keys, "ivfpq", pq_m=8)
    with pytest.raises(ValueError, match=r"queries: expected shape \(n, 32\), got \(2, 3\)"):
        KnowledgeIndex.build(keys, "flat").search(np.zeros((2, 3)), 1)


def test_exact_search_fills_missing_slots():
    scores, ids = exact_search(_keys(3), _keys(2, seed=1), 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all() and "faiss" in sys.modules


def test_recall_at_k_counts_ties_and_removed_ids():
    from kblampp.knowledge_index import recall_at_k

    keys = _keys(200)
    dup = np.concatenate([keys, keys[:50]])  # rows 200..249 repeat rows 0..49: ties everywhere
    rec = recall_at_k(KnowledgeIndex.build(dup[::-1].copy(), "flat", ids=np.arange(250)[::-1].copy()), dup, dup[:20], 8)
    assert rec["recall"] == 1.0 and rec["strict_recall"] <= 1.0
    index = KnowledgeIndex.build(keys, "flat")
    index.remove([0, 1, 2])
    rec = recall_at_k(index, keys, keys[:3], 8)  # each query's own key (the top hit) is gone
    assert rec["recall"] == rec["strict_recall"] <= 7 / 8 and rec["recall"] >= 0.5


def _clustered_keys(seed: int) -> np.ndarray:
    """Keys like MLP(e_h + e_r): 5 relation clusters, 60 heads (300 facts)."""
    rng = np.random.default_rng(seed)
    rel, head = rng.standard_normal((5, 32)), rng.standard_normal((60, 32))
    return np.array([rel[r] + 0.3 * head[h] for h in range(60) for r in range(5)], np.float32)


def _missed(index: KnowledgeIndex, keys: np.ndarray, k: int = 8) -> list[int]:
    """Facts an exact inner-product search ranks into the top k (any tie order) that `index` misses."""
    queries = keys - keys.mean(0)
    exact = queries @ keys.T
    _, got = index.search(queries, k)
    return [i for i in range(len(keys)) if (exact[i] >= exact[i, i] - 1e-5).sum() <= k and i not in got[i]]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_edited_keys_in_the_exact_segment_stay_reachable(seed, tmp_path):
    """1,000 replacements of facts by their own key (issue 15: re-adding them to an inner-product HNSW
    graph made some unreachable); edits in the exact segment are always found, also after save/load."""
    import faiss

    faiss.omp_set_num_threads(1)
    keys = _clustered_keys(seed)
    index = KnowledgeIndex.build(keys, "hnsw", "ip")
    assert _missed(index, keys) == []
    rng = np.random.default_rng(100 + seed)
    for step in range(1, 1001):
        i = int(rng.integers(0, len(keys)))
        assert index.remove([i]) == 1
        index.add(keys[i:i + 1], [i], exact=True)
        if step % 250 == 0:
            assert _missed(index, keys) == [], step
    assert index.n_live == len(keys) and index.ntotal == len(keys) + len(index.exact_ids)
    index.save(tmp_path / "idx")
    loaded = KnowledgeIndex.load(tmp_path / "idx")
    assert loaded.exact_ids.tolist() == index.exact_ids.tolist() and _missed(loaded, keys) == []
    assert loaded.needs_rebuild(0.1) and not loaded.needs_rebuild(1e9)
    fresh = loaded.rebuilt(keys, np.arange(len(keys)))
    assert len(fresh.exact_ids) == 0 and not fresh.dead.any() and _missed(fresh, keys) == []


def test_exact_segment_merge_is_exact_for_flat():
    keys, q = _keys(200), _keys(10, seed=3)
    ref = KnowledgeIndex.build(keys, "flat", "cosine")
    mixed = KnowledgeIndex.build(keys[:150], "flat", "cosine")
    mixed.add(keys[150:], np.arange(150, 200), exact=True)
    for index in (ref, mixed):
        index.remove([3, 170])
    (s1, i1), (s2, i2) = ref.search(q, 12), mixed.search(q, 12)
    assert i1.tolist() == i2.tolist()
    np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="fact id 160 is already in the index"):
        mixed.add(keys[:1], [160], exact=True)


def _far_queries(keys: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Queries ~40x longer than the keys, along a shared direction (the trained model's queries look so)."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(keys.shape[1]).astype(np.float32)
    return (40 * (shared + 0.7 * rng.standard_normal((n, keys.shape[1])))).astype(np.float32)


def test_inner_product_hnsw_searches_as_l2_and_returns_inner_products():
    keys = _keys(1500) * np.random.default_rng(5).uniform(0.3, 2.0, (1500, 1)).astype(np.float32)
    q = _far_queries(keys, 50, seed=6)
    index = KnowledgeIndex.build(keys, "hnsw", "ip", ef_search=1500)  # mips "l2" is the default
    assert index.mips_l2 and index.dim == 32 and index.index.d == 33
    assert index.params["mips_norm"] == pytest.approx(float(np.linalg.norm(keys, axis=1).max()))
    scores, ids = index.search(q, 8)
    ref = q @ keys.T
    assert ids.tolist() == np.argsort(-ref, axis=1)[:, :8].tolist()  # efSearch >= N: the exact order
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ids, 1), rtol=1e-4, atol=1e-2)
    native = KnowledgeIndex.build(keys, "hnsw", "ip", mips="ip", ef_search=1500)
    assert not native.mips_l2 and native.index.d == 32


def test_inner_product_ivfflat_is_exact_when_every_list_is_searched_and_nprobe_is_read_at_search(tmp_path):
    keys = _keys(4000) * np.random.default_rng(5).uniform(0.3, 2.0, (4000, 1)).astype(np.float32)
    q = _far_queries(keys, 50, seed=6)
    index = KnowledgeIndex.build(keys, "ivfflat", "ip", ivf_nlist=16, nprobe=16)  # mips "l2" is the default
    assert index.mips_l2 and index.index.d == 33 and index.params["ivf_nlist_used"] == 16
    ref = q @ keys.T
    scores, ids = index.search(q, 8)
    assert ids.tolist() == np.argsort(-ref, axis=1)[:, :8].tolist()  # all 16 lists scanned: the exact order
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ids, 1), rtol=1e-4, atol=1e-2)
    index.params["nprobe"] = 1  # one list: fewer of the exact top-8, each score still exact
    one_scores, one_ids = index.search(q, 8)
    found = one_ids >= 0
    assert found.all() and one_ids.tolist() != ids.tolist()
    np.testing.assert_allclose(one_scores, np.take_along_axis(ref, one_ids, 1), rtol=1e-4, atol=1e-2)
    index.save(tmp_path / "idx")
    back = KnowledgeIndex.load(tmp_path / "idx", expect_dim=32)
    assert back.method == "ivfflat" and back.params["nprobe"] == 1
    assert back.search(q, 8)[1].tolist() == one_ids.tolist()
    with pytest.raises(ValueError, match=r"unknown ivfflat parameter\(s\) \['pq_m'\]"):
        KnowledgeIndex.build(keys, "ivfflat", "ip", pq_m=8)


@pytest.mark.parametrize("method", ["hnsw", "ivfflat"])
def test_an_empty_kb_builds_searches_and_takes_adds(method):
    index = KnowledgeIndex.build(np.zeros((0, 32), np.float32), method, "ip")
    assert index.ntotal == 0 and index.search(_keys(2), 3)[1].tolist() == [[-1, -1, -1]] * 2
    index.add(_keys(3), [0, 1, 2])
    assert sorted(index.search(_keys(1), 3)[1][0].tolist()) == [0, 1, 2]


def test_a_longer_key_added_after_the_build_goes_to_the_exact_segment(tmp_path):
    keys = _keys(400)
    index = KnowledgeIndex.build(keys, "hnsw", "ip")
    long_key = 10 * keys[:1] / np.linalg.norm(keys[:1]) * index.params["mips_norm"]
    index.add(np.concatenate([long_key, keys[1:2]]), [400, 401])
    assert index.exact_ids.tolist() == [400] and index.ntotal == 402 and index.n_live == 402
    _, ids = index.search(long_key, 1)
    assert ids[0, 0] == 400
    index.save(tmp_path / "idx")
    back = KnowledgeIndex.load(tmp_path / "idx", expect_dim=32)
    assert back.mips_l2 and back.search(long_key, 1)[1][0, 0] == 400
    with pytest.raises(IndexMismatchError, match="dim: index dimension 32, the store's keys have 33"):
        KnowledgeIndex.load(tmp_path / "idx", expect_dim=33)
    with pytest.raises(ValueError, match="mips: 'cos' is not one of l2, ip"):
        KnowledgeIndex.build(keys, "hnsw", "ip", mips="cos")


def test_a_folder_saved_before_the_mips_option_loads_as_native_inner_product(tmp_path):
    keys = _keys(300)
    index = KnowledgeIndex.build(keys, "hnsw", "ip", mips="ip")
    index.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old/params.json").read_text())
    del meta["params"]["mips"]  # what older versions wrote
    (tmp_path / "old/params.json").write_text(json.dumps(meta))
    back = KnowledgeIndex.load(tmp_path / "old", expect_dim=32)
    assert not back.mips_l2 and back.dim == 32
    assert back.search(keys[:5], 3)[1].tolist() == index.search(keys[:5], 3)[1].tolist()
