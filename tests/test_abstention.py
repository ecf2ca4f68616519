"""The abstention decision: features on hand-made signals, the head and its threshold, calibration,
near-miss reasons, the generation path (forced and trained) in the tiny evaluation world."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kblampp.abstention import (ABSTAIN_FEATURES, Abstainer, AbstainSignals, KBAbstainHead, abstain_reason,  # noqa: E402
                                abstention_features, calibrate_threshold, head_from_tensors, head_named, miss_reason,
                                names_head,
                                model_abstainer, near_misses, prf, windows_overlap)
from kblampp.training.abstention_phase import AbstentionData, calibrate, fit_head  # noqa: E402

INF = math.inf
F = {name: i for i, name in enumerate(ABSTAIN_FEATURES)}


def hand_signals(tau=(100.0, 200.0), gate=0.25) -> AbstainSignals:
    """One row: 3 candidates + an empty slot; the top (alpha 0.5) has window [0, 50] (before the question)."""
    alpha = torch.tensor([[0.25, 0.5, 0.25, 0.0]])
    cand = torch.tensor([[7, 3, 9, -1]])
    parts = torch.tensor([[[1.0, 0.5, -1.0], [2.0, 0.25, -2.0], [0.5, 0.0, 1.0], [9.0, 9.0, 9.0]]])
    windows = torch.tensor([[[150.0, INF], [0.0, 50.0], [-INF, 80.0], [0.0, 1.0]]])
    return AbstainSignals(alpha, cand, parts, windows, torch.tensor([tau]), torch.tensor([gate]))


def test_features_on_hand_made_signals():
    f = abstention_features(hand_signals(), gamma=2.0, eta=1.0)[0]
    assert f.shape == (len(ABSTAIN_FEATURES),)
    ent = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)) / math.log(3)
    # s = sem + 2 phi + g: [1.0, 0.5, 1.5] (the empty slot is ignored)
    expected = {"max_alpha": 0.5, "alpha_entropy": ent, "top_sem": 2.0, "top_phi": 0.25, "top_g_time": -2.0,
                "top_score": 1.5, "score_margin": 0.5, "max_sem": 2.0, "sem_spread": 2.0 - 3.5 / 3, "max_phi": 0.5,
                "any_time_ok": 1.0, "top_time_ok": 0.0, "time_ok_mass": 0.25, "best_sem_time_ok": 0.0,
                "sem_lost_to_time": 1.0, "has_time": 1.0, "copy_gate": 0.25,
                "second_alpha": 0.25, "sem_gap": 1.0, "sem_lost": 0.0, "phi_lost": 0.25,
                "best_sem_group_time_ok": 0.0, "top_group_time_ok": 0.0, "best_sem_g_time": -2.0, "min_g_time": -2.0,
                "group_mass": 0.5, "head_mass": 0.5, "n_heads": 3.0, "n_relations": 3.0, "beta": 0.0,
                "top_head_named": 0.0, "any_head_named": 0.0, "named_mass": 0.0}  # no name signal given
    assert set(expected) == set(ABSTAIN_FEATURES)
    for name, value in expected.items():
        assert f[F[name]].item() == pytest.approx(value, abs=1e-6), name


def test_name_check_features_and_head_named():
    names = {7: "Alice Miller", 3: "Troy Sims", 9: "Richard Smith"}
    named = head_named(["Which city is Troy Sims's home?"], torch.tensor([[7, 3, 9, -1]]), names.__getitem__)
    assert named.tolist() == [[False, True, False, False]]  # the possessive still names him; -1 never named
    f = abstention_features(hand_signals()._replace(head_named=named), gamma=2.0, eta=1.0)[0]
    assert [f[F[n]].item() for n in ("top_head_named", "any_head_named", "named_mass")] == [1.0, 1.0, 0.5]
    assert names_head("where does a. miller live?", "Alice Miller")  # initials and lower case
    assert names_head("Who employs RICHARD SMITH now?", "Richard Smith")
    assert not names_head("Which city is Richard Moore's home?", "Richard Smith")  # a namesake is not the entity
    assert not names_head("Where was Ann born?", "")


def test_group_features_read_the_candidates_fact_fields():
    """Candidates 0 and 1 share head 5 and relation 1: the top's group holds candidate 0, whose window fits."""
    sig = hand_signals()._replace(head_ids=torch.tensor([[5, 5, 6, 0]]), rel_ids=torch.tensor([[1, 1, 1, 0]]),
                                  beta=torch.tensor([0.3]))
    f = abstention_features(sig, gamma=2.0, eta=1.0)[0]
    got = {n: f[F[n]].item() for n in ("top_group_time_ok", "best_sem_group_time_ok", "group_mass", "head_mass",
                                       "n_heads", "n_relations", "top_time_ok", "beta")}
    assert got == pytest.approx({"top_group_time_ok": 1.0, "best_sem_group_time_ok": 1.0, "group_mass": 0.75,
                                 "head_mass": 0.75, "n_heads": 2.0, "n_relations": 1.0, "top_time_ok": 0.0,
                                 "beta": 0.3})
    two = abstention_features([sig, hand_signals()], 2.0, 1.0)  # two inject layers: side by side
    assert two.shape == (1, 2 * len(ABSTAIN_FEATURES)) and torch.equal(two[:, :len(ABSTAIN_FEATURES)], f[None])
    with pytest.raises(ValueError, match="no layer signals"):
        abstention_features([], 1.0, 1.0)


