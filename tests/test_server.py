"""infer_server over real HTTP: a uvicorn subprocess on 127.0.0.1 with a tiny random Llama, a tiny
random BERT embedder and a 6-fact store (K_top 8 >= N, so every live fact is a candidate and the
evidence shows exactly the live facts): evidence chains, live edits, auth, every kind of bad request.

The helpers here (`make_world`, `ServerProcess`) are also used by test_server_durability.py.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from kblampp.timewin import days_to_iso, window_days

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tk-5f0c93e1a7d24b68"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def fact(head: str, rel: str, tail: str, start: str | None = None, end: str | None = None, hid: str = "E") -> dict:
    return {"head": {"id": f"{hid}-{head}", "name": head, "type": "PERSON"},
            "relation": {"id": f"R-{rel}", "name": rel}, "tail": {"id": None, "name": tail},
            "context": {"source": "test", "sent_span": f"{head} {rel} {tail}."},
            "time_window": {"start": start, "end": end, "source": "test"}}


FACTS = [fact("Ada Byron", "born in", "London", "1815"), fact("Ada Byron", "employer", "Analytical Society", "1833", "1843"),
         fact("Alan Turing", "born in", "Maida Vale", "1912"), fact("Alan Turing", "employer", "NPL", "1945", "1947"),
         fact("Alan Turing", "employer", "Manchester", "1948", "1954"), fact("Grace Hopper", "born in", "New York", "1906")]


def make_world(folder: Path, facts: list[dict] = FACTS) -> dict:
    """Tiny backbone + embedder folders, a store with a flat index, a KB checkpoint with a copy gate,
    and a YAML config naming them. Returns the paths."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_backbone import save_tiny
    from test_embedding import make_tiny_embedder_dir

    from kblampp.answer_head import KBCopyGate
    from kblampp.config import load_config
    from kblampp.embedding import load_embedder
    from kblampp.kb_params import save_kb_checkpoint
    from kblampp.kb_store import KBValueStore, embed_facts, write_store
    from kblampp.knowledge_index import KnowledgeIndex
    from kblampp.kv_encoder import KVEncoder
    from kblampp.model import KBLaMPP
    from kblampp.schema import fact_from_dict
    from tiny_models import tiny_llama

    folder.mkdir(parents=True, exist_ok=True)
    backbone_dir = save_tiny(folder, "llama")
    emb_dir = make_tiny_embedder_dir(folder / "embedder")
    embedder = load_embedder(str(emb_dir))
    parsed = [fact_from_dict(copy.deepcopy(f)) for f in facts]
    store_dir = folder / "store"
    encoder = KVEncoder(d_ctx=embedder.dim, d_k=32, d_v=32, d_tau=8, hidden=32, seed=0)
    write_store(store_dir, parsed, embed_facts(embedder, parsed, progress=False), encoder, embedder.name,
                progress=False)
    store = KBValueStore.load(store_dir)
    KnowledgeIndex.build(store.keys_tensor().numpy(), "flat", "ip", store_id=store.store_id,
                         n=store.n).save(store.index_dir("flat"))
    cfg_data = {"backbone": str(backbone_dir), "embedding_model": str(emb_dir), "d_k": 32, "d_v": 32, "d_tau": 8,
                "inject_layers": [1], "K_top": 8, "store_dir": str(store_dir), "index": {"method": "flat"},
                "max_new_tokens": 4}
    cfg_path = folder / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_data), encoding="utf-8")
    model = KBLaMPP(tiny_llama(), load_config(cfg_path), d_ctx=embedder.dim)
    model.register_kb_module("kb_copy_gate", KBCopyGate(model.d_model))
    ckpt = folder / "kb.safetensors"
    save_kb_checkpoint(model, load_config(cfg_path), ckpt)
    return {"config": cfg_path, "checkpoint": ckpt, "store": store_dir, "wal": folder / "store.wal.jsonl"}


