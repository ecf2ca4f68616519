"""Training-only worlds for the retrieval phase: id shifting, loading, table/data concatenation, the
Stage A run that trains on them while the KB and the later phases keep the KB's facts only, and the
generator's files."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import tiny_llama

from kblampp.config import load_config
from kblampp.kv_encoder import KVEncoder
from kblampp.schema import SchemaError, fact_from_dict, load_facts, load_qa, qa_from_dict
from kblampp.synth.jsonl import write_jsonl
from kblampp.training.extra_worlds import load_extra_worlds, shift_fact_ids
from kblampp.training.facts import FactTable
from kblampp.training.retrieval_phase import RetrievalData
from kblampp.training.stage_a import StageA, StageAInputs
from kblampp.training.toy import HashEmbedder, tiny_tokenizer, toy_facts, toy_qa
from kblampp.answer_head import build_tail_token_table

D_CTX = 32
CFG = ["inject_layers=[1]", "d_k=16", "d_v=16", "K_top=4", "batch_size=4", "log_interval=2", "max_seq_len=48",
       "save_interval=0", "stage_a.retrieval_batch=8", "stage_a.retrieval_lr=1e-2", "stage_a.retrieval_eval_interval=0",
       "stage_a.hard_negatives=4", "stage_a.copy_gate_questions=8", "stage_a.cache_batch=8",
       "stage_a.retrieval_steps=6", "stage_a.time_steps=0", "stage_a.copy_gate_steps=2", "stage_a.value_steps=1",
       "stage_a.e2e_steps=1"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Base KB: people 0-5 (18 facts). Extra worlds: people 6-11 in their own file, local ids 0-17."""
    folder = tmp_path_factory.mktemp("extra")
    everyone = toy_facts(12)
    base, extra = everyone[:18], everyone[18:]
    write_jsonl(folder / "extra.jsonl", extra)
    write_jsonl(folder / "extra_qa.jsonl", toy_qa(extra, range(6), "x"))
    return {"base": base, "extra": extra, "facts_path": folder / "extra.jsonl", "qa_path": folder / "extra_qa.jsonl",
            "folder": folder}


def test_shift_fact_ids_moves_every_fact_id_and_nothing_else():
    rec = qa_from_dict({"qid": "q", "dataset": "t", "question": "Who?", "answer": "A", "type": "multi-hop",
                        "supporting_facts": [2, 5], "question_time": None, "answer_fact": 5, "near_miss_facts": [1]})
    [moved] = shift_fact_ids([rec], 100)
    assert moved.supporting_facts == (102, 105)
    assert moved.raw["answer_fact"] == 105 and moved.raw["near_miss_facts"] == [101]
    assert (moved.question, moved.answer, moved.qid) == (rec.question, rec.answer, rec.qid)
    assert rec.supporting_facts == (2, 5) and rec.raw["answer_fact"] == 5  # the input is not touched
    unanswerable = qa_from_dict({"qid": "u", "dataset": "t", "question": "Who?", "answer": "", "type": "single-hop",
                                 "supporting_facts": [], "question_time": None, "answer_fact": None})
    assert shift_fact_ids([unanswerable], 7)[0].raw["answer_fact"] is None


def test_load_extra_worlds_shifts_ids_and_checks_its_inputs(worlds, tmp_path):
    facts, records = load_extra_worlds(worlds["facts_path"], worlds["qa_path"], offset=18)
    assert len(facts) == 18 and len(records) == 12
    assert records[0].supporting_facts == (18,) and records[0].raw["answer_fact"] == 18
    assert facts[records[0].supporting_facts[0] - 18].head_name in records[0].question
    assert load_extra_worlds(None, None, offset=18) == ([], [])
    with pytest.raises(ValueError, match="retrieval_extra_facts and stage_a.retrieval_extra_qa: give both or neither"):
        load_extra_worlds(worlds["facts_path"], None, offset=18)
    with pytest.raises(FileNotFoundError, match=r"stage_a.retrieval_extra_qa: .*missing.jsonl not found"):
        load_extra_worlds(worlds["facts_path"], tmp_path / "missing.jsonl", offset=18)
    bad = tmp_path / "bad_qa.jsonl"
    write_jsonl(bad, toy_qa(worlds["extra"], range(6), "x") + toy_qa(toy_facts(8), [7], "y"))  # ids 21-23 of 18
    with pytest.raises(SchemaError, match="bad_qa.jsonl"):
        load_extra_worlds(worlds["facts_path"], bad, offset=18)


