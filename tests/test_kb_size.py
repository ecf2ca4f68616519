"""Quality against KB size (issue 16): distractor worlds (exact counts, nested, no shared names or ids),
recall of an index against exact search (tie-aware), gold recall, the size table round trip and plot."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest

from kblampp.evaluation.kb_size import (exact_scores, exact_top, gold_recall, index_recall, markdown_size_table,
                                        plot_size, read_size_table, recall_against, size_plan, write_size_table)
from kblampp.knowledge_index import KnowledgeIndex
from kblampp.synth.distractors import collisions, distractor_facts, entity_names, first_free_world
from kblampp.synth.names import initials_of
from kblampp.synth.world import WorldSizes, generate_world

SMALL = WorldSizes(persons=20, organisations=3, cities=5, universities=2, clubs=3, events=2)


@pytest.fixture(scope="module")
def base():
    taken: set[str] = set()
    return generate_world(0, 3, taken, SMALL) + generate_world(1, 3, taken, SMALL)


def test_distractors_have_the_exact_count_and_are_nested(base):
    big = distractor_facts(base, 700, seed=4, sizes=SMALL, progress=False)
    small = distractor_facts(base, 123, seed=4, sizes=SMALL, progress=False)
    assert len(big) == 700 and len(small) == 123 and distractor_facts(base, 0, seed=4, progress=False) == []
    assert small == big[:123]  # a smaller KB is a prefix of a larger one
    assert first_free_world(base) == 2
    worlds = {f["context"]["disamb"]["world"] for f in big}
    assert "world_00" not in worlds and "world_01" not in worlds and "world_02" in worlds
    assert big == distractor_facts(base, 700, seed=4, sizes=SMALL, progress=False)  # deterministic
    with pytest.raises(ValueError, match="count: must be >= 0, got -1"):
        distractor_facts(base, -1, seed=4)


def test_distractors_never_reuse_a_base_name_or_id(base):
    unguarded = generate_world(2, 4, set(), SMALL)  # what world 2 of seed 4 draws with nothing reserved
    city = next(f["tail"]["name"] for f in unguarded if f["tail"].get("type") == "LOC")
    planted = copy.deepcopy(base)
    planted[0]["tail"]["name"] = city  # the base KB now names that city
    assert collisions(planted, unguarded).names >= 1  # the check sees a shared name ...
    guarded = distractor_facts(planted, len(unguarded), seed=4, sizes=SMALL, progress=False)
    assert city not in entity_names(guarded)  # ... and the generator never draws it
    clash = collisions(planted, guarded)
    assert (clash.names, clash.ids, clash.rate) == (0, 0, 0.0) and clash.checked == 35  # every entity of the world
    clash_ids = collisions(base, generate_world(1, 9, set(), SMALL))  # same world index: ids W01E... repeat
    assert clash_ids.ids > 0 and clash_ids.examples


def test_name_blocks_restart_from_the_base_names_only(base):
    one_block = distractor_facts(base, 400, seed=4, sizes=SMALL, progress=False)
    blocks = distractor_facts(base, 400, seed=4, sizes=SMALL, progress=False, names_block=2)
    taken = set(entity_names(base))
    first_two = len(generate_world(2, 4, taken, SMALL)) + len(generate_world(3, 4, taken, SMALL))
    assert blocks[:first_two] == one_block[:first_two]  # the first block (worlds 2 and 3) is the same draw
    clash = collisions(base, blocks)
    assert (clash.names, clash.ids) == (0, 0)  # later blocks may repeat each other's names, never the base's
    with pytest.raises(ValueError, match="names_block: must be >= 1, got 0"):
        distractor_facts(base, 10, seed=4, names_block=0)


def test_recall_against_counts_ties_as_hits():
    scores = np.array([[5.0, 4.0, 4.0, 1.0, 0.0]])  # facts 1 and 2 tie (same head and relation)
    tied = recall_against(np.array([[0, 2, 3]]), scores, [2])
    assert tied["recall@2"] == 1.0 and tied["strict@2"] in (0.5, 1.0)  # strict depends on which tie is "the" top-2
    got = recall_against(np.array([[3, 0, -1]]), scores, [1, 3])
    assert got["recall@1"] == 0.0 and got["recall@3"] == pytest.approx(1 / 3)  # fact 3 and the empty slot miss


def test_exact_top_and_index_recall_of_a_flat_index_are_exact():
    rng = np.random.default_rng(0)
    keys, queries = rng.standard_normal((300, 16)).astype(np.float32), rng.standard_normal((40, 16)).astype(np.float32)
    ref = np.argsort(-(queries @ keys.T), axis=1)[:, :5]
    assert exact_top(keys, queries, 5, chunk=7).tolist() == ref.tolist()
    flat = KnowledgeIndex.build(keys, "flat", "ip")
    assert index_recall(flat, keys, queries, (1, 5), chunk=9) == {"recall@1": 1.0, "strict@1": 1.0,
                                                                   "recall@5": 1.0, "strict@5": 1.0}
    cos = exact_scores(keys, queries, "cosine")
    assert cos.shape == (40, 300) and np.abs(cos).max() <= 1.0 + 1e-5
    with pytest.raises(ValueError, match="similarity: 'l1' is not one of ip, cosine"):
        exact_scores(keys, queries, "l1")


def test_gold_recall_skips_unanswerable_questions():
    found = np.array([[4, 2, 9], [1, 7, 8], [0, 0, 0]])
    got = gold_recall(found, [[2, 4], [5, 1], []], [4, 5, None], k=2)
    assert got == {"recall@K": pytest.approx(0.75), "top1": 0.5, "n": 2}


def _size(n: int, em: float) -> dict:
    row = {"em": em, "em_ci_low": em - 0.02, "em_ci_high": em + 0.02, "recall@1": 0.6, "recall@K": 0.8,
           "recall@K_single-hop": 0.9, "n": 10}
    return {"n_facts": n, "n_distractors": n - 100, "K_top": 8, "collisions": {"names": 0, "ids": 0},
            "build": {"generate_s": 1.0, "embed_s": 2.0, "kv_write_s": 3.0, "hnsw_build_s": 4.0},
            "store_bytes": 2 ** 21, "index_bytes": 2 ** 20, "peak_rss_build_bytes": 2 ** 22, "peak_rss_bytes": 2 ** 23,
            "index_recall": {"hnsw": {"recall@1": 0.99, "recall@8": 0.98}},
            "rows": {"lookup": row | {"label": "lookup", "retrieval": "–", "index": ""},
                     "kblampp_hnsw": row | {"label": "kblampp", "retrieval": "HNSW ip", "index": "hnsw"}}}


def _searched(n: int) -> dict:
    return {"n_facts": n, "K_top": 8, "retrieval": {"exact": {"recall@K": 0.9, "top1": 0.7, "index": "exact"},
                                                   "hnsw": {"recall@K": 0.85, "top1": 0.6, "index": "HNSW"}},
            "index_recall": {"hnsw": {"recall@1": 0.95, "recall@8": 0.9, "build_s": 3.0}}}


def test_size_table_round_trips_sorted_and_plots(tmp_path):
    sizes, searched = [_size(10_000, 0.5), _size(2_614, 0.7)], [_searched(100_000), _searched(2_614)]
    paths = write_size_table(sizes, tmp_path, keys_only=searched)
    back = read_size_table(paths["json"])
    assert [s["n_facts"] for s in back["sizes"]] == [2_614, 10_000] and back["sizes"][1] == sizes[0]
    assert [s["n_facts"] for s in back["keys_only"]] == [2_614, 100_000]
    md = paths["md"].read_text(encoding="utf-8")
    assert md == markdown_size_table(back["sizes"], back["keys_only"])
    assert "| 10,000 | kblampp | HNSW ip | 50.0 [48.0, 52.0] | 60.0 | 80.0 | 90.0 | 99.0 | 98.0 |" in md
    assert "| 2,614 | 2,514 | 0 / 0 | 10 (1 + 2 + 3 + 4) | 2 MB (1 MB) | 4 MB / 8 MB |" in md
    assert "| 100,000 | HNSW | 85.0 | 60.0 | 95.0 | 90.0 | 3 s |" in md
    png = plot_size(back["sizes"], tmp_path / "plot.png", keys_only=back["keys_only"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*tmp*"))


def test_read_size_table_names_the_bad_field(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"version": 0}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"t.json: version: expected 1 \(a kb_size table\), got 0"):
        read_size_table(path)
    path.write_text(json.dumps({"version": 1, "sizes": [{"n_facts": 3, "rows": {}}]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"t.json: sizes\[0\].build: missing"):
        read_size_table(path)


def test_size_plan_sorts_and_refuses_sizes_below_the_base():
    assert size_plan(2_614, [100_000, 2_614, 10_000, 10_000]) == [2_614, 10_000, 100_000]
    with pytest.raises(ValueError, match="sizes: 1,000 is below the base KB's 2,614 facts"):
        size_plan(2_614, [1_000])


def test_distractors_never_draw_a_person_an_initials_question_would_also_name(base):
    unguarded = generate_world(2, 4, set(), SMALL)
    person = next(f["head"]["name"] for f in unguarded if f["head"].get("type") == "PERSON")
    first, surname = person.split()
    twin = f"{first[0]}oxley {surname}"  # another first name with the same initial
    assert initials_of(twin) == initials_of(person) and twin != person
    planted = copy.deepcopy(base)
    head = next(f for f in planted if f["head"].get("type") == "PERSON")["head"]
    old = head["name"]
    for f in planted:  # the base KB's person is now the twin, everywhere it occurs
        for part in ("head", "tail"):
            if f[part]["name"] == old:
                f[part]["name"] = twin
    clash = collisions(planted, unguarded)
    assert clash.names >= 1 and person in clash.examples  # "F. Surname" would name both
    guarded = distractor_facts(planted, len(unguarded), seed=4, sizes=SMALL, progress=False)
    drawn = {f[p]["name"] for f in guarded for p in ("head", "tail") if f[p].get("type") == "PERSON"}
    assert initials_of(twin) not in {initials_of(n) for n in drawn}
    assert collisions(planted, guarded).names == 0



def _bench():
    """bench/bench_kb_size.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_kb_size.py"
    spec = importlib.util.spec_from_file_location("bench_kb_size", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_a_size_build_is_reused_only_for_the_same_encoder_and_distractors(base):
    bench = _bench()
    store = SimpleNamespace(manifest={"source": {"sha256": "f" * 64}, "kv_encoder": {"sha256": "e" * 64}})
    extra = distractor_facts(base, 50, seed=4, sizes=SMALL, progress=False)
    built = bench.build_identity(store, extra, 4)
    assert bench.stale_reason(built, bench.build_identity(store, copy.deepcopy(extra), 4)) is None
    retrained = SimpleNamespace(manifest={"source": {"sha256": "f" * 64}, "kv_encoder": {"sha256": "d" * 64}})
    assert bench.stale_reason(built, bench.build_identity(retrained, extra, 4)) == "kv_encoder_sha256 changed"
    redrawn = copy.deepcopy(extra)
    redrawn[7]["head"]["name"] = "Someone Else"  # what a change of the world generator does under one seed
    assert bench.stale_reason(built, bench.build_identity(store, redrawn, 4)) == "distractors_sha256 changed"
    assert bench.stale_reason(None, built) == "no identity recorded (built by an older version)"
    # a retrained encoder alone re-encodes the kept raw embeddings; other changes rebuild the store
    assert bench.only_encoder_changed(built, bench.build_identity(retrained, extra, 4))
    assert not bench.only_encoder_changed(built, bench.build_identity(retrained, redrawn, 4))
    assert not bench.only_encoder_changed(built, built) and not bench.only_encoder_changed(None, built)


def test_the_size_benchmark_runs_the_retrievals_asked_and_rejects_others():
    bench = _bench()
    args = SimpleNamespace(retrievals=None, config_method="ivfflat", before=None)
    assert bench.wanted_retrievals(args) == ["exact", "hnsw", "ivfflat"]
    assert bench.ann_runs(args) == ["hnsw", "ivfflat"]
    assert bench.ann_runs(SimpleNamespace(retrievals="exact", config_method="hnsw", before=None)) == []
    assert bench.ann_runs(SimpleNamespace(retrievals="exact,ivfflat", config_method="hnsw", before=None)) == ["ivfflat"]
    # --before compares an HNSW against the config's, so the HNSW is built whatever was asked
    assert bench.ann_runs(SimpleNamespace(retrievals="ivfpq,exact", config_method="hnsw", before="ef_search=64")
                          ) == ["hnsw", "ivfpq"]
    with pytest.raises(SystemExit, match="--retrievals: 'annoy' is not one of exact, hnsw, ivfflat, ivfpq"):
        bench.wanted_retrievals(SimpleNamespace(retrievals="exact,annoy", config_method="hnsw"))
    assert bench.describe_index({"nprobe": 128, "mips_norm": 7.5}, "ip", "ivfflat") == "IVF-flat ip nprobe=128"


def test_a_retrained_encoder_re_encodes_a_size_store_from_its_raw_embeddings(tmp_path):
    import torch

    from kblampp.config import load_config
    from kblampp.kb_store import KBValueStore, build_store_index, encode_file
    from kblampp.kv_encoder import KVEncoder, save_kv_encoder
    from kblampp.synth.jsonl import write_jsonl
    from kblampp.training.toy import HashEmbedder, toy_facts

    bench, emb = _bench(), HashEmbedder(32)
    facts = toy_facts(8)
    write_jsonl(tmp_path / "base.jsonl", facts[:18])
    write_jsonl(tmp_path / "n24" / "facts.jsonl", facts)  # the base's 18 facts first, then 6 "distractors"
    for src, store in ((tmp_path / "base.jsonl", tmp_path / "base"), (tmp_path / "n24" / "facts.jsonl",
                                                                       tmp_path / "n24" / "store")):
        encode_file(src, store, emb.name, 16, 16, d_tau=8, embedder=emb, hidden=32, progress=False)
    build_store_index(tmp_path / "n24" / "store", "flat", "ip")
    save_kv_encoder(KVEncoder(32, 16, 16, 8, 32, seed=5), tmp_path / "retrained.safetensors")
    encode_file(tmp_path / "base.jsonl", tmp_path / "base", emb.name, 16, 16, d_tau=8,
                kv_encoder=tmp_path / "retrained.safetensors", progress=False)  # what Stage A's re-encode does
    record = {"identity": {"kv_encoder_sha256": "old"}, "index": {"method": "hnsw"}, "rows": {"lookup": {}},
              "ann_indexes": {"ivfflat": {}}, "build": {"embed_s": 9.0}, "n_facts": 24}
    args = SimpleNamespace(base_store=str(tmp_path / "base"))
    out = bench.reencode_size(load_config(None, ["d_k=16", "d_v=16", "d_tau=8"]), args, tmp_path / "n24", record,
                              {"kv_encoder_sha256": "new"})
    store = KBValueStore.load(tmp_path / "n24" / "store")
    with torch.no_grad():
        want = KVEncoder(32, 16, 16, 8, 32, seed=5).encode_keys(torch.from_numpy(store.raw("e_h").copy()),
                                                                 torch.from_numpy(store.raw("e_r").copy()))
    assert torch.allclose(store.keys_tensor(), want, atol=1e-6)
    assert out["base_key_max_diff"] <= 1e-6 and out["identity"] == {"kv_encoder_sha256": "new"}
    assert "index" not in out and "rows" not in out and "ann_indexes" not in out  # measured on the old keys
    assert out["build"]["embed_s"] == 9.0 and out["build"]["reencode_s"] > 0
    assert not list((tmp_path / "n24" / "store").glob("index_*"))  # the old keys' index is gone


def test_a_re_encode_keeps_only_the_rows_that_never_read_keys(tmp_path):
    bench = _bench()
    rows = {"lookup": {"em": 0.6}, "kblampp_exact": {"em": 0.7}, "kblampp_ivfflat": {"em": 0.7}}
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"rows": rows, "n_facts": 9}))
    bench.keep_keyless_rows(tmp_path, same_facts=True)
    assert not result.exists()  # result.json is always a whole result (the table reads every one)
    assert json.loads((tmp_path / bench.KEPT_ROWS).read_text()) == {"lookup": {"em": 0.6}}
    result.write_text(json.dumps({"rows": rows, "n_facts": 9}))
    (tmp_path / bench.KEPT_ROWS).unlink()
    bench.keep_keyless_rows(tmp_path, same_facts=False)  # other facts: nothing measured before holds
    assert not result.exists() and not (tmp_path / bench.KEPT_ROWS).exists()
    bench.keep_keyless_rows(tmp_path, same_facts=True)  # nothing to keep: no error


