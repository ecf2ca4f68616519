"""Store safety and hostile input over real HTTP (issue 15): one writer per store (a second server and a
read-only one never touch the write-ahead log; kill -9 loses no acknowledged edit), 4xx JSON for every
malformed body without tracebacks, Host header allow-list, token strength, duplicates, the audit trail.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from test_server import AUTH, FACTS, ROOT, TOKEN, ServerProcess, clone_world, fact, make_world


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("base"))


def _stop(srv: ServerProcess, sig: int = signal.SIGTERM) -> str:
    """Stop the server and return everything it printed."""
    srv.client.close()
    if srv.proc.poll() is None:
        srv.proc.send_signal(sig)
        srv.proc.wait(timeout=60)
    if srv.proc.stdout.closed:
        return ""
    out = srv.proc.stdout.read().decode("utf-8", "replace")
    srv.proc.stdout.close()
    return out


def _same_command(world: dict, port: int, extra: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "KBLAMPP_SERVER_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "infer/infer_server.py"), "--config", str(world["config"]),
                           "--checkpoint", str(world["checkpoint"]), "--port", str(port), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _wal_state(world: dict) -> tuple[int, bytes]:
    return world["wal"].stat().st_ino, world["wal"].read_bytes()


# ---------------------------------------------------------------------------------------------- one writer
def test_second_server_and_read_only_server_never_touch_the_wal(tmp_path, base):
    """The issue's reproduction: S1 adds a fact; the same command again (S2) must not replay or
    truncate S1's log; a --read_only server must not either; after kill -9 of S1 every acknowledged
    edit is back."""
    world = clone_world(base, tmp_path / "w")
    s1 = ServerProcess(world)
    a = fact("Katherine Johnson", "born in", "White Sulphur Springs", "1918")
    ia = s1.client.post("/v1/facts", json=a, headers=AUTH).json()["indices"][0]
    wal = _wal_state(world)

    s2 = _same_command(world, s1.port)
    assert s2.returncode == 3, s2.stdout + s2.stderr
    assert "the store is in use by another writer" in s2.stderr and str(s1.proc.pid) in s2.stderr
    assert _wal_state(world) == wal

    ro = ServerProcess(world, token=None, extra=["--read_only"])
    assert ro.client.get("/v1/stats").json()["recovered_at_start"]["read_only"] is True
    assert ro.client.get(f"/v1/facts/{ia}").status_code == 404  # not compacted yet: read-only does not replay
    assert ro.client.get("/v1/facts/0").json()["fact"] == FACTS[0]
    r = ro.client.post("/v1/facts", json=fact("X", "r", "Y"), headers=AUTH)
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    _stop(ro)  # a clean shutdown of a read-only server compacts nothing
    assert _wal_state(world) == wal

    b = fact("Dorothy Vaughan", "born in", "Kansas City", "1910")
    c = fact("Mary Jackson", "born in", "Hampton", "1921")
    ib = s1.client.post("/v1/facts", json=b, headers=AUTH).json()["indices"][0]
    ic = s1.client.post("/v1/facts", json=c, headers=AUTH).json()["indices"][0]
    s1.kill(signal.SIGKILL)

    again = ServerProcess(world)
    assert again.client.get("/v1/stats").json()["recovered_at_start"]["replayed"] == 3
    assert [again.client.get(f"/v1/facts/{i}").json()["fact"] for i in (ia, ib, ic)] == [a, b, c]
    _stop(again)
    ro = ServerProcess(world, token=None, extra=["--read_only"])  # compacted at start: now visible
    assert ro.client.get(f"/v1/facts/{ic}").json()["fact"] == c
    _stop(ro)


def test_offline_edit_refused_while_a_server_writes(tmp_path, base):
    from kblampp.embedding import load_embedder
    from kblampp.kb_store import KBValueStore
    from kblampp.store_io import StoreLockedError

    world = clone_world(base, tmp_path / "w")
    srv = ServerProcess(world)
    import yaml

    emb = load_embedder(yaml.safe_load(world["config"].read_text())["embedding_model"])
    store = KBValueStore.load(world["store"], embedder=emb)
    with pytest.raises(StoreLockedError, match=rf"in use by another writer \(pid {srv.proc.pid}\)"):
        store.delete_fact(0)
    _stop(srv, signal.SIGKILL)
    store.delete_fact(0)  # the kernel dropped the dead server's lock
    assert not KBValueStore.load(world["store"]).alive[0]


# ---------------------------------------------------------------------------------------------- hostile input
@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    srv = ServerProcess(clone_world(base, tmp_path_factory.mktemp("srv")))
    yield srv
    _stop(srv)


def _post(srv: ServerProcess, path: str, raw: bytes, auth: bool = False) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(AUTH if auth else {})}
    return srv.client.post(path, content=raw, headers=headers)


MALFORMED = [
    ("/v1/answer", b"[" * 10_000 + b"]" * 10_000, "malformed JSON: nested 10000 deep (limit 32)"),
    ("/v1/answer", b'{"question": "q?", "max_new_tokens": ' + b"9" * 5000 + b"}",
     "malformed JSON: integer with 5000 digits (limit 18)"),
    ("/v1/answer", b'{"question": "q?", "max_new_tokens": NaN}', "malformed JSON: NaN is not a JSON number"),
    ("/v1/answer", b'{"question": "q?", "top_k_evidence": 1e999}', "malformed JSON: number 1e999 is out of range"),
    ("/v1/answer", b'{"question": "where \\ud800?"}', "invalid Unicode in body.question: unpaired surrogate U+D800"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\udfff"}]}',
     "invalid Unicode in body.messages.0.content: unpaired surrogate U+DFFF"),
    ("/v1/answer", b'{"question": "q?", "\\ud800": 1}', "invalid Unicode in body: unpaired surrogate U+D800"),
]


@pytest.mark.parametrize("path,raw,message", MALFORMED)
def test_malformed_bodies_get_400_json(server, path, raw, message):
    r = _post(server, path, raw)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"].startswith(message)


def test_surrogate_in_a_fact_name_is_400_for_post_and_put(server):
    body = json.dumps(fact("Ada", "born in", "London")).replace('"Ada"', '"Ada \\ud800"').encode()
    for method, path in (("POST", "/v1/facts"), ("PUT", "/v1/facts/0")):
        r = server.client.request(method, path, content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"].startswith("invalid Unicode in body.head.name"), r.text


def test_host_header_allow_list(server):
    for host in ("evil.example", "evil.example:80", "127.0.0.1.nip.io"):
        r = server.client.get("/health", headers={"Host": host})
        assert r.status_code == 400 and "is not allowed" in r.json()["error"], host
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]"):
        assert server.client.get("/health", headers={"Host": host}).status_code == 200


def test_duplicate_policy(server):
    new = fact("Hedy Lamarr", "born in", "Vienna", "1914")
    first = server.client.post("/v1/facts", json=new, headers=AUTH)
    assert first.status_code == 201
    (idx,) = first.json()["indices"]
    again = server.client.post("/v1/facts", json=new, headers=AUTH)
    assert again.status_code == 409 and again.json()["error"] == f"duplicate: this fact equals live fact {idx}"
    r = server.client.put("/v1/facts/0", json=new, headers=AUTH)
    assert r.status_code == 409
    assert server.client.put(f"/v1/facts/{idx}", json=new, headers=AUTH).status_code == 200  # itself: fine
    other = fact("Hedy Lamarr", "born in", "Wien", "1914")
    r = server.client.post("/v1/facts", json=[other, other], headers=AUTH)
    assert r.status_code == 422 and r.json()["problems"] == ["body:1: <item>: duplicate of item 0 in this request"]


def test_fact_limits_over_http(server):
    long_name, nul, rlo, extra = (fact("Ada", "born in", f"London {i}") for i in range(4))
    long_name["head"]["name"] = "x" * 10_000
    nul["head"]["name"] = "Ada\u0000"
    rlo["tail"]["name"] = "\u202enodnoL"
    extra["comment"] = "x"
    extra["head"]["wikidata"] = "Q7259"
    r = server.client.post("/v1/facts", json=[long_name, nul, rlo, extra], headers=AUTH)
    assert r.status_code == 422
    assert r.json()["problems"] == [
        "body:0: head.name: too long (10000 > 512 characters)",
        "body:1: head.name: control character U+0000 at position 3",
        "body:2: tail.name: bidirectional control character U+202E at position 0",
        "body:3: comment: unknown field (allowed: head, relation, tail, context, time_window)",
        "body:3: head.wikidata: unknown field (allowed: id, name, type)"]


def test_audit_line_per_change_without_the_token(tmp_path, base):
    world = clone_world(base, tmp_path / "w")
    srv = ServerProcess(world)
    ids = srv.client.post("/v1/facts", json=[fact("A1", "r", "B"), fact("A2", "r", "B")], headers=AUTH).json()
    assert srv.client.put("/v1/facts/1", json=fact("Ada Byron", "employer", "Babbage"), headers=AUTH).status_code == 200
    assert srv.client.delete("/v1/facts/3", headers=AUTH).status_code == 200
    assert srv.client.delete("/v1/facts/3", headers=AUTH).status_code == 404  # no change, no line
    _stop(srv)  # compaction truncates the WAL, never the audit trail
    text = (world["store"].parent / "store.audit.jsonl").read_text(encoding="utf-8")
    assert TOKEN not in text and "Babbage" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(x["seq"], x["op"], x["indices"]) for x in lines] == [(1, "add", ids["indices"]), (2, "replace", [1]),
                                                                  (3, "delete", [3])]
    for x in lines:
        assert set(x) == {"time", "seq", "op", "indices", "client"}
        assert x["client"].startswith("127.0.0.1:") and x["time"].endswith("Z")


@pytest.mark.parametrize("token,message", [("password", "too short (8 characters"),
                                           ("password12345678", "made of common words, repeats or runs"),
                                           ("aaaaaaaaaaaaaaaaaaaa", "only 1 distinct characters")])
def test_weak_tokens_refused_at_start(tmp_path, token, message):
    env = {**os.environ, "KBLAMPP_SERVER_TOKEN": token}
    cfg = tmp_path / "defaults.yaml"
    cfg.write_text("{}\n", encoding="utf-8")
    out = subprocess.run([sys.executable, str(ROOT / "infer/infer_server.py"), "--config", str(cfg),
                          "--checkpoint", str(tmp_path / "none.safetensors")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_no_traceback_in_the_server_log(server):
    """Last in this module: the shared server answered every hostile body above without a traceback."""
    for path, raw, _ in MALFORMED:
        _post(server, path, raw)
    assert server.client.get("/health").json()["status"] == "ok"
    out = _stop(server)
    assert "Traceback" not in out and "RecursionError" not in out, out[-3000:]