def test_fact_table_concat_appends_rows_in_order(worlds):
    emb = HashEmbedder(D_CTX)
    a = FactTable.from_facts([fact_from_dict(f) for f in worlds["base"]], emb.encode)
    b = FactTable.from_facts([fact_from_dict(f) for f in worlds["extra"]], emb.encode)
    both = FactTable.from_facts([fact_from_dict(f) for f in worlds["base"] + worlds["extra"]], emb.encode)
    joined = a.concat(b)
    assert joined.num_facts == 36 and a.num_facts == 18
    for name in ("e_h", "e_r", "e_t", "e_c", "ctx_vec", "tau_min", "tau_max"):
        assert torch.equal(getattr(joined, name), getattr(both, name)), name
    assert joined.head_keys == both.head_keys and joined.tail_names == both.tail_names
    assert joined.worlds == [None] * 36
    assert torch.equal(joined.sibling_index()[18:], both.sibling_index()[18:])


def test_retrieval_data_concat_pads_the_id_lists():
    def data(n, width, start):
        return RetrievalData({1: torch.full((n, 4), float(start))}, torch.zeros(n, 3), torch.full((n, 2), math.nan),
                             torch.arange(start, start + n), torch.arange(start, start + n * width).view(n, width),
                             ["single-hop"] * n, torch.full((n, width + 1), 7), torch.zeros(n, dtype=torch.long))
    joined = data(2, 1, 0).concat(data(1, 3, 10))
    assert len(joined) == 3 and joined.answer.tolist() == [0, 1, 10]
    assert joined.supporting.tolist() == [[0, -1, -1], [1, -1, -1], [10, 11, 12]]
    assert joined.hard.shape == (3, 4) and joined.hard[0].tolist() == [7, 7, -1, -1]
    assert joined.hidden[1][:, 0].tolist() == [0.0, 0.0, 10.0]
    other_layer = RetrievalData({2: torch.zeros(1, 4)}, torch.zeros(1, 3), torch.zeros(1, 2), torch.zeros(1).long(),
                                torch.zeros(1, 1).long(), ["single-hop"], torch.zeros(1, 0).long())
    with pytest.raises(ValueError, match=r"layers \[1\] and \[2\] differ"):
        data(1, 1, 0).concat(other_layer)


def _inputs(worlds, cfg, with_extra: bool) -> StageAInputs:
    tok, emb = tiny_tokenizer(), HashEmbedder(D_CTX)
    facts = [fact_from_dict(f) for f in worlds["base"]]
    qa = [qa_from_dict(q) for q in toy_qa(worlds["base"], range(6), "t")]
    extra_facts, extra_qa = load_extra_worlds(worlds["facts_path"], worlds["qa_path"], 18) if with_extra else ([], [])
    return StageAInputs(cfg, tiny_llama(), tok, emb.encode, D_CTX, facts, FactTable.from_facts(facts, emb.encode),
                        KVEncoder(D_CTX, 16, 16, 8, 32), build_tail_token_table([f.tail_name for f in facts], tok),
                        qa, qa[:4], extra_facts=extra_facts, extra_qa=extra_qa)


