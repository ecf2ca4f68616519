"""Batched serving: concurrent questions answered by one batched generate() give the same answers and
evidence as one at a time; KB edits stay ordered against answers (real threads); one bad question
does not fail its batch; the first-come lock and the batcher on their own.

The engine is built in-process on the tiny random world of test_server.py (with an abstention head
at threshold 0.0, so `abstain: true` rows abstain and `abstain: false` rows answer: both groups of a
batch are exercised). K_top 8 >= N, so every live fact is in every answer's evidence.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_server import FACTS, TOKEN, fact, make_world  # noqa: E402
from test_server_abstention import add_abstention  # noqa: E402

from kblampp.serving.batcher import Batcher, FairLock  # noqa: E402

# (question, question_time, max_new_tokens, abstain): different lengths, given and parsed times, budgets
QUESTIONS = [("Where was Ada Byron born?", None, 3, False),
             ("Who employed Alan Turing in 1946?", None, 4, False),
             ("Who employed Alan Turing?", {"start": "1949", "end": "1950"}, 5, False),
             ("Where was Grace Hopper born, and in which city of the long history did it happen?", None, 3, True),
             ("Who employed Ada Byron after 1835?", None, 4, False),
             ("Hi", None, 5, False)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from kblampp.config import load_config
    from kblampp.serving.build import build_engine
    from kblampp.serving.config import ServerSettings

    world = add_abstention(make_world(tmp_path_factory.mktemp("batch_world")), threshold=0.0)
    eng = build_engine(load_config(world["config"]), world["checkpoint"], ServerSettings(token=TOKEN), world["wal"])
    yield eng
    eng.close()


def _batching(eng, size: int, wait_s: float) -> None:
    eng.batcher.max_size, eng.batcher.max_wait_s = size, wait_s


def _ask(eng, q: tuple) -> dict:
    question, qtime, budget, abstain = q
    return eng.answer(question, qtime, budget, 8, abstain=abstain)


def _concurrently(fn, args: list) -> list:
    """fn(arg) for every arg, each in its own thread started together; results (or errors) in order."""
    out: list = [None] * len(args)

    def run(i: int) -> None:
        try:
            out[i] = fn(args[i])
        except Exception as err:  # noqa: BLE001 - returned to the test to check
            out[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _one_batch(eng, questions: list) -> list:
    """Answer `questions` from concurrent threads as ONE batch (the batch fills up before its wait ends)."""
    _batching(eng, len(questions), 30.0)
    try:
        return _concurrently(lambda q: _ask(eng, q), questions)
    finally:
        _batching(eng, 16, 0.01)


def _same_answer(alone: dict, batched: dict) -> None:
    """Equal answers, decisions and evidence (facts, order, every field); alpha/beta to 1e-6 (see below)."""
    for key in ("answer", "abstained", "question_time", "kb_seq", "near_misses", "abstain_reason", "p_unanswerable"):
        assert alone.get(key) == batched.get(key), key
    assert [e["index"] for e in alone["evidence"]] == [e["index"] for e in batched["evidence"]]
    for a, b in zip(alone["evidence"], batched["evidence"]):
        assert {k: v for k, v in a.items() if k not in ("alpha", "beta")} == \
               {k: v for k, v in b.items() if k not in ("alpha", "beta")}
        assert b["alpha"] == pytest.approx(a["alpha"], abs=1e-6) and b["beta"] == pytest.approx(a["beta"], abs=1e-6)


# -------------------------------------------------------------------------------------- same answers
def test_batch_gives_the_answers_and_evidence_of_one_at_a_time(engine):
    """Why alpha/beta are compared to 1e-6 and not bitwise: a padded row multiplies through matrices of
    another shape (and the question embedder pads the batch too), so the float sums run in another
    order; measured differences are ~3e-8. Answers, decisions and the evidence facts are exact."""
    _batching(engine, 1, 0.0)
    alone = [_ask(engine, q) for q in QUESTIONS]
    batched = _one_batch(engine, QUESTIONS)
    assert {b["timings"]["batch_size"] for b in batched} == {len(QUESTIONS)}
    assert len({b["timings"]["batch_id"] for b in batched}) == 1  # one generate() answered them all
    for a, b in zip(alone, batched):
        assert a["timings"]["batch_size"] == 1
        _same_answer(a, b)
    assert [b["abstained"] for b in batched] == [q[3] for q in QUESTIONS]  # threshold 0: abstain rows abstain
    assert all(b["answer"] for b in batched if not b["abstained"])


def test_each_row_keeps_its_own_budget(engine):
    """max_new_tokens differs per row: each row's answer equals the one it gets alone with its budget."""
    rows = [("Where was Ada Byron born?", None, budget, False) for budget in (1, 2, 6)]
    _batching(engine, 1, 0.0)
    alone = [_ask(engine, q)["answer"] for q in rows]
    assert [b["answer"] for b in _one_batch(engine, rows)] == alone