def clone_world(base: dict, folder: Path) -> dict:
    """A fresh copy of `base`'s store (and a config naming it), sharing its model files."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base["store"], folder / "store")
    data = yaml.safe_load(base["config"].read_text(encoding="utf-8"))
    data["store_dir"] = str(folder / "store")
    (folder / "config.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return {"config": folder / "config.yaml", "checkpoint": base["checkpoint"], "store": folder / "store",
            "wal": folder / "store.wal.jsonl"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python infer/infer_server.py` in a subprocess, up until /health answers (bounded wait)."""

    def __init__(self, world: dict, token: str | None = TOKEN, extra: list[str] = (), wait_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "KBLAMPP_SERVER_TOKEN"}
        if token is not None:
            env["KBLAMPP_SERVER_TOKEN"] = token
        env["PYTHONPATH"] = str(ROOT)
        cmd = [sys.executable, str(ROOT / "infer/infer_server.py"), "--config", str(world["config"]),
               "--checkpoint", str(world["checkpoint"]), "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=60.0)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stdout.read().decode()}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError("server did not come up in time")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("world"))
    srv = ServerProcess(world)
    yield srv
    srv.kill(signal.SIGTERM)


def ask(srv: ServerProcess, question: str, **kw) -> dict:
    r = srv.client.post("/v1/answer", json={"question": question, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def evidence_set(body: dict) -> set[int]:
    return {e["index"] for e in body["evidence"]}


# ---------------------------------------------------------------------------------------------- answers
def test_answer_has_well_formed_evidence_chain(server):
    body = ask(server, "Where was Ada Byron born?", top_k_evidence=8)
    assert isinstance(body["answer"], str)
    assert evidence_set(body) == set(range(len(FACTS)))  # K_top 8 >= N: every live fact is a candidate
    alphas = [e["alpha"] for e in body["evidence"]]
    assert alphas == sorted(alphas, reverse=True)
    assert abs(sum(alphas) - 1.0) < 1e-5
    for e in body["evidence"]:
        assert set(e) == {"index", "head", "relation", "tail", "context", "time_window", "alpha", "beta", "layer",
                          "satisfies_time"}
        assert e["satisfies_time"] is None  # the question states no time
        src = FACTS[e["index"]]
        assert (e["head"], e["relation"], e["tail"]) == (src["head"]["name"], src["relation"]["name"], src["tail"]["name"])
        assert e["time_window"] == [src["time_window"]["start"], src["time_window"]["end"]]
        assert e["layer"] == 1 and 0.0 <= e["beta"] <= 1.0
    assert set(body["timings"]) == {"queue_ms", "embed_ms", "generate_ms", "total_ms", "batch_size", "batch_id"}
    assert body["timings"]["batch_size"] == 1 and body["kb_seq"] == 0  # alone; no edit yet
    assert body["question_time"] is None
    top2 = ask(server, "Where was Ada Byron born?", top_k_evidence=2)
    assert [e["index"] for e in top2["evidence"]] == [e["index"] for e in body["evidence"][:2]]


def test_question_time_parsed_or_given(server):
    parsed = ask(server, "Who employed Alan Turing in 1946?")
    assert parsed["question_time"] == {"kind": "at", "start": "1946", "end": "1946", "anchor": None, "source": "parsed"}
    given = ask(server, "Who employed Alan Turing?", question_time={"start": "1950", "end": None})
    assert given["question_time"] == {"kind": "after", "start": "1950", "end": None, "anchor": None, "source": "request"}
    for body in (parsed, given):  # each fact says whether its window fits the constraint
        for e in body["evidence"]:
            start, end = e["time_window"]
            lo, hi = window_days(start, end)
            q_lo, q_hi = window_days(body["question_time"]["start"], body["question_time"]["end"])
            assert e["satisfies_time"] is (lo <= q_hi and hi >= q_lo)
    typed = ask(server, "Who employed Alan Turing?", question_time={"kind": "last"})
    assert typed["question_time"]["kind"] == "last"
    now = ask(server, "Who employs Alan Turing now?", reference_date="1950-06-01")
    assert now["question_time"] == {"kind": "current", "start": "1950-06-01", "end": "1950-06-01", "anchor": None,
                                    "source": "parsed"}
    # the time score enters alpha: the same question at another time weighs the facts differently
    assert [e["alpha"] for e in parsed["evidence"]] != [e["alpha"] for e in given["evidence"]]


def test_relative_question_dated_by_its_anchor_which_is_never_a_candidate(server):
    body = ask(server, "When Alan Turing worked for NPL, who employed Ada Byron?", top_k_evidence=8)
    qt = body["question_time"]
    assert qt["kind"] == "relative" and qt["anchor"] == "Alan Turing worked for NPL"
    anchor = FACTS[qt["anchor_fact"]]
    lo, hi = window_days(anchor["time_window"]["start"], anchor["time_window"]["end"])
    assert qt["resolved"] == {"start": days_to_iso(lo), "end": days_to_iso(hi)}  # dated by the anchor's window
    assert qt["query_text"] == "Who employed Ada Byron?"  # the clause only dates it
    assert qt["anchor_fact"] not in evidence_set(body)  # the answer is another fact


def test_same_question_same_answer_and_alpha(server):
    a, b = ask(server, "Where was Grace Hopper born?"), ask(server, "Where was Grace Hopper born?")
    assert a["answer"] == b["answer"] and a["evidence"] == b["evidence"]


def test_chat_completions_with_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="kblampp", max_tokens=3, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Where was Alan Turing born?"}])
    direct = ask(server, "Where was Alan Turing born?", max_new_tokens=3)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == direct["answer"]
    raw = server.client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Where was Alan Turing born?"}]}], "max_tokens": 3}).json()
    assert raw["kblampp"]["evidence"] == direct["evidence"][:5]


# ---------------------------------------------------------------------------------------------- edits
def test_add_get_replace_delete_change_the_next_answer(server):
    q = "Where was Edsger Dijkstra born?"
    before = ask(server, q, top_k_evidence=8)
    new = fact("Edsger Dijkstra", "born in", "Rotterdam", "1930")
    r = server.client.post("/v1/facts", json=new, headers=AUTH)
    assert r.status_code == 201, r.text
    (idx,) = r.json()["indices"]
    assert server.client.get(f"/v1/facts/{idx}").json()["fact"] == new
    after = ask(server, q, top_k_evidence=8)
    assert idx not in evidence_set(before) and idx in evidence_set(after)
    entry = next(e for e in after["evidence"] if e["index"] == idx)
    assert (entry["head"], entry["tail"], entry["time_window"]) == ("Edsger Dijkstra", "Rotterdam", ["1930", None])

    changed = fact("Edsger Dijkstra", "born in", "Schiedam", "1930-05-11")
    assert server.client.put(f"/v1/facts/{idx}", json=changed, headers=AUTH).status_code == 200
    replaced = next(e for e in ask(server, q, top_k_evidence=8)["evidence"] if e["index"] == idx)
    assert (replaced["tail"], replaced["time_window"]) == ("Schiedam", ["1930-05-11", None])
    assert replaced["alpha"] != entry["alpha"]

    assert server.client.delete(f"/v1/facts/{idx}", headers=AUTH).json() == {"index": idx, "deleted": True,
                                                                               "seq": r.json()["seq"] + 2}
    assert idx not in evidence_set(ask(server, q, top_k_evidence=8))
    gone = server.client.get(f"/v1/facts/{idx}")
    assert gone.status_code == 404 and gone.json()["error"] == f"fact {idx} was deleted"
    assert server.client.put(f"/v1/facts/{idx}", json=changed, headers=AUTH).status_code == 404


def test_add_many_and_stats(server):
    batch = [fact(f"Person {i}", "born in", f"Town {i}", "1900") for i in range(3)]
    before = server.client.get("/v1/stats").json()
    r = server.client.post("/v1/facts", json={"facts": batch}, headers=AUTH)
    assert r.status_code == 201
    ids = r.json()["indices"]
    assert ids == list(range(before["slots"], before["slots"] + 3))
    assert [server.client.get(f"/v1/facts/{i}").json()["fact"]["tail"]["name"] for i in ids] == ["Town 0", "Town 1", "Town 2"]
    after = server.client.get("/v1/stats").json()
    assert after["N"] == before["N"] + 3 and after["index_type"] == "flat"
    assert after["requests_served"]["add"] == before["requests_served"]["add"] + 1
    assert after["uptime_s"] > 0 and after["model"].endswith("tiny-llama")
    for i in ids:
        assert server.client.delete(f"/v1/facts/{i}", headers=AUTH).status_code == 200


# ---------------------------------------------------------------------------------------------- auth
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-xxxxxxx"},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}])
def test_changes_need_the_token(server, headers):
    stats = server.client.get("/v1/stats").json()
    calls = [("POST", "/v1/facts", fact("X", "r", "Y")), ("PUT", "/v1/facts/0", fact("X", "r", "Y")),
             ("DELETE", "/v1/facts/0", None)]
    for method, path, body in calls:
        r = server.client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (method, r.text)
        assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]
    after = server.client.get("/v1/stats").json()
    assert (after["N"], after["slots"], after["wal_next_seq"]) == (stats["N"], stats["slots"], stats["wal_next_seq"])
    assert server.client.get("/v1/facts/0").json()["fact"] == FACTS[0]


# ---------------------------------------------------------------------------------------------- bad input
BAD_ANSWERS = [
    ({"question": "x" * 2001}, 422, "question is too long"),
    ({"question": "   "}, 422, "question is empty"),
    ({"question": "q?", "max_new_tokens": 65}, 422, "max_new_tokens must be between 1 and 64"),
    ({"question": "q?", "max_new_tokens": 0}, 422, "max_new_tokens must be between 1 and 64"),
    ({"question": "q?", "top_k_evidence": 33}, 422, "top_k_evidence must be between 1 and 32"),
    ({"question": 5}, 422, "body.question: Input should be a valid string"),
    ({"question": "q?", "max_new_tokens": "5"}, 422, "body.max_new_tokens: Input should be a valid integer"),
    ({"question": "q?", "max_new_tokens": 2.5}, 422, "body.max_new_tokens: Input should be a valid integer"),
    ({"question": "q?", "temperature": 0.2}, 422, "body.temperature: Extra inputs are not permitted"),
    ({}, 422, "body.question: Field required"),
    ([], 422, "body: Input should be a valid dictionary"),
    ({"question": "q?", "question_time": {"start": "2020", "end": "2019"}}, 422, "end: window ends (2019) before it starts"),
    ({"question": "q?", "question_time": {"start": "March 2020"}}, 422, "start: unparsable date"),
    ({"question": "q?", "question_time": {"begin": "2020"}}, 422, "body.question_time.begin: Extra inputs are not permitted"),
    ({"question": "q?", "question_time": {"kind": "soon"}}, 422, "kind: 'soon' is not one of at, between"),
    ({"question": "q?", "reference_date": "yesterday"}, 422, "reference_date: unparsable date 'yesterday'"),
]


@pytest.mark.parametrize("body,status,message", BAD_ANSWERS)
def test_bad_answer_requests(server, body, status, message):
    r = server.client.post("/v1/answer", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and isinstance(r.json()["problems"], list)


def test_malformed_json_body_size_and_content_type(server):
    r = server.client.post("/v1/answer", content=b'{"question": "a', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON")
    r = server.client.post("/v1/answer", content=b"question=a", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = server.client.post("/v1/answer", content=b'{"question": "\xff"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]
    big = json.dumps({"question": "a" * 1_100_000}).encode()
    r = server.client.post("/v1/answer", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]

    def chunks():  # no Content-Length: the streamed size is counted
        for _ in range(12):
            yield b" " * 100_000
    r = server.client.post("/v1/facts", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = server.client.post("/v1/facts", content=b"[1,", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400


def test_bad_facts_get_every_problem(server):
    slots = server.client.get("/v1/stats").json()["slots"]
    bad0 = fact("A", "r", "B")
    del bad0["context"]
    bad1 = fact("", "r", "B", "2020", "2019")
    r = server.client.post("/v1/facts", json=[fact("ok", "r", "fine"), bad0, bad1], headers=AUTH)
    assert r.status_code == 422
    assert r.json()["problems"] == ["body:1: context: missing field", "body:2: head.name: empty name",
                                    "body:2: time_window.end: window ends (2019) before it starts (2020)"]
    assert server.client.get("/v1/stats").json()["slots"] == slots  # nothing of the batch was added
    r = server.client.put("/v1/facts/0", json={"head": "A"}, headers=AUTH)
    assert r.status_code == 422 and "body:0: head: expected an object, got str" in r.json()["problems"]
    r = server.client.post("/v1/facts", json=[], headers=AUTH)
    assert r.status_code == 422 and r.json()["error"] == "no facts given"
    r = server.client.post("/v1/facts", json=[fact("a", "r", "b")] * 257, headers=AUTH)
    assert r.status_code == 422 and "too many facts" in r.json()["error"]


def test_unknown_fact_indices(server):
    slots = server.client.get("/v1/stats").json()["slots"]
    for method in ("GET", "DELETE"):
        r = server.client.request(method, f"/v1/facts/{slots + 5}", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"] == f"fact {slots + 5} does not exist (valid indices: 0..{slots - 1})"
    r = server.client.get("/v1/facts/abc")
    assert r.status_code == 422 and r.json()["problems"] == ["path.index: Input should be a valid integer, unable to parse string as an integer"]
    assert server.client.get("/v1/nowhere").status_code == 404


def test_bad_chat_requests(server):
    cases = [({"messages": []}, "messages is empty"),
             ({"messages": [{"role": "system", "content": "hi"}]}, "no user message"),
             ({"messages": [{"role": "user", "content": "q"}], "stream": True}, "stream=true is not supported"),
             ({"messages": [{"role": "user", "content": "q"}], "max_tokens": 1000}, "max_tokens must be between 1 and 64"),
             ({"messages": [{"role": "user", "content": "q"}], "functions": []}, "Extra inputs are not permitted"),
             ({"messages": [{"role": "wizard", "content": "q"}]}, "body.messages.0.role: Input should be")]
    for body, message in cases:
        r = server.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 422 and message in r.json()["error"], (body, r.text)


def test_server_keeps_serving_after_bad_requests(server):
    for _ in range(3):
        server.client.post("/v1/answer", content=b"{", headers={"Content-Type": "application/json"})
    assert server.client.get("/health").json()["status"] == "ok"
    assert ask(server, "Where was Ada Byron born?")["evidence"]


# ---------------------------------------------------------------------------------------------- start-up
def test_refuses_to_start_without_token(tmp_path):
    world = {"config": tmp_path / "defaults.yaml", "checkpoint": tmp_path / "none.safetensors"}
    world["config"].write_text("{}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "KBLAMPP_SERVER_TOKEN"}
    out = subprocess.run([sys.executable, str(ROOT / "infer/infer_server.py"), "--config", str(world["config"]),
                          "--checkpoint", str(world["checkpoint"])], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "fact mutations are enabled but no token is set" in out.stderr


def test_bounded_load_script_zero_5xx_zero_lost_edits(server, tmp_path):
    env = {**os.environ, "KBLAMPP_SERVER_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    out_json = tmp_path / "load.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench/load_server.py"), "--url", server.url, "--clients", "4",
                          "--duration", "3", "--edit_fraction", "0.5", "--max_new_tokens", "2", "--json", str(out_json)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(out_json.read_text())
    assert summary["5xx"] == 0 and summary["4xx"] == 0 and summary["lost_edits"] == 0
    assert summary["transport_errors"] == 0 and summary["requests"] > 0
    assert summary["checked_facts"] == summary.get("add_count", 0)
    assert {"all_p50_ms", "all_p99_ms", "throughput_rps"} <= set(summary)


def test_load_script_refuses_non_loopback():
    from kblampp.serving.loadgen import check_loopback

    check_loopback("http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="loopback only"):
        check_loopback("http://10.0.0.5:8000")
