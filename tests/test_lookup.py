"""The no-LLM rows: `lookup` (time filter, window preference, abstention tuned on dev) and
`lookup_chain` (chains of tails, hop count from scores), on a hand-made KB and a bag-of-words embedder."""
import numpy as np
import pytest

from kblampp.evaluation.lookup import (DevGolds, LookupSettings, build_fact_table, lookup_answers, lookup_candidates,
                                       tune_abstention)
from kblampp.evaluation.lookup_chain import ChainSettings, chain_answers, chain_candidates, chains, tune_chain
from kblampp.evaluation.lookup_rows import LookupRows
from kblampp.schema import fact_from_dict, qa_from_dict
from kblampp.timewin import window_days
from eval_world import BowEmbedder


def _fact(head, hid, rel, tail, tid, start=None, end=None):
    return fact_from_dict({"head": {"id": hid, "name": head}, "relation": {"id": rel, "name": rel},
                           "tail": {"id": tid, "name": tail}, "context": {"source": "t", "sent_span": f"{head} {rel} {tail}."},
                           "time_window": {"start": start, "end": end, "source": "t"}})


FACTS = [
    _fact("Acme", "O1", "chief executive", "Ann Oslo", "P1", "1990", "1995"),  # 0
    _fact("Acme", "O1", "chief executive", "Bob Lima", "P2", "1996", "2003"),  # 1
    _fact("Acme", "O1", "chief executive", "Cid Pune", "P3", "2004", None),  # 2
    _fact("Acme", "O1", "headquarters", "Kyiv", "C1"),  # 3
    _fact("Dan Rome", "P4", "employer", "Acme", "O1"),  # 4
    _fact("Dan Rome", "P4", "birthplace", "Baku", "C2"),  # 5
    _fact("Bob Lima", "P2", "birthplace", "Quito", "C3"),  # 6
]


def _qa(qid, question, answer, answerable=True):
    return qa_from_dict({"qid": qid, "dataset": "t", "question": question, "answer": answer, "type": "single-hop",
                         "supporting_facts": [], "question_time": None, "answerable": answerable})


@pytest.fixture()
def table():
    return build_fact_table(FACTS, BowEmbedder().encode)


def _lookup(table, questions, settings=LookupSettings()):
    vecs = BowEmbedder().encode(questions)
    return lookup_answers(table, lookup_candidates(table, vecs, questions), settings, "unknown")


def test_lookup_time_filter_and_window_preference(table):
    questions = ["Acme chief executive in 1999?", "Acme chief executive before 2004?",
                 "Acme chief executive after 1995?", "Acme chief executive on May 3, 2010?", "Acme headquarters?"]
    assert [a.answer for a in _lookup(table, questions)] == ["Bob Lima", "Bob Lima", "Bob Lima", "Cid Pune", "Kyiv"]
    assert _lookup(table, ["Acme chief executive before 1996?"])[0].answer == "Ann Oslo"


def test_lookup_closed_window_prefers_the_nearest_start():
    """Open-ended windows from text ([1990, +inf), [2001, +inf)) both cover "from 2001 to 2003" in full:
    the one that began in 2001 is the holder then; with equal starts the larger overlap wins."""
    facts = [_fact("Zeta", "O9", "owner", "Old Owner", "P8", "1990", None),
             _fact("Zeta", "O9", "owner", "New Owner", "P9", "2001", None)]
    table = build_fact_table(facts, BowEmbedder().encode)
    assert _lookup(table, ["Zeta owner from 2001 to 2003?"])[0].answer == "New Owner"
    assert _lookup(table, ["Zeta owner from 1990 to 1995?"])[0].answer == "Old Owner"
    tied = [_fact("Zeta", "O9", "owner", "Short", "P8", "2001", "2001-06"),
            _fact("Zeta", "O9", "owner", "Long", "P9", "2001", "2004")]
    table = build_fact_table(tied, BowEmbedder().encode)
    assert _lookup(table, ["Zeta owner from 2001 to 2003?"])[0].answer == "Long"


