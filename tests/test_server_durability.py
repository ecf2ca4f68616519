"""Durability: SIGKILL right after acknowledged changes, restart, every change is there and the store
loads clean; torn WAL tails; a crash in the middle of compaction (replay is idempotent)."""
from __future__ import annotations

import signal

import numpy as np
import pytest

from test_server import AUTH, FACTS, ServerProcess, clone_world, fact, make_world


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("base"))

Q = "Where was Alan Turing born?"


def _ask(srv: ServerProcess) -> dict:
    r = srv.client.post("/v1/answer", json={"question": Q, "top_k_evidence": 8, "max_new_tokens": 3})
    assert r.status_code == 200, r.text
    return r.json()


def _check_store_clean(world: dict, expect: dict[int, dict | None]) -> None:
    from kblampp.kb_store import open_kb

    store, index = open_kb(world["store"], "flat")
    assert store.n == len(expect) and index.n_live == sum(v is not None for v in expect.values())
    for i, want in expect.items():
        assert bool(store.alive[i]) is (want is not None)
        if want is not None:
            assert store.fact(i) == want
    assert world["wal"].read_bytes() == b""


def test_sigkill_after_acknowledged_changes_loses_nothing(tmp_path, base):
    world = clone_world(base, tmp_path / "w")
    srv = ServerProcess(world)
    added = [fact(f"New {i}", "born in", f"Place {i}", "1950") for i in range(3)]
    ids = srv.client.post("/v1/facts", json=added, headers=AUTH).json()["indices"]
    assert ids == [6, 7, 8]
    one = fact("Alan Turing", "born in", "Paddington", "1912-06-23")
    assert srv.client.put("/v1/facts/2", json=one, headers=AUTH).status_code == 200
    assert srv.client.delete("/v1/facts/4", headers=AUTH).status_code == 200
    last = fact("New 1", "born in", "Elsewhere", "1951")
    assert srv.client.put("/v1/facts/7", json=last, headers=AUTH).status_code == 200
    before = _ask(srv)
    srv.kill(signal.SIGKILL)  # no clean shutdown: the WAL holds the changes
    assert len(world["wal"].read_bytes().splitlines()) == 4

    srv = ServerProcess(world)
    stats = srv.client.get("/v1/stats").json()
    assert stats["recovered_at_start"] == {"replayed": 4, "log_entries": 4, "torn_tail_dropped": False,
                                           "applied_seq": 4}
    assert (stats["N"], stats["slots"], stats["wal_next_seq"]) == (8, 9, 5)
    expect = {i: f for i, f in enumerate(FACTS + added)}
    expect[2], expect[4], expect[7] = one, None, last
    for i, want in expect.items():
        r = srv.client.get(f"/v1/facts/{i}")
        assert (r.json()["fact"] if want is not None else r.status_code) == (want if want is not None else 404)
    after = _ask(srv)
    assert after["answer"] == before["answer"]
    assert [(e["index"], e["tail"]) for e in after["evidence"]] == [(e["index"], e["tail"]) for e in before["evidence"]]
    np.testing.assert_allclose([e["alpha"] for e in after["evidence"]], [e["alpha"] for e in before["evidence"]],
                               rtol=0, atol=1e-6)
    _check_store_clean(world, expect)  # start-up folded the WAL into the store and truncated it

    # a clean shutdown after more changes compacts too
    assert srv.client.delete("/v1/facts/6", headers=AUTH).status_code == 200
    srv.kill(signal.SIGTERM)
    expect[6] = None
    _check_store_clean(world, expect)


def test_torn_wal_tail_is_dropped(tmp_path, base):
    world = clone_world(base, tmp_path / "w")
    srv = ServerProcess(world)
    assert srv.client.delete("/v1/facts/1", headers=AUTH).status_code == 200
    srv.kill()
    with open(world["wal"], "ab") as handle:  # a write cut off by the crash, never acknowledged
        handle.write(b'{"seq":2,"op":"delete","index":3,"cr')
    srv = ServerProcess(world)
    rec = srv.client.get("/v1/stats").json()["recovered_at_start"]
    assert rec == {"replayed": 1, "log_entries": 1, "torn_tail_dropped": True, "applied_seq": 1}
    assert srv.client.get("/v1/facts/1").status_code == 404
    assert srv.client.get("/v1/facts/3").json()["fact"] == FACTS[3]
    srv.kill(signal.SIGTERM)


def test_crash_inside_compaction_replays_idempotently(tmp_path, base):
    """Some logged changes reached the store (their commits landed) but the applied seq did not."""
    from kblampp.config import load_config
    from kblampp.serving.build import build_engine
    from kblampp.serving.config import ServerSettings
    from kblampp.serving.kb_log import read_log

    world = clone_world(base, tmp_path / "w")
    settings = ServerSettings(token="tk-5f0c93e1a7d24b68")
    engine = build_engine(load_config(world["config"]), world["checkpoint"], settings, world["wal"])
    engine.add_facts([fact("Kim", "born in", "Seoul", "1970")])
    engine.replace_fact(6, fact("Kim", "born in", "Busan", "1970"))
    engine.add_facts([fact("Lee", "born in", "Incheon", "1971"), fact("Park", "born in", "Daegu", "1972")])
    engine.delete_fact(0)
    entries, _ = read_log(world["wal"])
    from kblampp.kb_store import KBValueStore  # simulate: the first three commits landed, then a crash
    store, index = engine.kb._open_disk()
    store.add_facts(entries[0].facts, index=index)
    store.replace_fact(6, entries[1].facts[0], index=index)
    store.add_facts(entries[2].facts, index=index)
    assert KBValueStore.load(world["store"]).n == 9

    again = build_engine(load_config(world["config"]), world["checkpoint"], settings, world["wal"])
    assert again.recovered == {"replayed": 4, "log_entries": 4, "torn_tail_dropped": False, "applied_seq": 4}
    assert again.kb.num_slots() == 9 and again.kb.num_live() == 8
    assert again.get_fact(6)["fact"]["tail"]["name"] == "Busan"
    assert [again.get_fact(i)["fact"]["tail"]["name"] for i in (7, 8)] == ["Incheon", "Daegu"]
    assert again.kb.get(0) is None
    np.testing.assert_array_equal(again.kb.arrays["K"].view()[1:], engine.kb.arrays["K"].view()[1:])
    _check_store_clean(world, {i: again.kb.get(i) for i in range(9)})