def test_lone_request_is_answered_without_a_full_batch(engine):
    _batching(engine, 16, 0.01)
    out = _ask(engine, QUESTIONS[0])
    assert out["timings"]["batch_size"] == 1 and out["answer"]


# ---------------------------------------------------------------------------------- bad rows
def test_bad_question_fails_alone_in_its_batch(engine, monkeypatch):
    _batching(engine, 1, 0.0)
    alone = [_ask(engine, q) for q in QUESTIONS[:3]]
    encode = engine.embedder.encode

    def picky(texts, **kw):
        if any("POISON" in t for t in texts):
            raise ValueError("cannot embed a POISON question")
        return encode(texts, **kw)

    monkeypatch.setattr(engine.embedder, "encode", picky)
    batch = [*QUESTIONS[:2], ("POISON pill?", None, 3, False), QUESTIONS[2]]
    out = _one_batch(engine, batch)
    assert isinstance(out[2], ValueError) and "POISON" in str(out[2])
    for a, b in zip(alone, [out[0], out[1], out[3]]):
        _same_answer(a, b)
        assert b["timings"]["batch_size"] == 4


def test_failing_generate_row_is_retried_alone(engine, monkeypatch):
    _batching(engine, 1, 0.0)
    alone = [_ask(engine, q) for q in QUESTIONS[:2]]
    answer_batch = engine.answerer.answer_batch

    def fragile(items):
        if any("BADROW" in it.question for it in items):
            raise RuntimeError("generation failed on BADROW")
        return answer_batch(items)

    monkeypatch.setattr(engine.answerer, "answer_batch", fragile)
    out = _one_batch(engine, [QUESTIONS[0], ("BADROW here", None, 3, False), QUESTIONS[1]])
    assert isinstance(out[1], RuntimeError) and "BADROW" in str(out[1])
    _same_answer(alone[0], out[0])
    _same_answer(alone[1], out[2])