def test_stage_a_trains_retrieval_on_the_extra_worlds_and_keeps_the_kb_for_every_other_phase(worlds, tmp_path):
    cfg = load_config(None, CFG)
    stage = StageA(_inputs(worlds, cfg, True), tmp_path / "with", progress=False)
    results = stage.run()
    # the retrieval phase scored all 24 training questions (12 of the KB's worlds, 12 of the extra ones)
    assert results["retrieval"]["train"]["n"] == 24
    # the later phases and the final retrieval see the KB's 18 facts and its 12 training questions only
    assert stage.mods.table.num_facts == 18 and results["retrieval_final"]["train"]["n"] == 12
    plain = StageA(_inputs(worlds, cfg, False), tmp_path / "plain", progress=False).run()
    assert plain["retrieval"]["train"]["n"] == 12
    key_mlp = lambda s: s.mods.kv.kb_key_mlp.base.weight  # noqa: E731
    again = StageA(_inputs(worlds, cfg, True), tmp_path / "with", progress=False)
    assert again.run()["retrieval"] == results["retrieval"]  # a finished run resumes without the extra pass
    assert torch.equal(key_mlp(again), key_mlp(stage))


def test_the_extra_phase_table_holds_both_and_trains_over_all_extra_columns(worlds, tmp_path):
    cfg = load_config(None, CFG)
    stage = StageA(_inputs(worlds, cfg, True), tmp_path / "run", progress=False)
    states = stage._states(stage.train_ds)
    from kblampp.training.stage_a import _retrieval_data

    train = _retrieval_data(stage.train_ds, states, stage.mods.table, 4)
    base = stage._kb_retrieval(train, None, 0, 1)
    extended = stage._with_extra_worlds(base, train, None, 0, 1)
    assert base.table.num_facts == 18 and extended.table.num_facts == 36
    assert len(extended.train) == 24 and extended.train.answer[12:].min() >= 18
    assert extended.table.head_names[18:] == [f["head"]["name"] for f in worlds["extra"]]
    assert extended.columns is not None and bool(extended.columns.all())
    no_encoder = load_config(None, CFG + ["stage_a.train_kv_encoder=false"])
    frozen = StageA(_inputs(worlds, no_encoder, True), tmp_path / "frozen", progress=False)
    with pytest.raises(ValueError, match="retrieval_extra_facts needs stage_a.train_kv_encoder: true"):
        frozen._with_extra_worlds(frozen._kb_retrieval(train, None, 0, 1), train, None, 0, 1)


def test_make_extra_world_files_writes_checked_worlds_named_apart_from_the_kb(tmp_path):
    from kblampp.synth.distractors import collisions
    from kblampp.synth.pipeline import make_extra_world_files, make_world_file
    from kblampp.synth.world import WorldSizes

    sizes = WorldSizes(persons=8, organisations=3)
    make_world_file(tmp_path / "kb.jsonl", seed=0, num_worlds=2, sizes=sizes, progress=False)
    report = make_extra_world_files(tmp_path / "kb.jsonl", tmp_path / "x.jsonl", tmp_path / "x_train.jsonl",
                                    n_facts=300, seed=3, progress=False)
    facts = load_facts(tmp_path / "x.jsonl")
    records = load_qa(tmp_path / "x_train.jsonl", num_facts=len(facts))  # ids index the extra file
    assert len(facts) == 300 and report.counts == {"facts": 300, "qa": len(records)} and records
    kb = [json.loads(line) for line in (tmp_path / "kb.jsonl").read_text().splitlines()]
    clash = collisions(kb, [f.raw for f in facts])
    assert clash.names == 0 and clash.ids == 0
    assert {r.raw["dataset"] for r in records} == {"x_train"}
    first = (tmp_path / "x.jsonl").read_bytes()
    make_extra_world_files(tmp_path / "kb.jsonl", tmp_path / "x.jsonl", tmp_path / "x_train.jsonl",
                           n_facts=300, seed=3, progress=False)
    assert (tmp_path / "x.jsonl").read_bytes() == first  # deterministic