def test_state_projection_and_checkpoint_round_trip():
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(50, 6, generator=gen) * torch.tensor([5.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    head = KBAbstainHead(hidden=0, state_dims=2, d_state=6)
    head.fit_state(states)
    proj = head.state_proj
    assert torch.allclose(proj.T @ proj, torch.eye(2), atol=1e-5)  # orthonormal directions
    assert abs(proj[0, 0].item()) > 0.99 and abs(proj[1, 1].item()) > 0.99  # the two widest axes, in order
    feats = torch.zeros(50, len(ABSTAIN_FEATURES))
    x = head.inputs(feats, states)
    assert x.shape == (50, len(ABSTAIN_FEATURES) + 2)
    assert torch.allclose(x[:, -2:], (states - states.mean(0)) @ proj, atol=1e-5)
    with pytest.raises(ValueError, match="question state"):
        head.inputs(feats)
    tiny = KBAbstainHead(state_dims=8, d_state=6)
    tiny.fit_state(states[:3])  # 3 states span at most 3 directions: the other columns stay 0
    assert tiny.state_proj[:, 3:].abs().sum() == 0 and tiny.state_proj[:, :2].abs().sum() > 0
    state = {f"kb_abstain.{k}": v for k, v in head.state_dict().items()}
    clone = head_from_tensors(state)
    assert (clone.state_dims, clone.n_features, clone.net[0].weight.shape) == (2, len(ABSTAIN_FEATURES),
                                                                                (1, len(ABSTAIN_FEATURES) + 2))
    clone.load_state_dict(head.state_dict())
    assert torch.equal(clone(feats, states), head(feats, states))
    old = {"kb_abstain.net.0.weight": torch.zeros(32, 17), "kb_abstain.net.2.weight": torch.zeros(1, 32),
           "kb_abstain.mean": torch.zeros(17)}
    with pytest.warns(UserWarning, match="17 features"):
        assert head_from_tensors(old) is None


def test_dev_folds_cover_dev_once():
    from kblampp.training.abstention_phase import dev_folds

    folds = dev_folds(11, 3, seed=4)
    assert [len(f) for f in folds] == [4, 4, 3]
    assert sorted(np.concatenate(folds).tolist()) == list(range(11))
    assert [f.tolist() for f in folds] == [f.tolist() for f in dev_folds(11, 3, seed=4)]


def test_no_question_time_means_every_window_fits():
    f = abstention_features(hand_signals(tau=(math.nan, math.nan)), 1.0, 1.0)[0]
    assert (f[F["any_time_ok"]], f[F["top_time_ok"]], f[F["has_time"]], f[F["time_ok_mass"]]) == (1.0, 1.0, 0.0, 1.0)
    assert (f[F["best_sem_time_ok"]], f[F["sem_lost_to_time"]]) == (1.0, 0.0)
    ok = windows_overlap(torch.tensor([[100.0, 200.0], [math.nan, math.nan]]),
                         torch.tensor([[[150.0, INF], [0.0, 50.0]], [[0.0, 1.0], [5.0, 6.0]]]))
    assert ok.tolist() == [[True, False], [True, True]]


def test_head_probability_threshold_and_checkpoint_shape():
    head = KBAbstainHead(hidden=4)
    with torch.no_grad():
        for p in head.net.parameters():
            p.zero_()
        head.net[2].bias.fill_(math.log(3.0))  # p = sigmoid(log 3) = 0.75 for every input
    sig = hand_signals()
    assert Abstainer(head, None, 1.0, 1.0, 0.75).decide(sig)[0].tolist() == [True]
    assert Abstainer(head, None, 1.0, 1.0, 0.76).decide(sig)[0].tolist() == [False]
    assert Abstainer(head, None, 1.0, 1.0, 0.75).probability(sig).item() == pytest.approx(0.75)
    state = {f"kb_abstain.{k}": v for k, v in head.state_dict().items()}
    assert set(state) >= {"kb_abstain.threshold", "kb_abstain.mean", "kb_abstain.std"}
    clone = head_from_tensors(state)
    assert clone.net[0].weight.shape == (4, len(ABSTAIN_FEATURES))
    assert head_from_tensors({"kb_copy_gate.proj.weight": torch.zeros(1)}) is None


def test_prf_and_calibration_respect_the_answerable_budget():
    lab = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    assert prf(np.array([1, 1, 0, 1, 0, 0, 0, 0], bool), lab) == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    p = np.array([0.9, 0.8, 0.4, 0.85, 0.1, 0.2, 0.3, 0.05])
    ok = torch.tensor([False, False, False, True, True, True, True, True])
    data = AbstentionData(torch.zeros(8, 1), torch.tensor(lab, dtype=torch.float32), ok, ["u"] * 3 + ["a"] * 5)
    t, m = calibrate(p, data, max_answerable_loss=0.0)  # may not abstain on the right answer at 0.85
    # the best t is 0.9, moved halfway down to the next score (0.85): the same questions abstain
    assert t == pytest.approx(0.875) and m["recall"] == pytest.approx(1 / 3) and m["abstained_answerable_right"] == 0.0
    t, m = calibrate(p, data, max_answerable_loss=0.2)
    assert t == pytest.approx(0.35) and m["recall"] == 1.0 and m["precision"] == pytest.approx(0.75)
    # unanswerable scored below every answerable question answered right: no threshold is admissible
    t, m = calibrate_threshold(np.array([0.1, 0.9]), np.array([True, False]), np.array([False, True]), 0.0)
    assert t > 0.9 and m["f1"] == 0.0 and m["abstained_answerable"] == 0.0


def test_fit_head_learns_separable_signals():
    gen = torch.Generator().manual_seed(0)
    n = 200
    labels = (torch.arange(n) % 5 == 0).float()  # 20% unanswerable: low max alpha, no time fit
    feats = torch.rand(n, len(ABSTAIN_FEATURES), generator=gen)
    feats[:, F["max_alpha"]] = torch.where(labels > 0, 0.2, 0.8) + 0.05 * torch.rand(n, generator=gen)
    data = AbstentionData(feats, labels, labels == 0, ["x"] * n)
    head = KBAbstainHead(hidden=8)
    report = fit_head(head, data, steps=300, lr=0.02, batch=64, progress=False)
    assert report["train_unanswerable"] == 40 and report["train_loss"] < 0.1
    with torch.no_grad():
        assert ((head(feats) >= 0.5).float() == labels).all()
    with pytest.raises(ValueError, match="answerable and unanswerable"):
        fit_head(KBAbstainHead(), AbstentionData(feats, torch.zeros(n), labels == 0, ["x"] * n), 1, 0.1, 8,
                 progress=False)


def test_near_miss_reasons():
    tau = (11000.0, 11400.0)  # 2000-02-11 .. 2001-03-18 in days
    assert miss_reason("Where was Ada Byron born?", None, "Alan Turing", (-INF, INF)) == "entity_missing"
    assert miss_reason("Who employed Ada Byron in 2000?", tau, "Ada Byron", (0.0, 100.0)) == "time_outside"
    assert miss_reason("Who employed Ada Byron in 2000?", tau, "Ada Byron", (0.0, INF)) == "relation_missing"
    assert miss_reason("Where was ada byron born?", None, "Ada Byron", (0.0, 1.0)) == "relation_missing"
    cands = [{"index": 1, "head": "Ada Byron", "relation": "employer", "tail": "X", "time_window": ["1833", "1843"],
              "alpha": 0.6},
             {"index": 2, "head": "Alan Turing", "relation": "employer", "tail": "Y", "time_window": [None, None],
              "alpha": 0.4}]
    misses = near_misses("Who employed Ada Byron in 2000?", tau, cands)
    assert [m["reason"] for m in misses] == ["time_outside", "entity_missing"]
    assert misses[0]["why"] == "the fact's time window is outside the question's time" and misses[0]["tail"] == "X"
    assert abstain_reason(misses) == "time_outside"
    assert abstain_reason(misses[1:]) == "entity_missing" and abstain_reason([]) == "entity_missing"
    assert len(near_misses("q", None, cands, limit=1)) == 1


# ------------------------------------------------------------------------ the generation path, tiny world
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from eval_world import build_world

    tmp = tmp_path_factory.mktemp("abstainworld")
    return tmp, build_world(tmp)


def _unanswerable(qid: str, question: str, qt: dict | None, reason: str) -> dict:
    return {"qid": qid, "dataset": "toy", "question": question, "answer": "no answer", "type": "unanswerable",
            "family": f"unans_{reason.split('_')[0]}", "answerable": False, "supporting_facts": [],
            "question_time": qt, "answer_fact": None, "unanswerable_reason": reason}


def _records(tmp: Path) -> list:
    import json

    from kblampp.schema import qa_from_dict

    rows = [json.loads(x) for x in (tmp / "test.jsonl").read_text(encoding="utf-8").splitlines()]  # all answered right
    rows += [_unanswerable("u1", "Where was Zed Q99 Moe born?", None, "entity_missing"),
             _unanswerable("u2", "Where was Kim Z77 Fox born?", None, "entity_missing"),
             _unanswerable("u3", "Who employed Ann P00 in 1950?", {"start": "1950", "end": "1950"}, "time_outside"),
             _unanswerable("u4", "Who employed P03 Lee in 1960?", {"start": "1960", "end": "1960"}, "time_outside")]
    return [qa_from_dict(r) for r in rows]


def _run(ec, records, rows=("kblampp", "kblampp_no_abstention")):
    """Per row: (generations, the request's last-token records), through the evaluation's own path."""
    from kblampp.backbone import answer_instruction
    from kblampp.evaluation.baselines import backbone_prompts
    from kblampp.inference.generate import generate_rows

    q = torch.from_numpy(np.asarray(ec.embed([r.question for r in records]), dtype=np.float32))
    prompts = backbone_prompts(ec.tokenizer, records, answer_instruction(ec.cfg.abstain_answer))
    out = {}
    for row in rows:
        req = ec.kb_request(q, records, row)
        gens = generate_rows(ec.model, ec.tokenizer, prompts, ec.cfg.max_new_tokens, batch_size=4, request=req,
                             progress=False)
        out[row] = (gens, [req.records[i] for i in range(len(records))])
    return out


def test_forced_abstention_writes_the_abstain_answer(built):
    tmp, ec = built
    records = _records(tmp)[:4]
    if not hasattr(ec.model, "kb_abstain"):
        ec.model.register_kb_module("kb_abstain", KBAbstainHead(hidden=4))  # untrained: p in (0, 1)
    try:
        ec.abstainer = model_abstainer(ec.model, threshold=0.0)  # a config threshold of 0 forces it
        res = _run(ec, records)
        assert [g.output for g in res["kblampp"][0]] == ["unknown"] * 4
        assert all(r.abstained is True and 0.0 < r.p_unanswerable < 1.0 for r in res["kblampp"][1])
        assert [g.pred for g in res["kblampp_no_abstention"][0]] == [r.answer for r in records]
        assert all(r.abstained is None for r in res["kblampp_no_abstention"][1])
        ec.abstainer = model_abstainer(ec.model, threshold=2.0)  # never
        res = _run(ec, records, ("kblampp",))
        assert [g.pred for g in res["kblampp"][0]] == [r.answer for r in records]
        assert all(r.abstained is False for r in res["kblampp"][1])
    finally:
        ec.abstainer = None


def test_trained_decision_abstains_on_unanswerable_and_explains(built):
    from kblampp.evaluation.runner import collect_evidence
    from kblampp.training.abstention_phase import train_abstention

    tmp, ec = built
    records = _records(tmp)
    ec.cfg.abstention.steps, ec.cfg.abstention.lr, ec.cfg.abstention.hidden = 300, 0.02, 8
    ec.cfg.abstention.max_answerable_loss = 0.0
    ec.cfg.abstention.state_dims, ec.cfg.abstention.dev_folds = 4, 2  # the question state and cross-fitting on
    with torch.enable_grad():
        with pytest.raises(ValueError, match="abstention.name_check: .* needs the facts"):
            train_abstention(ec.model, ec.tokenizer, ec.cfg, ec.source, records, records, ec.embed, tmp / "cache",
                             progress=False)
        report = train_abstention(ec.model, ec.tokenizer, ec.cfg, ec.source, records, records, ec.embed,
                                  tmp / "cache", progress=False, facts=ec.facts)
    try:
        assert report["dev"]["f1"] == 1.0 and report["dev_unanswerable"] == 4 and report["kbs"] == 1
        assert float(ec.model.kb_abstain.threshold) == pytest.approx(report["threshold"])
        ec.abstainer = model_abstainer(ec.model)  # the calibrated threshold from the head
        gens, _ = _run(ec, records, ("kblampp",))["kblampp"]
        answerable = [r.raw.get("answerable", True) for r in records]
        assert [g.output == "unknown" for g in gens] == [not a for a in answerable]
        assert [g.pred for g, a in zip(gens, answerable) if a] == [r.answer for r in records[:4]]
        ev = collect_evidence(ec, records[-4:], batch_size=4, progress=False)
        assert all(e["abstained"] and e["pred_answer"] == "unknown" for e in ev)
        assert [e["abstain_reason"] for e in ev] == ["entity_missing", "entity_missing", "time_outside", "time_outside"]
        assert all(m["reason"] in ("entity_missing", "time_outside", "relation_missing") for m in ev[0]["near_misses"])
    finally:
        ec.abstainer = None
    with torch.enable_grad():  # a grown KB (here the same one again) adds each question's rows once more
        twice = train_abstention(ec.model, ec.tokenizer, ec.cfg, ec.source, records, records, ec.embed,
                                 tmp / "cache", progress=False, facts=ec.facts, grown=[(ec.source, ec.facts)])
    assert twice["kbs"] == 2 and twice["train_n"] == 2 * report["train_n"] and twice["dev"]["f1"] == 1.0


def test_abstention_twin_and_run_rows_regenerate_only_abstained(built):
    from kblampp.evaluation.kbqa import KB_VARIANTS, abstention_twin
    from kblampp.evaluation.runner import run_rows

    assert abstention_twin(KB_VARIANTS["kblampp_no_abstention"], {"kblampp": None}) == "kblampp"
    assert abstention_twin(KB_VARIANTS["kblampp_no_abstention"], {"kblampp_eta0": None}) is None
    assert abstention_twin(KB_VARIANTS["kblampp"], {"kblampp_no_abstention": None}) is None
    tmp, ec = built
    records = _records(tmp)[:4]
    if not hasattr(ec.model, "kb_abstain"):
        ec.model.register_kb_module("kb_abstain", KBAbstainHead(hidden=4))
    try:
        ec.abstainer = model_abstainer(ec.model, threshold=0.0)
        results, requests, _ = run_rows(ec, records, ["kblampp", "kblampp_no_abstention"], set(), batch_size=4,
                                        progress=False)
        assert [r.output for r in results["kblampp"]] == ["unknown"] * 4
        assert [r.pred for r in results["kblampp_no_abstention"]] == [r.answer for r in records]
        assert all(r.extra["abstained"] is None for r in results["kblampp_no_abstention"])
        assert len(requests["kblampp_no_abstention"].records) == 4  # all four were abstained on: regenerated
    finally:
        ec.abstainer = None


def test_signal_analysis_auc_and_tables():
    import kblampp.evaluation.abstention_signals as mod

    assert mod.auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert mod.auc(np.array([1.0]), np.array([2.0])) == 1.0  # folded: a feature that ranks the other way
    assert mod.auc(np.array([1.0, 3.0]), np.array([1.0, 2.0])) == 0.625  # a tie counts half
    names = ("max_alpha", "copy_gate")
    feats = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.1], [0.2, 0.2]])
    fams = ["single_hop", "single_hop", "unans_entity", "unans_entity"]
    text = mod.signal_tables(feats, fams, np.array([0, 0, 1, 1], bool), np.array([1, 1, 0, 0], bool),
                             np.array([0, 0, 1, 0], bool), names, shown=names)
    assert "| single_hop | 2 | 0.00 | 0.85 | 0.15 |" in text and "| unans_entity | 2 | 0.50 | 0.25 | 0.15 |" in text
    assert "| unans_entity | answerable, top-alpha right | max_alpha 1.00, copy_gate 0.50 |" in text


