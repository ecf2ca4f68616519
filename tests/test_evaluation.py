"""Evaluation rows: shared generation, RAG/oracle prompts, KBLaM++ variants, retrieval metrics, report."""
from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from kblampp.backbone import build_prompt, format_fact
from kblampp.config import KBConfig
from kblampp.evaluation.baselines import (FactRetriever, backbone_prompts, context_prompts, oracle_fact_ids,
                                          rag_fact_ids)
from kblampp.inference.generate import generate_rows, tokenize_left
from kblampp.evaluation.kbqa import KB_VARIANTS, forced_ids, kb_request, question_taus, selector_overrides
from kblampp.evaluation.report import (QuestionResult, is_seen, markdown_table, seen_answers, summarize_row,
                                       write_report)
from kblampp.evaluation.retrieval_metrics import aggregate, answer_fact_of, score_question
from kblampp.model import KBLaMPP
from kblampp.retrieval import random_tensor_kb
from kblampp.schema import fact_from_dict, qa_from_dict
from kblampp.training.toy import tiny_tokenizer, toy_facts, toy_qa
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def world():
    raw = toy_facts(4)
    facts = [fact_from_dict(f) for f in raw]
    records = [qa_from_dict(q) for q in toy_qa(raw, range(4), "q")]
    return facts, records


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def kb_model():
    cfg = KBConfig(d_k=16, d_v=16, d_ctx=8, inject_layers=[1], K_top=4)
    return KBLaMPP(tiny_llama(), cfg, d_ctx=8)


# ---- generation ---------------------------------------------------------------------------------

def test_tokenize_left_pads_on_the_left(tok):
    batch = tokenize_left(tok, ["ab", "abcd"], "cpu")
    assert batch["input_ids"][0].tolist()[:2] == [tok.pad_token_id] * 2
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["input_ids"][:, -1].tolist() == [tok.convert_tokens_to_ids("b"), tok.convert_tokens_to_ids("d")]


def test_generate_rows_keeps_order_and_matches_unbatched(tok, world):
    _, records = world
    model = tiny_llama()
    prompts = backbone_prompts(tok, records[:4])
    batched = generate_rows(model, tok, prompts, 3, batch_size=3, progress=False)
    single = generate_rows(model, tok, prompts, 3, batch_size=1, progress=False)
    assert [g.output for g in batched] == [g.output for g in single]
    assert [g.prompt_tokens for g in batched] == [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]