# ------------------------------------------------------------------------------ edits vs answers
def test_edits_stay_ordered_against_batched_answers(engine, monkeypatch):
    """Real threads: one editor replaces fact 0 again and again (and adds then deletes facts) while
    eight clients ask. Every answer reads a KB version at least as new as the last edit acknowledged
    before it was asked; no edit lands while a batch generates; every row of a batch reads one version,
    and its evidence shows fact 0 as it was at that version; no acknowledged edit is lost."""
    _batching(engine, 16, 0.005)
    answer_batch = engine.answerer.answer_batch
    torn: list[tuple[int, int]] = []

    def watched(items):  # the KB version must not move while a batch is inside generate()
        before = engine.kb_seq()
        out = answer_batch(items)
        after = engine.kb_seq()
        if before != after:
            torn.append((before, after))
        return out

    monkeypatch.setattr(engine.answerer, "answer_batch", watched)
    tail_at: dict[int, str] = {engine.kb_seq(): FACTS[0]["tail"]["name"]}
    acked = {"seq": engine.kb_seq()}
    stop = threading.Event()
    answers: list[tuple[int, dict]] = []
    errors: list[BaseException] = []
    added: dict[int, dict | None] = {}

    def editor() -> None:
        try:
            for v in range(1, 31):
                new = dict(FACTS[0], tail={"id": None, "name": f"Town {v}"})
                seq = engine.replace_fact(0, new)["seq"]
                tail_at[seq] = f"Town {v}"
                acked["seq"] = seq
                if v % 10 == 0:  # an add and its delete: indices and tombstones stay consistent
                    extra = fact(f"Visitor {v}", "born in", "Nowhere", "1900")
                    (idx,) = engine.add_facts([extra])["indices"]
                    added[idx] = extra
                    acked["seq"] = engine.delete_fact(idx)["seq"]
                    added[idx] = None
                time.sleep(0.001)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)
        finally:
            stop.set()

    def client(i: int) -> None:
        try:
            while not stop.is_set():
                floor = acked["seq"]
                out = _ask(engine, QUESTIONS[i % 3])
                answers.append((floor, out))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    threads = [threading.Thread(target=editor)] + [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and torn == []
    assert len(answers) >= 8 and max(out["timings"]["batch_size"] for _, out in answers) > 1
    seq_of_batch: dict[int, int] = {}
    for floor, out in answers:
        assert out["kb_seq"] >= floor  # asked after an acknowledged edit: sees it
        assert seq_of_batch.setdefault(out["timings"]["batch_id"], out["kb_seq"]) == out["kb_seq"]
        shown = {e["index"]: e["tail"] for e in out["evidence"]}
        version = max(s for s in tail_at if s <= out["kb_seq"])
        assert shown[0] == tail_at[version]
    assert engine.get_fact(0)["fact"]["tail"]["name"] == "Town 30"
    for idx, want in added.items():
        assert want is None
        with pytest.raises(Exception, match="was deleted"):
            engine.get_fact(idx)


# -------------------------------------------------------------------------- lock and batcher alone
def test_fair_lock_grants_in_arrival_order_and_times_out():
    lock, order = FairLock(), []
    assert lock.acquire()
    assert lock.acquire(timeout=0.01) is False  # held: gives up, and leaves no waiter behind
    threads = []
    for name in "abc":
        t = threading.Thread(target=lambda n=name: (lock.acquire(), order.append(n), lock.release()))
        t.start()
        while len(lock._waiters) < len(threads) + 1:  # each thread queued before the next starts
            time.sleep(0.001)
        threads.append(t)
    lock.release()
    for t in threads:
        t.join()
    assert order == ["a", "b", "c"]
    assert lock.acquire(timeout=0.01) and len(lock._waiters) == 0
    lock.release()
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


def test_batcher_gathers_withdraws_and_closes():
    gate, seen = threading.Event(), []

    def run(jobs):
        seen.append([j.payload for j in jobs])
        gate.wait()
        for j in jobs:
            j.finish(j.payload * 10)

    batcher = Batcher(run, max_size=3, max_wait_s=0.0)
    first = batcher.submit(1)
    while first.state == "queued":  # the worker took it alone and now blocks in run()
        time.sleep(0.001)
    late = batcher.submit(2)
    with pytest.raises(TimeoutError, match="no batch took the request"):
        batcher.wait(late, start_timeout=0.05)
    assert late.state == "cancelled"
    queued = [batcher.submit(x) for x in (3, 4, 5, 6)]
    gate.set()
    assert batcher.wait(first, 5.0) == 10
    assert [batcher.wait(j, 5.0) for j in queued] == [30, 40, 50, 60]
    assert seen[0] == [1] and [3, 4, 5] in seen and 2 not in sum(seen, [])  # at most max_size per batch
    gate.clear()
    blocked = batcher.submit(7)
    while blocked.state == "queued":
        time.sleep(0.001)
    waiting = batcher.submit(8)
    closer = threading.Thread(target=batcher.close, args=(ValueError("closing"),))
    closer.start()
    while not batcher._closed:
        time.sleep(0.001)
    gate.set()
    closer.join()
    assert batcher.wait(blocked, 5.0) == 70  # the batch in flight finishes
    with pytest.raises(ValueError, match="closing"):
        batcher.wait(waiting, 5.0)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(9)
    with pytest.raises(ValueError, match="max size"):
        Batcher(run, max_size=0, max_wait_s=0.0)


def test_generate_rows_checks_per_prompt_budgets():
    from kblampp.inference.generate import generate_rows

    with pytest.raises(ValueError, match="2 budgets for 3 prompts"):
        generate_rows(None, None, ["a", "b", "c"], [4, 4])
    with pytest.raises(ValueError, match="max_new_tokens: must be >= 1, got 0"):
        generate_rows(None, None, ["a", "b"], [4, 0])