def test_question_folds_keep_a_questions_rows_together():
    from kblampp.training.abstention_phase import dev_folds, question_folds

    plain = question_folds(np.arange(11), 3, seed=4)
    assert [f.tolist() for f in plain] == [f.tolist() for f in dev_folds(11, 3, seed=4)]
    questions = np.concatenate([np.arange(11), np.arange(11)])  # each question once per KB
    folds = question_folds(questions, 3, seed=4)
    assert sorted(np.concatenate(folds).tolist()) == list(range(22))
    for fold in folds:
        assert set(questions[fold].tolist()) & set(np.delete(questions, fold).tolist()) == set()


def test_the_decision_reads_linked_candidates_as_run_time_does(built):
    """With `name_link` the signals the decision trains on hold the facts each question names first,
    as `KBInjection.select` keeps them at run time; without the facts, training refuses."""
    import dataclasses

    from kblampp.evaluation.kbqa import request_times
    from kblampp.training.abstention_phase import question_hidden, question_signals, train_abstention

    tmp, ec = built
    records = _records(tmp)[:2]
    h, e = question_hidden(ec.model, ec.tokenizer, ec.cfg, records, ec.embed, tmp / "cache_link", False)
    times = request_times(ec.model, ec.source, records)
    plain = question_signals(ec.model, ec.source, h, e, times)
    far = [i for i in plain.cand_ids[0].tolist() if i >= 0][-1]  # the last candidate (the tiny KB has few)
    assert int(plain.cand_ids[0, 0]) != far
    linked = question_signals(ec.model, ec.source, h, e, times, linked=torch.tensor([[far], [-1]]))
    assert int(linked.cand_ids[0, 0]) == far and torch.equal(linked.cand_ids[1], plain.cand_ids[1])
    cfg = dataclasses.replace(ec.cfg, name_link=True, abstention=dataclasses.replace(ec.cfg.abstention, name_check=False))
    with pytest.raises(ValueError, match=r"^name_link: .* needs the facts \(or set name_link=false\)$"):
        train_abstention(ec.model, ec.tokenizer, cfg, ec.source, records, records, ec.embed, tmp / "cache_link",
                         progress=False)