class _Force(LogitsProcessor):
    """Always emit one character: shows that hook kwargs reach generate()."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -1e9)
        out[:, self.token_id] = 0.0
        return out


def test_generate_rows_hook_gets_indices_and_extra_kwargs(tok):
    seen = []

    @contextlib.contextmanager
    def hook(indices, batch):
        seen.append((list(indices), tuple(batch["input_ids"].shape)))
        yield {"logits_processor": LogitsProcessorList([_Force(tok.convert_tokens_to_ids("Z"))])}

    prompts = [build_prompt(tok, q) for q in ("Where?", "Who is it, really?", "Why?")]
    out = generate_rows(tiny_llama(), tok, prompts, 3, batch_size=2, request=hook, progress=False)
    assert [g.output for g in out] == ["ZZZ"] * 3 and [g.pred for g in out] == ["ZZZ"] * 3
    assert sorted(i for idx, _ in seen for i in idx) == [0, 1, 2]
    assert all(shape[0] == len(idx) for idx, shape in seen)


def test_length_batches_cover_every_prompt_once_shortest_first():
    from kblampp.inference.generate import length_batches

    lengths = [5, 2, 9, 2, 7, 3, 40]
    batches = length_batches(lengths, max_rows=3)
    assert batches == [[1, 3, 5], [0, 4, 2], [6]]  # stable among equal lengths
    order = [i for b in batches for i in b]
    back = [None] * len(lengths)
    for pos, i in enumerate(order):  # what generate_rows does with each batch's results
        back[i] = [lengths[j] for j in order][pos]
    assert back == lengths and sorted(order) == list(range(len(lengths)))
    by_tokens = length_batches(lengths, max_rows=10, max_tokens=15)
    assert by_tokens == [[1, 3, 5], [0, 4], [2], [6]]  # rows x longest <= 15; a longer prompt goes alone
    assert all(len(b) * max(lengths[i] for i in b) <= 15 for b in by_tokens[:-1])
    with pytest.raises(ValueError, match="batch_size: must be >= 1"):
        length_batches(lengths, 0)


def test_generate_rows_puts_results_back_in_question_order(tok):
    """Prompts of very different lengths, batched out of order: each answer lands at its own index."""
    prompts = [build_prompt(tok, q) for q in ("Who is it, really, after all this time?", "Why?", "Who?",
                                              "Where is the tallest place in this world?", "When?")]

    @contextlib.contextmanager
    def answer_by_index(indices, batch):  # each row emits the letter of its question index
        letters = [tok.convert_tokens_to_ids("ABCDE"[i]) for i in indices]

        class _Each(LogitsProcessor):
            def __call__(self, input_ids, scores):
                out = torch.full_like(scores, -1e9)
                out[torch.arange(len(letters)), letters] = 0.0
                return out

        yield {"logits_processor": LogitsProcessorList([_Each()])}

    out = generate_rows(tiny_llama(), tok, prompts, 2, batch_size=2, request=answer_by_index, progress=False)
    assert [g.output for g in out] == ["AA", "BB", "CC", "DD", "EE"]


def test_common_prefix_len_leaves_each_prompt_a_token():
    from kblampp.inference.generate import common_prefix_len

    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # the last token is always computed in the batch
    assert common_prefix_len([[1, 2], [3, 2]]) == 0
    assert common_prefix_len([[7]]) == 0 and common_prefix_len([]) == 0


def test_shared_prefix_gives_the_logits_and_answers_of_the_whole_prompt(tok):
    """The prefix cache + [prefix | pads | suffix] layout computes what the left-padded whole prompt does."""
    from kblampp.inference.generate import common_prefix_len, left_padded, shared_prefix_cache, with_prefix

    model = tiny_llama()
    prompts = [build_prompt(tok, q) for q in ("Who is it, really?", "Why?", "Where was the second one?")]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = common_prefix_len(ids)
    assert n > 10  # the chat template's system part
    with torch.inference_mode():
        whole = model(**tokenize_left(tok, prompts, "cpu")).logits[:, -1]
        inputs = with_prefix(left_padded(tok, [x[n:] for x in ids], "cpu"), ids[0][:n],
                             shared_prefix_cache(model, ids[0][:n], "cpu"))
        position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)[:, n:]
        shared = model(input_ids=inputs["input_ids"][:, n:], attention_mask=inputs["attention_mask"],
                       past_key_values=inputs["past_key_values"], position_ids=position_ids).logits[:, -1]
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)

    @contextlib.contextmanager
    def no_op(indices, batch):  # any request turns prefix sharing off
        yield {}

    plain = generate_rows(model, tok, prompts, 4, batch_size=2, request=no_op, progress=False)
    cached = generate_rows(model, tok, prompts, 4, batch_size=2, progress=False)
    assert [g.output for g in cached] == [g.output for g in plain]


def test_generate_rows_rejects_bad_budget(tok):
    with pytest.raises(ValueError, match="max_new_tokens: must be >= 1"):
        generate_rows(tiny_llama(), tok, ["x"], 0, progress=False)


# ---- baselines ----------------------------------------------------------------------------------

def test_fact_retriever_topk_and_errors():
    vecs = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], dtype=np.float32)
    retr = FactRetriever(vecs * 5)  # scale does not matter (cosine)
    assert retr.topk(np.array([[1.0, 0.1]]), 2).tolist() == [[0, 2]]
    assert retr.topk(np.array([[0.0, 1.0]]), 10).shape == (1, 4)
    assert rag_fact_ids(retr, np.array([[1.0, 0.1]]), 3) == [[1, 2, 0]]  # best written last
    with pytest.raises(ValueError, match=r"query_vecs: expected \(Q, 2\)"):
        retr.topk(np.zeros((1, 3)), 1)
    with pytest.raises(ValueError, match="fact_vecs: expected a non-empty"):
        FactRetriever(np.zeros((0, 2)))


def test_prompts_share_the_builder(tok, world):
    facts, records = world
    assert backbone_prompts(tok, records[:1]) == [build_prompt(tok, records[0].question)]
    prompts = context_prompts(tok, records[:2], facts, oracle_fact_ids(records[:2]))
    assert prompts[0] == build_prompt(tok, records[0].question, context_facts=[facts[records[0].supporting_facts[0]]])
    assert format_fact(facts[records[1].supporting_facts[0]]) in prompts[1]
    with pytest.raises(ValueError, match="1 fact lists for 2 questions"):
        context_prompts(tok, records[:2], facts, [[0]])


# ---- KBLaM++ rows -------------------------------------------------------------------------------

def test_question_taus_and_forced_ids(world):
    _, records = world
    tau = question_taus(records[:2])
    assert torch.isnan(tau[0]).all() and tau[1].tolist() == list(records[1].tau)
    assert forced_ids(records[:2]).tolist() == [[records[0].supporting_facts[0]], [records[1].supporting_facts[0]]]


def test_kb_request_records_and_oracle_forcing(tok, world, kb_model):
    facts, records = world
    source = random_tensor_kb(len(facts), 16, 16, 8, seed=1)
    e_q = torch.randn(len(records), 8, generator=torch.Generator().manual_seed(0))
    prompts = backbone_prompts(tok, records)
    plain = generate_rows(kb_model, tok, prompts, 3, batch_size=3, progress=False)
    for name in ("kblampp_injection", "kblampp_oracle_value_injection"):
        req = kb_request(kb_model, source, e_q, records, KB_VARIANTS[name])
        out = generate_rows(kb_model, tok, prompts, 3, batch_size=3, request=req, progress=False)
        assert len(out) == len(plain) and sorted(req.records) == list(range(len(records)))
        for i, rec in req.records.items():
            assert len(rec.cand_ids) == 4 and rec.layer == 1 and math.isclose(sum(rec.alpha), 1.0, rel_tol=1e-5)
            if name.startswith("kblampp_oracle"):
                assert set(records[i].supporting_facts) <= set(rec.cand_ids)
    assert kb_model.holder.ctx is None  # request context left


def test_follower_answers_from_the_leaders_prompt_cache_as_it_would_alone(tok, world, kb_model):
    """A row that differs only in its logits processors, started from the leader's prompt cache, gives
    the answers and last-token records it gives when run on its own."""
    from kblampp.inference.generate import generate_with_followers

    facts, records = world
    source = random_tensor_kb(len(facts), 16, 16, 8, seed=1)
    e_q = torch.randn(len(records), 8, generator=torch.Generator().manual_seed(0))
    prompts = backbone_prompts(tok, records)
    variant = KB_VARIANTS["kblampp_injection"]
    alone_req = kb_request(kb_model, source, e_q, records, variant)
    alone = generate_rows(kb_model, tok, prompts, 3, batch_size=3, request=alone_req, progress=False)
    leader_req, follower_req = (kb_request(kb_model, source, e_q, records, variant) for _ in range(2))

    @contextlib.contextmanager
    def leader(indices, batch):  # the same KB request, plus a processor that only changes the logits
        with leader_req(indices, batch) as extra:
            yield {**extra, "logits_processor": LogitsProcessorList([_Force(tok.convert_tokens_to_ids("Z"))])}

    (led, followed), seconds = generate_with_followers(kb_model, tok, prompts, 3, 3, leader, [follower_req],
                                                       progress=False)
    assert [g.output for g in led] == ["ZZZ"] * len(records) and len(seconds) == 2
    assert [g.output for g in followed] == [g.output for g in alone]
    for i, rec in alone_req.records.items():
        assert follower_req.records[i].cand_ids == rec.cand_ids
        assert follower_req.records[i].alpha == pytest.approx(rec.alpha, abs=1e-5)


def test_prefill_followers_are_rows_that_differ_only_in_logits_processors():
    from kblampp.evaluation.kbqa import prefill_followers
    from kblampp.evaluation.runner import DEFAULT_ROWS

    rows = list(DEFAULT_ROWS)
    assert prefill_followers("kblampp", rows) == ["kblampp_injection"]  # no_abstention reuses kblampp instead
    assert prefill_followers("kblampp_gamma0", rows) == [] and prefill_followers("kblampp_oracle_value", rows) == []
    assert prefill_followers("kblampp_oracle_value", ["kblampp_oracle_value", "kblampp_oracle_value_injection"]) == [
        "kblampp_oracle_value_injection"]


def test_selector_overrides_restore(kb_model):
    sel = kb_model.kb_layers["1"].kb_selector
    before = (sel.gamma, sel.eta)
    with selector_overrides(kb_model, gamma=0.0):
        assert (sel.gamma, sel.eta) == (0.0, before[1])
    with pytest.raises(RuntimeError):
        with selector_overrides(kb_model, eta=0.0):
            assert sel.eta == 0.0
            raise RuntimeError("boom")
    assert (sel.gamma, sel.eta) == before


def test_kb_request_rejects_mismatched_embeddings(world, kb_model):
    _, records = world
    with pytest.raises(ValueError, match="e_q has 1 rows for 8 questions"):
        kb_request(kb_model, random_tensor_kb(12, 16, 16, 8), torch.zeros(1, 8), records, KB_VARIANTS["kblampp"])


# ---- retrieval metrics --------------------------------------------------------------------------

def test_score_question_single_hop(world):
    facts, records = world
    rec = records[0]  # single-hop, support = [0]
    s = score_question([0, 5, -1], [0.7, 0.3, 0.0], rec, facts)
    assert (s.recall_at_1, s.recall_at_k, s.top_alpha_precision) == (1.0, 1.0, 1.0)
    assert s.time_match_mass is None and s.time_mismatch_mass is None
    s = score_question([5, 0], [0.6, 0.4], rec, facts)
    assert (s.recall_at_1, s.recall_at_k, s.top_alpha_precision) == (0.0, 1.0, 0.0)
    s = score_question([-1, -1], [0.5, 0.5], rec, facts)
    assert (s.recall_at_1, s.recall_at_k) == (0.0, 0.0)
    with pytest.raises(ValueError, match="cand_ids has 2 entries but alpha has 1"):
        score_question([0, 1], [1.0], rec, facts)


def test_score_question_temporal_masses(world):
    facts, records = world
    rec = records[1]  # "Who employed Ann P00 in 2005?" -> fact 1 (2001-2010); fact 2 (2011-) mismatches
    assert answer_fact_of(rec) == 1
    s = score_question([1, 2, 0, 4], [0.5, 0.25, 0.125, 0.125], rec, facts)
    assert s.time_match_mass == 0.5 and s.time_mismatch_mass == 0.25  # fact 0 has another relation
    assert s.recall_at_1 == 1.0
    agg = aggregate([s, score_question([0], [1.0], records[0], facts)])
    assert agg["recall@1"] == 1.0 and agg["time_match_mass"] == 0.5 and agg["time_mismatch_mass"] == 0.25


# ---- report -------------------------------------------------------------------------------------

def _result(row, qid, qtype, seen, em, ret=None):
    return QuestionResult(row=row, qid=qid, type=qtype, seen=seen, answer="a", output="a", pred="a", em=em,
                          f1=em, contained=1.0, prompt_tokens=10, retrieval=ret)


def test_seen_answers(world):
    _, records = world
    seen = seen_answers(records[:2])
    assert is_seen(records[0], seen) and is_seen(records[1], seen)
    assert seen == {"oslo", "acme"}


def test_summarize_and_write_report(tmp_path):
    ret = {"recall@1": 1.0, "recall@K": 1.0, "top_alpha_precision": 1.0, "time_match_mass": None,
           "time_mismatch_mass": None}
    rows = {
        "backbone": [_result("backbone", "q1", "single-hop", True, 0.0), _result("backbone", "q2", "temporal", False, 1.0)],
        "kblampp": [_result("kblampp", "q1", "single-hop", True, 1.0, ret),
                    _result("kblampp", "q2", "temporal", False, 1.0, {**ret, "recall@1": 0.0,
                                                                    "time_match_mass": 0.75, "time_mismatch_mass": 0.25})],
    }
    s = summarize_row(rows["kblampp"])
    assert s["em"] == 1.0 and s["recall@1"] == 0.5 and s["time_match_mass"] == 0.75
    assert s["em_single-hop"] == 1.0 and s["em_multi-hop"] is None and s["n_seen"] == 1 and s["em_unseen"] == 1.0
    assert summarize_row(rows["backbone"])["recall@1"] is None
    payload = write_report(tmp_path, rows, meta={"max_new_tokens": 16})
    assert json.loads((tmp_path / "results.json").read_text()) == payload
    md = (tmp_path / "results.md").read_text()
    assert "| backbone | 2 | 50.0 [0.0, 100.0] |" in md and "| kblampp | 2 | 100.0 [100.0, 100.0] |" in md
    assert "max_new_tokens = 16" in md and "| single-hop (n=1) | multi-hop (n=0) | temporal (n=1) |" in md
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[2])["row"] == "kblampp"
    assert markdown_table({"x": summarize_row([])}).count("–") >= 10


# ---- the whole run on a built tiny world ---------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from eval_world import build_world

    tmp = tmp_path_factory.mktemp("evalworld")
    return tmp, build_world(tmp)


def test_evaluate_writes_one_table_for_every_row(built):
    from kblampp.evaluation.kbqa import MULTI_HOP_VARIANTS
    from kblampp.evaluation.runner import ALL_ROWS, evaluate

    tmp, ec = built
    out = tmp / "eval"
    payload = evaluate(ec, tmp / "test.jsonl", out, rows=ALL_ROWS, batch_size=3, kb_edit_n=2, progress=False)
    rows = payload["rows"]
    one_layer = [r for r in ALL_ROWS if r not in MULTI_HOP_VARIANTS]  # the hop ablations need 2+ inject layers
    assert list(rows) == one_layer and all(r["n"] == 4 for r in rows.values())
    assert payload["skipped_rows"] == list(MULTI_HOP_VARIANTS)
    assert "kblampp_hop1_zeroed skipped: the model has one inject layer." in (out / "results.md").read_text()
    # retrieval is decided by the context and time scores: the answer head copies every answer
    assert rows["kblampp"]["em"] == 1.0 and rows["kblampp"]["recall@1"] == 1.0
    assert rows["kblampp"]["top_alpha_precision_single-hop"] == 1.0
    assert rows["kblampp_oracle_value"]["em"] == 1.0
    assert rows["kblampp"]["time_match_mass"] > 0.99 and rows["kblampp"]["time_mismatch_mass"] < 0.01
    assert rows["kblampp_eta0"]["recall@1"] < 1.0  # without the time score temporal questions tie
    assert rows["kblampp_eta0"]["time_mismatch_mass"] > 0.3
    assert rows["backbone"]["em"] == 0.0 and rows["backbone"]["recall@1"] is None  # random tiny LM
    assert rows["rag"]["recall@K"] == 1.0 and rows["rag"]["prompt_tokens"] > rows["backbone"]["prompt_tokens"]
    # test people (2, 3) never appear in training; their cities/employers partly do
    assert rows["kblampp"]["n_seen"] + rows["kblampp"]["n_unseen"] == 4
    assert payload["kb_edit"]["follow_new"] == 1.0 and payload["kb_edit"]["n_edits"] == 2
    assert payload["meta"]["max_new_tokens"] == 8 and payload["meta"]["questions"] == 4
    md = (out / "results.md").read_text(encoding="utf-8")
    assert md.count("\n| kblampp") == 7 * 4 and "KB-edit check (kblampp, 2 single-hop" in md  # 4 tables
    assert rows["lookup"]["em"] == 1.0 and rows["lookup_chain"]["em"] == 1.0  # the toy world is single-hop
    assert rows["lookup"]["abstain_precision"] is None and rows["lookup"]["em_answerable"] == 1.0
    assert "EM per question family:" in md and "lookup rows tuned on " in md
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(preds) == 4 * len(one_layer)
    head = [p for p in preds if p["row"] == "kblampp"]
    assert all(p["pred"] == p["answer"] and len(p["extra"]["cand_ids"]) == 12 for p in head)


def test_rows_without_copy_gate_are_skipped(built):
    from kblampp.evaluation.runner import EvalContext, usable_rows

    _, ec = built
    gate = ec.model.kb_copy_gate
    try:
        del ec.model.kb_copy_gate
        assert usable_rows(ec, ["backbone", "kblampp", "kblampp_injection"]) == (
            ["backbone", "kblampp_injection"], ["kblampp"])
    finally:
        ec.model.register_kb_module("kb_copy_gate", gate)
    assert isinstance(ec, EvalContext)


def test_select_questions_stratified(world):
    from kblampp.evaluation.runner import select_questions

    _, records = world
    two = select_questions(records, 2, seed=0)
    assert sorted(r.type for r in two) == ["single-hop", "temporal"]
    assert [r.qid for r in select_questions(records, 0, types=["temporal"])] == [r.qid for r in records[1::2]]
    assert [r.qid for r in select_questions(records, qids=["q1b", "q0e"])] == ["q0e", "q1b"]
    with pytest.raises(ValueError, match="qids not in the QA file: nope"):
        select_questions(records, qids=["nope"])
    with pytest.raises(ValueError, match="types: 'yes-no' is not one of"):
        select_questions(records, types=["yes-no"])


def test_run_rows_rejects_unknown_row(built):
    from kblampp.evaluation.runner import run_rows

    _, ec = built
    with pytest.raises(ValueError, match="rows: 'gpt' is not one of lookup, lookup_chain, backbone"):
        run_rows(ec, [], ["gpt"], set())


@pytest.mark.parametrize("script", ["eval/eval_qa.py", "eval/dump_evidence.py"])
def test_scripts_have_help(repo_root, script):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(repo_root / script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout and "--config" in proc.stdout


class _PieceTokenizer:
    """decode([i]) = PIECES[i]: enough for the first-line stop rule."""

    PIECES = ["", "Ann", " Lee", "\n", ".\n", "  ", "\n\n", "x"]

    def __len__(self):
        return len(self.PIECES)

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


def test_first_line_stop_ends_each_sequence_after_its_answer_line():
    from kblampp.inference.generate import FirstLineStop

    stop = FirstLineStop(_PieceTokenizer(), prompt_len=1)
    assert stop(torch.tensor([[7], [7]])).tolist() == [False, False]  # nothing generated yet
    steps = [[6, 1], [1, 2], [2, 4], [3, 7]]  # row 0: "\n\nAnn Lee\n"; row 1: "Ann Lee.\n..."
    seen = [stop(torch.tensor([[7] + [s[r] for s in steps[:k + 1]] for r in range(2)])).tolist()
            for k in range(len(steps))]
    assert seen == [[False, False], [False, False], [False, True], [True, False]]


def test_retrieval_scores_skip_unanswerable_records(world):
    from kblampp.evaluation.runner import retrieval_scores
    from kblampp.schema import qa_from_dict

    facts, records = world
    unanswerable = qa_from_dict({"qid": "u", "dataset": "t", "question": "Where was Nobody born?", "answer": "no answer",
                                 "type": "unanswerable", "supporting_facts": [], "question_time": None,
                                 "answerable": False})
    assert retrieval_scores([0, 1], [0.9, 0.1], unanswerable, facts) is None
    assert not is_seen(unanswerable, {"no answer"}) and seen_answers([unanswerable]) == set()
    assert retrieval_scores([], [], records[0], facts) is None
    assert retrieval_scores([records[0].supporting_facts[0]], [1.0], records[0], facts)["recall@1"] == 1.0