def test_last_token_queries_equal_the_query_of_a_request_retrieving_everywhere():
    """Only the last token retrieves: the query (which reads the layer's input, untouched by the KB)
    is the one an every-position request captures at that token, for left-padded rows of any length."""
    import torch

    from kblampp.evaluation.kb_size import last_token_queries
    from kblampp.inference.generate import tokenize_left
    from kblampp.kb_context import KBContext
    from kblampp.retrieval import random_tensor_kb
    from test_injection import D_CTX, D_K, D_V, make

    class Tok:  # one id per character, enough for tokenize_left
        pad_token_id, eos_token_id = 0, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + ord(c) % 200 for c in text]}

    model = make("llama")
    source = random_tensor_kb(64, D_K, D_V, D_CTX)
    prompts = ["short one", "a much longer prompt than that", "mid length"]
    e_q = torch.randn(3, D_CTX, generator=torch.Generator().manual_seed(4))
    got = last_token_queries(model, Tok(), prompts, e_q, source, batch_size=2, progress=False)
    batch = tokenize_left(Tok(), prompts, "cpu")
    ctx = KBContext(source=source, e_q=e_q, capture_query=True)
    with torch.no_grad(), model.kb_request(ctx):
        model(**batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp_min(0), use_cache=False)
    want = ctx.queries[1][0][:, -1].numpy()
    assert got.shape == (3, D_K) and np.allclose(got, want, rtol=0, atol=1e-5)
