"""QA -> training batches: prompt from build_prompt, loss on answer tokens only, time and e_q attached."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kblampp.backbone import build_prompt
from kblampp.data import IGNORE_INDEX, QADataset, answer_fact_of, answerable_records, batch_schedule, encode_record
from kblampp.schema import qa_from_dict
from kblampp.training.toy import tiny_tokenizer, toy_facts, toy_qa


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def records():
    return [qa_from_dict(q) for q in toy_qa(toy_facts(4), range(4), "q")]


def test_encode_record_masks_prompt_and_ends_answer(tok, records):
    rec = records[1]  # temporal: "Who employed ... in 2005?"
    ex = encode_record(tok, rec, 7, max_seq_len=256)
    prompt = build_prompt(tok, rec.question)
    assert tok.decode(ex.input_ids[:ex.prompt_len]) == prompt
    assert ex.labels[:ex.prompt_len] == [IGNORE_INDEX] * ex.prompt_len
    answer = ex.input_ids[ex.prompt_len:]
    assert ex.labels[ex.prompt_len:] == answer
    assert answer[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(answer[:-1]) == rec.answer
    assert ex.index == 7 and ex.answer_fact == 1 and ex.supporting == (1,)
    assert ex.tau == rec.tau and ex.qtype == "temporal"


def test_prompt_is_cut_from_the_left_and_long_answers_rejected(tok, records):
    full = encode_record(tok, records[0], 0, max_seq_len=256)
    cut = encode_record(tok, records[0], 0, max_seq_len=40)
    n_answer = len(full.input_ids) - full.prompt_len
    assert len(cut.input_ids) == 40
    assert cut.input_ids[:cut.prompt_len] == full.input_ids[full.prompt_len - cut.prompt_len:full.prompt_len]
    assert cut.prompt_len == 40 - n_answer
    with pytest.raises(ValueError, match=r"qid q0b: answer: 5 tokens do not fit max_seq_len=5"):
        encode_record(tok, records[0], 0, max_seq_len=5)


def test_collate_pads_right_and_attaches_time_and_context(tok, records):
    e_q = np.arange(len(records) * 3, dtype=np.float32).reshape(len(records), 3)
    ds = QADataset(records, tok, e_q, max_seq_len=256)
    batch = ds.batch([0, 1, 3])
    lens = [len(ds[i].input_ids) for i in (0, 1, 3)]
    assert batch["input_ids"].shape == (3, max(lens))
    for b, (i, n) in enumerate(zip((0, 1, 3), lens)):
        assert batch["input_ids"][b, :n].tolist() == ds[i].input_ids
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][b].sum() == n
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["last_prompt_pos"][b] == ds[i].prompt_len - 1
    assert torch.equal(batch["e_q"], torch.from_numpy(e_q[[0, 1, 3]]))
    assert torch.isnan(batch["tau"][0]).all()  # single-hop: no question time
    assert batch["tau"][1].tolist() == list(records[1].tau)
    assert batch["tau"][1, 0] == pytest.approx((np.datetime64("2005-01-01") - np.datetime64("1970-01-01")).astype(int))
    assert batch["supporting"].tolist() == [[0], [1], [4]]
    assert batch["index"].tolist() == [0, 1, 3]


def test_dataset_rejects_misaligned_context_vectors(tok, records):
    with pytest.raises(ValueError, match=r"e_q: expected shape \(8, d_ctx\), got \(3, 4\)"):
        QADataset(records, tok, np.zeros((3, 4), dtype=np.float32), 256)


def test_answer_fact_falls_back_to_last_supporting(records):
    raw = dict(records[0].raw)
    raw.pop("answer_fact")
    raw["supporting_facts"] = [3, 9]
    assert answer_fact_of(qa_from_dict(raw)) == 9
    raw["supporting_facts"] = []
    with pytest.raises(ValueError, match="qid q0b: supporting_facts: empty"):
        answer_fact_of(qa_from_dict(raw))


def test_batch_schedule_is_a_seeded_permutation_split_across_ranks():
    first_epoch = [i for step in range(5) for i in batch_schedule(10, 2, step, seed=3)]
    assert sorted(first_epoch) == list(range(10))
    assert batch_schedule(10, 2, 4, seed=3) == batch_schedule(10, 2, 4, seed=3)
    assert [batch_schedule(10, 2, s, seed=3) for s in range(5)] != [batch_schedule(10, 2, s, seed=4) for s in range(5)]
    # an epoch boundary inside a batch continues with the next epoch's permutation
    assert len(batch_schedule(10, 3, 3, seed=0)) == 3
    ranks = [batch_schedule(10, 2, 1, seed=0, rank=r, world=2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert ranks[0] + ranks[1] == batch_schedule(10, 4, 1, seed=0)
    with pytest.raises(ValueError, match="empty dataset"):
        batch_schedule(0, 2, 0, seed=0)
    assert math.isfinite(len(first_epoch))


def test_unanswerable_records_are_left_out_of_training(tok, records):
    unans = qa_from_dict({"qid": "u1", "dataset": "toy", "question": "Where was Nobody Here born?",
                          "answer": "no answer", "type": "unanswerable", "supporting_facts": [],
                          "question_time": None, "answer_fact": None, "family": "unans_entity",
                          "answerable": False, "unanswerable_reason": "entity_missing", "near_miss_facts": []})
    with pytest.raises(ValueError, match=r"qid u1: supporting_facts: empty \(no answer fact to train on\)"):
        answer_fact_of(unans)
    kept = answerable_records([records[0], unans, records[1]])
    assert kept == [records[0], records[1]]
    ds = QADataset(kept, tok, np.zeros((2, 1), np.float32), max_seq_len=256)
    assert [ex.qid for ex in ds.examples] == [records[0].qid, records[1].qid]