def test_lookup_abstains_by_dev_tuned_rules(table):
    outside = _lookup(table, ["Acme chief executive in 1950?"], LookupSettings(abstain_on_time=True))[0]
    assert outside.abstained and outside.answer == "unknown"
    assert _lookup(table, ["Acme chief executive in 1950?"])[0].answer == "Kyiv"  # the next text in time
    dev = [_qa("a", "Acme headquarters?", "Kyiv"), _qa("b", "Acme chief executive in 1950?", "no answer", False)]
    vecs = BowEmbedder().encode([r.question for r in dev])
    cands = lookup_candidates(table, vecs, [r.question for r in dev])
    golds = DevGolds.score([FACTS[f].tail_name for f in cands.fact], dev, "unknown")
    assert golds.right_if_answered.tolist() == [1.0, 0.0] and golds.right_if_abstained.tolist() == [0.0, 1.0]
    tuned = tune_abstention(cands.score, cands.outside, cands.found, golds)
    assert [a.answer for a in lookup_answers(table, cands, tuned, "unknown")] == ["Kyiv", "unknown"]


def test_chains_follow_tails_per_hop_in_time(table):
    assert sorted(chains(table, ["P4"], None, max_hops=3)) == [(4,), (4, 0), (4, 3), (5,)]  # one CEO per text
    in_1999 = window_days("1999", "1999")
    assert sorted(chains(table, ["P4"], in_1999, max_hops=3)) == [(4,), (4, 1), (4, 1, 6), (4, 3), (5,)]
    assert sorted(chains(table, ["P4"], in_1999, max_hops=2)) == [(4,), (4, 1), (4, 3), (5,)]
    assert chains(table, ["O1", "O1"], window_days("2020", "2020"), max_hops=1) == [(2,), (3,)]


def test_lookup_chain_picks_the_hop_count_by_score(table):
    questions = ["Dan Rome employer headquarters?", "Dan Rome birthplace?", "Dan Rome employer?"]
    vecs = BowEmbedder().encode(questions)
    cands = lookup_candidates(table, vecs, questions)
    chained = chain_candidates(table, type(table.texts)(BowEmbedder().encode), vecs, questions, cands.outside)
    out = chain_answers(table, chained, ChainSettings(np.zeros(3), LookupSettings()), "unknown")
    assert [a.answer for a in out] == ["Kyiv", "Baku", "Acme"]
    assert out[0].fact_ids == [4, 3]
    dev = [_qa(str(i), q, a) for i, (q, a) in enumerate(zip(questions, ["Kyiv", "Baku", "Acme"]))]
    tuned = tune_chain(table, chained, dev, "unknown")
    assert tuned.bias.tolist() == [0.0, 0.0, 0.0]  # already right: the smallest biases win ties


def test_lookup_rows_tune_and_answer():
    embed = BowEmbedder().encode
    rows = LookupRows.build(FACTS, embed, "unknown", alive=np.array([True] * 6 + [False]))
    dev = [_qa("a", "Dan Rome employer headquarters?", "Kyiv")]
    rows.tune(dev, "dev.jsonl")
    answers, seconds = rows.answer([_qa("t", "Acme headquarters?", "Kyiv")])
    assert answers["lookup"][0].answer == "Kyiv" and answers["lookup_chain"][0].answer == "Kyiv"
    assert set(seconds) == {"lookup", "lookup_chain"} and "tuned on dev.jsonl (1 questions)" in rows.describe()
    assert 6 not in [i for ids in rows.table.by_head.values() for i in ids]  # deleted facts are out
    with pytest.raises(ValueError, match="alive has 2 flags for 7 facts"):
        build_fact_table(FACTS, embed, alive=np.array([True, False]))


def test_lookup_follows_the_typed_time_kind_and_anchors(table):
    questions = ["Who was the first chief executive of Acme?", "Who was the latest chief executive of Acme?",
                 "Who succeeded Ann Oslo as chief executive of Acme?",
                 "Who was chief executive of Acme just before Cid Pune?", "Who is the chief executive of Acme now?"]
    vecs = BowEmbedder().encode(questions)
    cands = lookup_candidates(table, vecs, questions, reference_date="2024-12-31")
    answers = lookup_answers(table, cands, LookupSettings(), "unknown")
    assert [a.answer for a in answers] == ["Ann Oslo", "Cid Pune", "Bob Lima", "Bob Lima", "Cid Pune"]
