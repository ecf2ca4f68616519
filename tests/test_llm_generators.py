"""LLM generators against a local fake OpenAI-compatible server (127.0.0.1, started by the test)."""
from __future__ import annotations

import json
import re
import runpy
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kblampp.schema import load_facts, load_qa
from kblampp.synth.jsonl import write_jsonl
from kblampp.synth.llm_client import LLMClient, LLMError, extract_json_array
from kblampp.synth.llm_gen import make_llm_qa_files, make_llm_world_file
from kblampp.synth.prompts import QA_FAMILIES_SUFFIX, QA_PROMPT, QA_WORLD_SUFFIX, WORLD_PROMPT
from kblampp.synth.world import WorldSizes, generate_worlds


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        kind, payload = server.replies.pop(0) if server.replies else ("status", 503)
        if kind == "status":
            data, code = json.dumps({"error": {"message": "server error", "type": "x"}}).encode(), payload
        elif kind == "raw":
            data, code = payload, 200
        else:
            data, code = json.dumps({
                "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": payload}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode(), 200
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_api(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests, server.replies = [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("KBLAMPP_TEST_KEY", "test-key")
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _client(url, log, retries=3):
    return LLMClient(url, "fake-model", api_key_env="KBLAMPP_TEST_KEY", temperature=0.0, timeout=10,
                     max_retries=retries, log=log.append)


def _fact(head, tail, sentence, start=None, end=None, hid="E001", tid="E002"):
    return {"head": {"id": hid, "name": head, "type": "ORG"}, "relation": {"id": "R001", "name": "chief executive officer"},
            "tail": {"id": tid, "name": tail, "type": "PERSON"},
            "context": {"sent_span": sentence}, "time_window": {"start": start, "end": end}}


def test_extract_json_array():
    assert extract_json_array('Here you go:\n```json\n[{"a": 1}]\n```\nBye') == [{"a": 1}]
    assert extract_json_array('[1, 2]') == [1, 2]
    for text, message in [("", "empty reply"), ("no json", "no JSON array in the reply"),
                          ("[1, 2", "no JSON array in the reply"),
                          ("[1, }]", "reply is not valid JSON (Expecting value at char 4)")]:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            extract_json_array(text)


def test_world_generator_validates_retries_and_keeps_worlds_disjoint(fake_api, tmp_path):
    server, url = fake_api
    good = _fact(" BrightSky Robotics ", "Alice Zhang", "Alice Zhang became the CEO of BrightSky Robotics on March 2, 2019.",
                 "2019-03-02")
    blank = _fact("", "Bob", "Bob ran it.")
    unmentioned = _fact("Acme", "Carol Diaz", "Acme hired a new chief.", hid="E003", tid="E004")
    inverted = _fact("Acme", "Dan Wu", "Dan Wu led Acme from 2020 to 2019.", "2020", "2019", hid="E003", tid="E005")
    clash = _fact("Nova Labs", "Alice Zhang", "Alice Zhang led Nova Labs.", hid="E001", tid="E009")
    fresh = _fact("Nova Labs", "Erin Moss", "Erin Moss led Nova Labs since 2001.", "2001", hid="E001", tid="E002")
    server.replies += [
        ("status", 500),                                   # transport error: retried
        ("text", "I cannot produce JSON today."),          # no array: retried
        ("raw", b"{not json"),                             # malformed HTTP body: retried
        ("text", "```json\n" + json.dumps([good, blank, unmentioned, inverted, 5, good]) + "\n```"),
        ("text", json.dumps([clash, fresh])),
    ]
    log: list[str] = []
    report = make_llm_world_file(_client(url, log), tmp_path / "w.jsonl", num_worlds=2)
    facts = load_facts(tmp_path / "w.jsonl")
    assert [(f.head_name, f.tail_name, f.head_id, f.raw["context"]["disamb"]["world"]) for f in facts] == [
        ("BrightSky Robotics", "Alice Zhang", "W00E001", "world_00"), ("Nova Labs", "Erin Moss", "W01E001", "world_01")]
    assert facts[0].raw["context"]["source"] == "llm_synth" and facts[0].raw["time_window"]["source"] == "text_infer"
    assert report.counts == {"facts": 2} and report.details["rejected items"] == 6
    rejected = [m for m in log if ": rejected " in m]
    assert rejected == [
        "world_00: rejected item 1: head.name: empty name",
        "world_00: rejected item 2: context.sent_span: does not mention the tail name 'Carol Diaz'",
        "world_00: rejected item 3: time_window.end: window ends (2019) before it starts (2020)",
        "world_00: rejected item 4: <item>: expected a JSON object, got int",
        "world_00: rejected item 5: <item>: duplicate of an earlier fact",
        "world_01: rejected item 0: tail.name: entity 'Alice Zhang' already used in world_00",
    ]
    assert [m.split(": ", 2)[1] for m in log if "unusable reply" in m] == ["attempt 1", "attempt 2", "attempt 3"]
    assert len(server.requests) == 5
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer test-key"
    assert first["body"]["model"] == "fake-model"
    assert first["body"]["messages"] == [{"role": "user", "content": WORLD_PROMPT}]
    assert WORLD_PROMPT.startswith("You are a data generator for a knowledge-augmented language model.")
    assert WORLD_PROMPT.endswith("- A pure JSON array of 5-tuples (no extra commentary).")


def test_retries_are_bounded(fake_api, tmp_path):
    server, url = fake_api
    server.replies += [("text", "nope")] * 10
    log: list[str] = []
    with pytest.raises(LLMError, match=r"^world_00: no usable reply after 3 attempts$"):
        make_llm_world_file(_client(url, log, retries=2), tmp_path / "w.jsonl", num_worlds=1)
    assert len(server.requests) == 3 and not (tmp_path / "w.jsonl").exists()
    server.replies[:] = [("text", json.dumps([_fact("", "B", "B.")]))] * 3  # parses, but nothing valid
    with pytest.raises(LLMError, match=r"^world_00: no usable reply after 1 attempts$"):
        make_llm_world_file(_client(url, log, retries=0), tmp_path / "w.jsonl", num_worlds=1)
    assert log[-1] == "world_00: attempt 1: no valid item in 1"


def test_missing_api_key(monkeypatch):
    monkeypatch.delenv("KBLAMPP_UNSET_KEY", raising=False)
    with pytest.raises(LLMError, match=r"^environment variable KBLAMPP_UNSET_KEY is not set \(it holds the API key\)$"):
        LLMClient("http://127.0.0.1:9/v1", "m", api_key_env="KBLAMPP_UNSET_KEY")


def test_qa_generator_maps_indices_and_rejects_bad_items(fake_api, tmp_path):
    server, url = fake_api
    world = tmp_path / "world.jsonl"
    write_jsonl(world, generate_worlds(3, 2, WorldSizes(persons=8, organisations=2, cities=3, universities=2,
                                                         clubs=2, events=1, min_ceos=2, max_ceos=2)))
    facts = load_facts(world)
    w1_start = next(i for i, f in enumerate(facts) if f.raw["context"]["disamb"]["world"] == "world_01")
    a0 = facts[1]
    # world_01: a person's employer (local index e) and that company's headquarters (local index h)
    e = next(i - w1_start for i in range(w1_start, len(facts)) if facts[i].relation_name == "employer")
    h = next(i - w1_start for i in range(w1_start, len(facts)) if facts[i].relation_name == "headquarters location"
             and facts[i].head_id == facts[w1_start + e].tail_id)
    person, a1 = facts[w1_start + e].head_name, facts[w1_start + h]
    base = {"dataset": "synth_world_01", "type": "single-hop", "question_time": None}
    located = f"Where is {a0.head_name} located?"
    replies_w0 = [
        {**base, "qid": "Q1", "question": located, "answer": a0.tail_name, "supporting_facts": [1]},
        {**base, "qid": "Q2", "question": located, "answer": a0.tail_name, "supporting_facts": [w1_start + 50]},
        {**base, "qid": "Q3", "question": located, "answer": "Nobody", "supporting_facts": [1]},
        {**base, "qid": "Q4", "question": "", "answer": a0.tail_name, "supporting_facts": [1]},
        {**base, "qid": "Q5", "question": "Where is Nowhere College located?", "answer": a0.tail_name,
         "supporting_facts": [1]},
    ]
    replies_w1 = [{**base, "qid": "Q1", "type": "multi-hop", "answer": a1.tail_name.upper(),
                   "question": f"Where is the company that employs {person} headquartered?", "supporting_facts": [h, e]}]
    server.replies += [("text", json.dumps(replies_w0)), ("text", "garbage"), ("text", json.dumps(replies_w1))]
    log: list[str] = []
    report = make_llm_qa_files(_client(url, log), world, tmp_path / "qa", "llmqa", dev_worlds=1, test_worlds=0)
    train = load_qa(tmp_path / "qa" / "llmqa_train.jsonl", num_facts=len(facts))
    dev = load_qa(tmp_path / "qa" / "llmqa_dev.jsonl", num_facts=len(facts))
    assert report.counts == {"train": 1, "dev": 1, "test": 0}
    assert (train[0].qid, train[0].supporting_facts, train[0].answer) == ("llmqa-llm-world_00-00000", (1,), a0.tail_name)
    assert train[0].raw["answer_fact"] == 1 and train[0].raw["llm_qid"] == "Q1"
    assert (train[0].raw["family"], train[0].raw["time_constraint"]) == ("single_hop", None)
    # local indices [h, e] of world_01 -> global, the answer fact moved last, answer spelled as in the KB
    assert dev[0].supporting_facts == (w1_start + e, w1_start + h) and dev[0].answer == a1.tail_name
    assert dev[0].raw["world"] == "world_01" and dev[0].raw["answer_fact"] == w1_start + h
    assert dev[0].raw["family"] == "multi_hop_2"
    n0 = w1_start
    assert [m for m in log if "rejected" in m] == [
        f"world_00: rejected item 1: supporting_facts: index {w1_start + 50} out of range (0..{n0 - 1})",
        "world_00: rejected item 2: answer: 'Nobody' is the tail of no supporting fact",
        "world_00: rejected item 3: question: empty string",
        f"world_00: rejected item 4: supporting_facts: the question does not name {a0.head_name!r}",
    ]
    prompt = server.requests[0]["body"]["messages"][0]["content"]
    head = QA_PROMPT + QA_FAMILIES_SUFFIX.replace("REFERENCE_DATE", "2024-12-31") + QA_WORLD_SUFFIX
    assert prompt.startswith(head) and "unans_entity" in prompt
    assert json.loads(prompt[len(head):]) == [f.raw for f in facts[:w1_start]]
    assert QA_PROMPT.startswith("You are given a fictional world described by a list of facts in 5-tuple format.")


def test_world_script_with_llm_generator(fake_api, tmp_path, repo_root, capsys):
    server, url = fake_api
    fact = _fact("Acme", "Bo Lin", "Bo Lin has led Acme since 2010.", "2010")
    server.replies.append(("text", json.dumps([fact])))
    main = runpy.run_path(str(repo_root / "offline/gen_synth_world.py"))["main"]
    code = main(["--out", str(tmp_path / "w.jsonl"), "--generator", "llm", "--base_url", url, "--model", "m",
                 "--api_key_env", "KBLAMPP_TEST_KEY", "--num_worlds", "1"])
    assert code == 0 and [f.tail_name for f in load_facts(tmp_path / "w.jsonl")] == ["Bo Lin"]
    assert f"facts: 1 lines -> {tmp_path / 'w.jsonl'}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--generator llm needs --base_url and --model"):
        main(["--out", str(tmp_path / "x.jsonl"), "--generator", "llm"])


def test_llm_qa_validator_checks_every_family(tmp_path):
    from kblampp.synth.llm_gen import qa_validator

    world = tmp_path / "world.jsonl"
    write_jsonl(world, generate_worlds(3, 1, WorldSizes(persons=8, organisations=2, cities=3, universities=2,
                                                         clubs=2, events=1, min_ceos=2, max_ceos=2)))
    facts = load_facts(world)
    ceos = [i for i, f in enumerate(facts) if f.relation_name == "chief executive officer"]
    first, org = min(ceos[:2], key=lambda i: facts[i].tau_min), facts[ceos[0]].head_name
    person = next(f.head_name for f in facts if f.raw["head"]["type"] == "PERSON")
    base = {"dataset": "d", "question_time": None, "supporting_facts": []}
    unans = {**base, "type": "unanswerable", "answer": "unknown", "family": "unans_entity",
             "answerable": False, "unanswerable_reason": "entity_missing", "relation": "place of birth"}
    items = [
        {**base, "qid": "T1", "type": "temporal", "question": f"Who was the first CEO of {org}?",
         "answer": facts[first].tail_name, "supporting_facts": [first]},
        {**unans, "qid": "U1", "question": "Where was Zed Quux born?", "subject": "Zed Quux"},
        {**unans, "qid": "U2", "question": f"Where was {person} born?", "subject": person},
    ]
    valid, rejected = qa_validator("world_00", list(range(len(facts))), facts, "d", [0])(items)
    assert [(r["llm_qid"], r["family"]) for r in valid] == [("T1", "first"), ("U1", "unans_entity")]
    assert valid[0]["time_constraint"] == {"kind": "first", "start": None, "end": None, "anchor": None}
    assert (valid[1]["answer"], valid[1]["answer_fact"], valid[1]["answerable"]) == ("no answer", None, False)
    assert rejected == [f"item 2: unanswerable_reason: {person!r} is in the KB"]
