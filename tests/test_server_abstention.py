"""infer_server with an abstention decision (tiny model world of test_server.py, real HTTP): a question
about an absent entity returns `answer: null, abstained: true` with near misses and their reasons, the
chat route says so in words, and `abstain: false` turns the decision off. The decision is forced with
the config threshold (0.0 = always abstain); the trained path is tested in test_abstention.py."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_server import FACTS, ServerProcess, make_world  # noqa: E402


def add_abstention(world: dict, threshold: float) -> dict:
    """Re-save the world's checkpoint with a `kb_abstain` head and set abstention.threshold in its config."""
    from kblampp.abstention import KBAbstainHead
    from kblampp.answer_head import KBCopyGate
    from kblampp.config import load_config
    from kblampp.kb_params import load_kb_checkpoint, read_kb_checkpoint, save_kb_checkpoint
    from kblampp.model import KBLaMPP
    from tiny_models import tiny_llama

    data = yaml.safe_load(world["config"].read_text(encoding="utf-8"))
    data["abstention"] = {"threshold": threshold}
    world["config"].write_text(yaml.safe_dump(data), encoding="utf-8")
    cfg = load_config(world["config"])
    tensors, _ = read_kb_checkpoint(world["checkpoint"])
    model = KBLaMPP(tiny_llama(), cfg, d_ctx=int(tensors["kb_layers.1.kb_query_ctx.weight"].shape[1]))
    model.register_kb_module("kb_copy_gate", KBCopyGate(model.d_model))
    load_kb_checkpoint(model, world["checkpoint"])
    model.register_kb_module("kb_abstain", KBAbstainHead(hidden=4))
    save_kb_checkpoint(model, cfg, world["checkpoint"])
    return world


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    world = add_abstention(make_world(tmp_path_factory.mktemp("abstain_world")), threshold=0.0)
    srv = ServerProcess(world)
    yield srv
    srv.kill(signal.SIGTERM)


def test_absent_entity_abstains_with_near_misses(server):
    r = server.client.post("/v1/answer", json={"question": "Where was Marie Curie born?", "top_k_evidence": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] is None and body["abstained"] is True and 0.0 < body["p_unanswerable"] < 1.0
    assert len(body["evidence"]) == 3 and body["abstain_reason"] == "entity_missing"
    misses = body["near_misses"]
    assert [m["index"] for m in misses] == [e["index"] for e in body["evidence"]]
    for m in misses:  # no fact is about Marie Curie: every near miss is another entity's fact
        assert m["reason"] == "entity_missing" and m["why"] == "entity not found in the KB"
        src = FACTS[m["index"]]
        assert (m["head"], m["relation"], m["tail"]) == (src["head"]["name"], src["relation"]["name"],
                                                         src["tail"]["name"])


def test_time_outside_is_explained(server):
    body = server.client.post("/v1/answer", json={"question": "Who employed Alan Turing in 1930?",
                                                  "top_k_evidence": 8}).json()
    assert body["abstained"] is True and body["abstain_reason"] == "time_outside"
    reasons = {m["index"]: m["reason"] for m in body["near_misses"]}
    assert reasons[3] == reasons[4] == "time_outside"  # Turing's employers: 1945-1947, 1948-1954
    assert reasons[0] == "entity_missing"  # Ada Byron's birth


def test_abstention_off_flag_answers(server):
    body = server.client.post("/v1/answer", json={"question": "Where was Marie Curie born?", "abstain": False}).json()
    assert isinstance(body["answer"], str) and body["abstained"] is False
    assert "near_misses" not in body and "p_unanswerable" not in body
    bad = server.client.post("/v1/answer", json={"question": "Where was Marie Curie born?", "abstain": "no"})
    assert bad.status_code == 422 and "abstain" in bad.text


def test_chat_route_says_so_in_words(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="kblampp", max_tokens=3, messages=[
        {"role": "user", "content": "Where was Marie Curie born?"}])
    text = out.choices[0].message.content
    assert text.startswith("The knowledge base has no answer to this question (entity not found in the KB).")
    assert "Nearest fact:" in text
    raw = server.client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": "Where was Marie Curie born?"}], "abstain": False}).json()
    assert raw["kblampp"]["abstained"] is False and raw["kblampp"]["near_misses"] == []
    assert raw["choices"][0]["message"]["content"] != text
