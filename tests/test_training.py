"""Stage A / Stage B training on tiny random models and a toy world (no hub, a few steps each)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import tiny_llama

from kblampp.answer_head import build_tail_token_table, copy_mixture_log_probs
from kblampp.config import load_config
from kblampp.data import QADataset
from kblampp.kb_context import KBContext
from kblampp.kb_params import is_kb_name, load_kb_checkpoint
from kblampp.kv_encoder import KVEncoder
from kblampp.schema import fact_from_dict, qa_from_dict
from kblampp.training import losses
from kblampp.training.cache import cached_question_states, inject_layer_states
from kblampp.training.copy_gate_phase import mixture_gold_nll, pointer_at_gold
from kblampp.training.facts import FactTable, hard_negatives
from kblampp.training.loop import Phase, Trainer, lr_factor, read_metrics
from kblampp.training.retrieval_phase import full_scores
from kblampp.training.stage_a import StageA, StageAInputs, build_model
from kblampp.training.stage_b import load_stage_b, run_stage_b
from kblampp.training.toy import HashEmbedder, tiny_tokenizer, toy_facts, toy_qa

D_CTX = 32
BASE = ["inject_layers=[1]", "d_k=16", "d_v=16", "K_top=4", "batch_size=4", "grad_accum=1", "log_interval=2",
        "max_seq_len=48", "save_interval=0", "stage_a.retrieval_batch=8", "stage_a.retrieval_lr=1e-2",
        "stage_a.retrieval_eval_interval=0", "stage_a.hard_negatives=4", "stage_a.copy_gate_questions=8",
        "stage_a.cache_batch=8"]


def make_cfg(*extra: str):
    return load_config(None, BASE + list(extra))


@pytest.fixture(scope="module")
def world():
    tok, emb = tiny_tokenizer(), HashEmbedder(D_CTX)
    raw = toy_facts(6)
    facts = [fact_from_dict(f) for f in raw]
    qa = [qa_from_dict(q) for q in toy_qa(raw, range(6), "t")]
    table = FactTable.from_facts(facts, emb.encode)
    tails = build_tail_token_table([f.tail_name for f in facts], tok)
    return {"tok": tok, "emb": emb, "facts": facts, "qa": qa, "table": table, "tails": tails}


def inputs(world, cfg, dev=True) -> StageAInputs:
    return StageAInputs(cfg, tiny_llama(), world["tok"], world["emb"].encode, D_CTX, world["facts"], world["table"],
                        KVEncoder(D_CTX, 16, 16, 8, 32), world["tails"], world["qa"], world["qa"][:4] if dev else [])


# ---------------------------------------------------------------------------------------------- losses
def test_info_nce_matches_the_formula():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    pos = torch.tensor([[True, True, False], [False, False, True]])
    want = ((torch.logsumexp(s[0], 0) - torch.logsumexp(s[0, :2], 0)) + (torch.logsumexp(s[1], 0) - 3.0)) / 2
    assert torch.allclose(losses.info_nce(s, pos), want)
    assert losses.positive_mask(3, torch.tensor([[0, 1], [2, -1]])).tolist() == pos.tolist()
    with pytest.raises(ValueError, match="info_nce: a row has no positive"):
        losses.info_nce(s, torch.zeros_like(pos))


def test_hard_negative_nce_uses_only_listed_columns():
    s = torch.tensor([[1.0, 5.0, 2.0, 9.0]])
    got = losses.hard_negative_nce(s, torch.tensor([0]), torch.tensor([[2, -1]]))
    assert torch.allclose(got, torch.logsumexp(torch.tensor([1.0, 2.0]), 0) - 1.0)


def test_alpha_support_loss_and_time_penalty():
    alpha = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    cand = torch.tensor([[4, 7, 9], [1, 2, 3]])
    sup = torch.tensor([[7, 9], [5, -1]])
    loss, used = losses.alpha_support_loss(alpha, cand, sup)
    assert used == 1 and torch.allclose(loss, -torch.log(torch.tensor(0.5 + 1e-6)))
    # row 0 asks about [100, 200]; candidate windows: overlapping, before, after; row 1 has no time
    cmin = torch.tensor([[150.0, 0.0, 300.0], [0.0, 0.0, 0.0]])
    cmax = torch.tensor([[math.inf, 99.0, 400.0], [1.0, 1.0, 1.0]])
    tau = torch.tensor([[100.0, 200.0], [math.nan, math.nan]])
    assert losses.window_mismatch(cmin, cmax, tau).tolist() == [[False, True, True], [False, False, False]]
    assert torch.allclose(losses.time_penalty(alpha, cmin, cmax, tau), torch.tensor(0.5))
    # a supporting fact is never penalised
    assert torch.allclose(losses.time_penalty(alpha, cmin, cmax, tau, cand, sup), torch.tensor(0.0))


def test_answer_ce_is_shifted_cross_entropy_on_labelled_positions():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 8, 9, 10]])
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(losses.answer_ce(logits, labels), want)
    with pytest.raises(ValueError, match="no labelled answer tokens"):
        losses.answer_ce(logits, torch.full_like(labels, -100))


def test_lr_schedule():
    assert lr_factor(0, 10, 2, "cosine") == 0.5 and lr_factor(1, 10, 2, "cosine") == 1.0
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="optimizer.schedule: 'step' is not one of"):
        lr_factor(5, 10, 0, "step")


# ------------------------------------------------------------------------------------ data pieces
def test_hard_negatives_order(world):
    table = world["table"]
    # fact 1 = person 0's first employer: same (head, relation) at another time, then the head's other facts,
    # then namesakes ("Ann P..") with the same relation
    neg = hard_negatives(table, [1], [[1]], limit=4)[0].tolist()
    assert neg[:2] == [2, 0]
    assert all(table.relation_keys[i] == "employer" and table.head_keys[i] != table.head_keys[1] for i in neg[2:])
    assert hard_negatives(table, [1], [[1, 2]], limit=1)[0].tolist() == [0]


def test_fact_table_from_a_built_store_matches_the_facts(world, tmp_path):
    from kblampp.kb_store import KBValueStore, write_store

    t = world["table"]
    raw = {k: getattr(t, k).numpy() for k in ("e_h", "e_r", "e_t", "e_c")}
    write_store(tmp_path / "store", world["facts"], raw, KVEncoder(D_CTX, 16, 16, 8, 32), "toy:hash-trigram",
                progress=False)
    got = FactTable.from_store(KBValueStore.load(tmp_path / "store"), world["facts"])
    for name in ("e_h", "e_r", "e_t", "e_c", "ctx_vec"):
        assert torch.equal(getattr(got, name), getattr(t, name))
    assert torch.equal(got.tau_min, t.tau_min.float().double()) and got.head_keys == t.head_keys
    with pytest.raises(ValueError, match="store has 18 facts but the 5-tuple file has 3"):
        FactTable.from_store(KBValueStore.load(tmp_path / "store"), world["facts"][:3])


def test_world_tags_restrict_the_training_softmax(world):
    from kblampp.training.retrieval_phase import RetrievalData, RetrievalTrainer

    raw = toy_facts(4)
    for i, f in enumerate(raw):
        f["context"]["disamb"] = {"world": "w0" if i < 6 else "w1"}  # persons 0-1 vs 2-3
    facts = [fact_from_dict(f) for f in raw]
    table = FactTable.from_facts(facts, world["emb"].encode)
    assert table.world_mask({"w0"}).tolist() == [True] * 6 + [False] * 6
    assert world["table"].world_mask({"w0"}) is None  # untagged facts: no restriction
    n = 3
    data = RetrievalData({1: torch.zeros(n, 64)}, torch.zeros(n, D_CTX), torch.full((n, 2), math.nan),
                         torch.tensor([0, 4, 7]), torch.tensor([[0], [4], [7]]), ["single-hop"] * n,
                         torch.full((n, 0), -1))
    cfg = make_cfg()
    model = build_model(cfg, tiny_llama(), D_CTX)
    rt = RetrievalTrainer(cfg, {1: model.kb_layers["1"]}, table, data, key_encoder=KVEncoder(D_CTX, 16, 16, 8, 32))
    with pytest.raises(ValueError, match="a training positive lies outside the training columns"):
        rt.restrict_negatives(table.world_mask({"w0"}))
    rt.restrict_negatives(table.world_mask({"w0", "w1"}))
    loss, _, count = rt.step(0)
    assert count == 8 and torch.isfinite(loss)  # retrieval_batch rows, the 3 questions cycled


def test_cached_states_are_the_inject_layer_input_at_the_last_prompt_token(world, tmp_path):
    model = tiny_llama()
    ds = QADataset(world["qa"][:5], world["tok"], torch.zeros(5, 1).numpy(), 48)
    prompts = [ex.input_ids[:ex.prompt_len] for ex in ds.examples]
    got = inject_layer_states(model, prompts, 1, pad=0, batch_size=2, progress=False)
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1]
            want = model.model.layers[1].input_layernorm(hs)[0, -1]
        assert torch.allclose(got[i], want, atol=1e-5)
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return world["emb"].encode(texts)

    first = cached_question_states(tmp_path, model, "tiny", prompts, [r.question for r in ds.records], 1, 0, embed,
                                   progress=False)
    again = cached_question_states(tmp_path, None, "tiny", prompts, [r.question for r in ds.records], 1, 0, embed,
                                   progress=False)  # no backbone needed: read from the file
    assert calls == [5] and torch.equal(first["hidden"], again["hidden"]) and torch.equal(first["e_q"], again["e_q"])
    assert len(list(tmp_path.glob("states_*.safetensors"))) == 1
    other = [q + " (reworded)" for q in (r.question for r in ds.records)]  # same prompts, other e_q texts
    third = cached_question_states(tmp_path, model, "tiny", prompts, other, 1, 0, embed, progress=False)
    assert calls == [5, 5] and not torch.equal(third["e_q"], first["e_q"])  # not the stale e_q of the first file
    assert len(list(tmp_path.glob("states_*.safetensors"))) == 2


def test_shared_prompt_prefix_is_computed_once_with_the_same_states(world):
    from kblampp.training.cache import common_prefix_len
    from kblampp.training.copy_gate_phase import answer_position_cache

    model = tiny_llama()
    ds = QADataset(world["qa"][:4], world["tok"], torch.zeros(4, 1).numpy(), 512)  # full system prompt
    prompts = [ex.input_ids[:ex.prompt_len] for ex in ds.examples]
    plen = common_prefix_len(prompts)
    assert plen > 100 and all(p[:plen] == prompts[0][:plen] for p in prompts)
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2 and common_prefix_len([[5], [6, 7]]) == 0
    got = inject_layer_states(model, prompts, 1, pad=0, batch_size=3, progress=False)
    cache = answer_position_cache(model, ds, [0, 1, 2, 3], 1, batch_size=3, progress=False)
    for i, ex in enumerate(ds.examples):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ex.input_ids]), output_hidden_states=True)
        states = model.model.layers[1].input_layernorm(out.hidden_states[1])[0]
        assert torch.allclose(got[i], states[ex.prompt_len - 1], atol=1e-5)
        pos = torch.arange(ex.prompt_len - 1, len(ex.input_ids) - 1)
        gold = torch.tensor(ex.input_ids[ex.prompt_len:])
        logp = torch.log_softmax(out.logits[0], -1)[pos, gold]
        n = len(pos)
        assert torch.allclose(cache["lm_logp"][i, :n], logp, atol=1e-4)
        assert torch.allclose(cache["hidden"][i, :n], states[pos], atol=1e-5)
        assert cache["gold"][i, :n].tolist() == gold.tolist() and (cache["gold"][i, n:] == -1).all()


def test_full_scores_give_the_models_own_alpha(world):
    table = world["table"]
    # every fact a candidate: g_time ranks a fact among its retrieved siblings, full_scores among all of
    # them, and the two agree exactly when the search holds the whole group (a smaller K made this flaky)
    cfg = make_cfg(f"K_top={table.num_facts}")
    model = build_model(cfg, tiny_llama(), D_CTX)
    kv = KVEncoder(D_CTX, 16, 16, 8, 32)
    ds = QADataset(world["qa"], world["tok"], world["emb"].encode([r.question for r in world["qa"]]), 48)
    batch = ds.batch(range(len(ds)))
    from kblampp.training.common import StageModules

    mods = StageModules(cfg, model, kv, table)
    out, ctx = mods.forward(batch, mods.tensor_kb(grad=False), record=True)
    rec = ctx.records[1][0]
    rows = torch.arange(len(ds))
    h = rec.hidden[rows, batch["last_prompt_pos"]]
    sem, s = full_scores(model.kb_layers["1"], h, batch["e_q"], batch["tau"], kv.encode_keys(table.e_h, table.e_r),
                         table.ctx_vec, table.tau_min, table.tau_max, siblings=table.sibling_index())
    cand = rec.cand_ids[rows, batch["last_prompt_pos"]]
    assert torch.equal(cand.sort(dim=1).values, sem.topk(table.num_facts, dim=1).indices.sort(dim=1).values)
    alpha = torch.softmax(s.gather(1, cand), dim=1)
    assert torch.allclose(alpha, rec.alpha[rows, batch["last_prompt_pos"]], atol=1e-5)


def test_copy_gate_cached_mixture_equals_the_answer_heads_mixture(world):
    tails = world["tails"]
    cand = torch.tensor([[1, 0, 2], [3, 4, 5]])
    alpha = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    gold = torch.full((2, 6), -1)
    for b, fact in enumerate((1, 5)):
        toks = tails[fact][tails[fact] >= 0]
        gold[b, :len(toks)] = toks
    p_copy, mass = pointer_at_gold(tails, cand, alpha, gold, vocab=120)
    lm_logits = torch.randn(2, 6, 120, generator=torch.Generator().manual_seed(1))
    g = torch.full((2, 6), 0.7)
    want = copy_mixture_log_probs(lm_logits, alpha, cand, tails, gold, g)
    want_nll = -(want.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (gold >= 0)).sum() / (gold >= 0).sum()
    lm_logp = torch.log_softmax(lm_logits, -1).gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    got = mixture_gold_nll(g, mass, lm_logp, p_copy, (gold >= 0).float())
    assert torch.allclose(got, want_nll, atol=1e-5)
    assert p_copy[0, 0] == pytest.approx(0.6) and p_copy[1, 0] == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------- the loop
class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.kb_w = torch.nn.Parameter(torch.randn(4, generator=gen))
        self.frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)


def _toy_phase(mod: _Toy, steps: int, fail_at: int | None = None) -> Phase:
    true_w = torch.arange(4.0) * 0.5

    def step(micro: int):
        if fail_at is not None and micro == fail_at:
            raise RuntimeError("interrupted")
        x = torch.tensor([1.0 + 0.1 * (micro % 2)])
        return (((mod.kb_w - true_w) * x) ** 2).mean(), {"x": float(x)}, 4

    return Phase(name="toy", params={"kb_w": mod.kb_w}, step_fn=step, steps=steps, lr=0.1, grad_accum=2)


def test_checkpoint_resume_continues_exactly(tmp_path):
    cfg = make_cfg("save_interval=3", "log_interval=1")
    straight = _Toy()
    Trainer(cfg, straight, tmp_path / "a", progress=False).run(_toy_phase(straight, 6))
    broken = _Toy()
    with pytest.raises(RuntimeError, match="interrupted"):
        Trainer(cfg, broken, tmp_path / "b", progress=False).run(_toy_phase(broken, 6, fail_at=9))
    resumed = _Toy()  # a fresh process: initial weights, state comes from checkpoints/toy/step_0000003
    Trainer(cfg, resumed, tmp_path / "b", progress=False).run(_toy_phase(resumed, 6))
    assert torch.equal(resumed.kb_w, straight.kb_w)
    resumed_rows = read_metrics(tmp_path / "b" / "metrics.jsonl")  # rows past the checkpoint were rewritten
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5, 6]
    assert not torch.equal(resumed.kb_w, _Toy().kb_w)
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["phase"] == "toy"
    assert rows[0]["mean_loss"] > rows[-1]["mean_loss"]
    saved = load_file(str(tmp_path / "a" / "checkpoints" / "toy" / "step_0000006" / "kb.safetensors"))
    assert list(saved) == ["kb_w"] and torch.equal(saved["kb_w"], straight.kb_w)
    assert (tmp_path / "a" / "config.resolved.yaml").is_file()
    assert json.loads((tmp_path / "a" / "progress.json").read_text()) == {"toy": {}}


# ------------------------------------------------------------------------------------------ Stage A
def test_stage_a_phases_run_learn_and_touch_only_kb_tensors(world, tmp_path):
    cfg = make_cfg("stage_a.retrieval_steps=60", "stage_a.copy_gate_steps=20", "stage_a.copy_gate_lr=5e-2",
                   "stage_a.value_steps=3", "stage_a.e2e_steps=2", "stage_a.value_lr=1e-2")
    inp = inputs(world, cfg)
    before = {n: t.clone() for n, t in inp.backbone.state_dict().items()}
    stage = StageA(inp, tmp_path / "run", progress=False)
    kb_before = {n: t.clone() for n, t in stage.mods.holder.state_dict().items() if is_kb_name(n)}
    results = stage.run()
    after = inp.backbone.state_dict()
    patched = {n: n.replace("layers.1.self_attn.", "layers.1.self_attn.base_layer.") for n in before}
    assert len(after) == len(before) and all(torch.equal(before[n], after[patched[n]]) for n in before)
    kb_after = {n: t for n, t in stage.mods.holder.state_dict().items() if is_kb_name(n)}
    changed = {n for n in kb_before if not torch.equal(kb_before[n], kb_after[n])}
    assert any("kb_linear_q" in n for n in changed) and any("kb_key_mlp" in n for n in changed)
    assert any("kb_copy_gate" in n for n in changed) and any("kb_linear_v" in n for n in changed)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    retr = [r["loss"] for r in rows if r.get("phase") == "retrieval" and "loss" in r]
    assert retr[-1] < retr[0]
    assert results["retrieval"]["train"]["top1"] > 0.5  # 36 facts: chance is 1/36
    assert {"train", "dev"} <= set(results["retrieval"])
    gate = results["copy_gate"]
    assert gate["nll_gate"] < gate["nll_lm_only"]
    e2e = [r for r in rows if r.get("phase") == "e2e" and "loss" in r]
    assert e2e and {"mixture", "injection", "retrieval"} <= set(e2e[-1])
    assert (tmp_path / "run" / "config.resolved.yaml").is_file()
    fresh = build_model(cfg, tiny_llama(), D_CTX)
    saved_cfg = load_kb_checkpoint(fresh, tmp_path / "run" / "kb_final.safetensors")
    assert saved_cfg["stage_a"]["retrieval_steps"] == 60
    assert torch.equal(fresh.kb_layers["1"].kb_linear_q.weight, stage.model.kb_layers["1"].kb_linear_q.weight)
    # a rerun of a finished run trains nothing and restores the final KB tensors
    again = StageA(inputs(world, cfg), tmp_path / "run", progress=False)
    assert again.run()["retrieval"] == results["retrieval"]
    assert torch.equal(again.model.kb_copy_gate.proj.weight, stage.model.kb_copy_gate.proj.weight)
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == len(rows) + 1  # only the final retrieval row


def test_value_phase_lowers_forced_gold_answer_loss(world, tmp_path):
    cfg = make_cfg("stage_a.retrieval_steps=0", "stage_a.copy_gate_steps=0", "stage_a.value_steps=12",
                   "stage_a.e2e_steps=0", "stage_a.value_lr=3e-2", "optimizer.schedule=constant",
                   "stage_a.max_train_questions=4", "batch_size=4", "log_interval=4")
    StageA(inputs(world, cfg, dev=False), tmp_path / "v", progress=False).run()
    rows = [r for r in read_metrics(tmp_path / "v" / "metrics.jsonl") if r.get("phase") == "value"]
    assert rows[-1]["mean_loss"] < rows[0]["mean_loss"]


# ------------------------------------------------------------------------------------------ Stage B
def test_stage_b_lora_trains_adapters_and_alpha_losses(world, tmp_path):
    cfg = make_cfg("stage_a.retrieval_steps=20", "stage_a.copy_gate_steps=0", "stage_a.value_steps=0",
                   "stage_a.e2e_steps=0", "stage_b.steps=2", "stage_b.lora_layers=1", "stage_b.lr=1e-2",
                   f"output_dir={tmp_path / 'a'}")
    StageA(inputs(world, cfg), tmp_path / "a", progress=False).run()
    result = run_stage_b(inputs(world, cfg), tmp_path / "b", progress=False)
    assert result["lora_targets"] == ["model.layers.1.self_attn.base_layer.q_proj",
                                      "model.layers.1.self_attn.base_layer.v_proj"]
    rows = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r.get("phase") == "stage_b"]
    assert {"aux_alpha", "time_penalty", "mixture", "injection"} <= set(rows[-1])
    saved = load_file(str(tmp_path / "b" / "kb_final.safetensors"))
    lora_b = [n for n in saved if "lora_B.kb_lora" in n]
    assert len(lora_b) == 2 and any(saved[n].abs().sum() > 0 for n in lora_b)  # B starts at zero, so it moved
    fresh = build_model(cfg, tiny_llama(), D_CTX)
    load_stage_b(fresh, tmp_path / "b")
    state = fresh.state_dict()
    assert all(torch.equal(state[n], saved[n]) for n in saved)
    ctx = KBContext(gate_closed=True)
    ids = torch.tensor([[3, 4, 5]])
    with fresh.kb_request(ctx), torch.no_grad():
        assert torch.isfinite(fresh(input_ids=ids).logits).all()
    # the evaluation's loader (also the server's) rebuilds the same Stage B model from the run folder
    from kblampp.inference.loading import load_model

    tiny_llama().save_pretrained(tmp_path / "backbone")
    world["tok"].save_pretrained(tmp_path / "backbone")
    cfg.backbone = str(tmp_path / "backbone")
    loaded, _ = load_model(cfg, tmp_path / "b" / "kb_final.safetensors", D_CTX)
    state = loaded.state_dict()
    assert all(torch.equal(state[n], saved[n]) for n in saved)


def test_trained_encoder_rewrites_the_store_and_rebuilds_its_index(world, tmp_path):
    from kblampp.kb_store import KBValueStore, build_store_index, encode_file, open_kb
    from kblampp.training.toy import write_jsonl

    src = write_jsonl(toy_facts(6), tmp_path / "facts.jsonl")
    encode_file(src, tmp_path / "store", "toy:hash-trigram", 16, 16, d_tau=8, embedder=world["emb"], hidden=32,
                progress=False)
    build_store_index(tmp_path / "store", "flat", "ip")
    store = KBValueStore.load(tmp_path / "store")
    old_id = store.store_id
    cfg = make_cfg("stage_a.retrieval_steps=5", "stage_a.copy_gate_steps=0", "stage_a.value_steps=0",
                   "stage_a.e2e_steps=0", "index.method=flat")
    inp = inputs(world, cfg)
    inp.store, inp.kv = store, store.encoder
    inp.table = FactTable.from_store(store, world["facts"])
    result = StageA(inp, tmp_path / "run", progress=False).run()
    assert result["store"] == {"reused_raw": True, "indexes_rebuilt": ["flat"]}
    new, index = open_kb(tmp_path / "store")  # checks the index against the re-encoded store
    assert new.store_id != old_id and index is not None
    trained = load_file(str(tmp_path / "run" / "kv_encoder.safetensors"))
    enc = KVEncoder(D_CTX, 16, 16, 8, 32)
    enc.load_state_dict(trained)
    with torch.no_grad():
        keys = enc.encode_keys(torch.from_numpy(new.raw("e_h").copy()), torch.from_numpy(new.raw("e_r").copy()))
    assert torch.allclose(new.keys_tensor(), keys, atol=1e-6)


def test_stage_a_abstention_phase_saves_the_decision_and_its_threshold(world, tmp_path):
    from kblampp.abstention import KBAbstainHead, head_from_tensors
    from kblampp.kb_params import read_kb_checkpoint

    cfg = make_cfg("stage_a.retrieval_steps=30", "stage_a.copy_gate_steps=0", "stage_a.value_steps=0",
                   "stage_a.e2e_steps=0", "abstention.steps=60", "abstention.hidden=4", "abstention.lr=5e-2")
    unans = [qa_from_dict({"qid": f"u{i}", "dataset": "toy", "question": q, "answer": "no answer",
                           "type": "unanswerable", "family": fam, "answerable": False, "supporting_facts": [],
                           "question_time": qt, "answer_fact": None})
             for i, (q, qt, fam) in enumerate([
                 ("Where was Zed Q99 Moe born?", None, "unans_entity"),
                 ("Where was Kim Z77 Fox born?", None, "unans_entity"),
                 ("Who employed Ann P00 in 1950?", {"start": "1950", "end": "1950"}, "unans_time")])]
    inp = inputs(world, cfg)
    inp.abstain_train = inp.abstain_dev = list(world["qa"]) + unans
    results = StageA(inp, tmp_path / "run", progress=False).run()
    rep = results["abstention"]
    assert rep["train_unanswerable"] == 3 and rep["dev_unanswerable"] == 3 and 0.0 <= rep["dev"]["f1"] <= 1.0
    fresh = build_model(cfg, tiny_llama(), D_CTX)
    shaped = head_from_tensors(read_kb_checkpoint(tmp_path / "run" / "kb_final.safetensors")[0])
    assert isinstance(shaped, KBAbstainHead) and shaped.state_dims == cfg.abstention.state_dims
    fresh.register_kb_module("kb_abstain", shaped)
    saved = load_kb_checkpoint(fresh, tmp_path / "run" / "kb_final.safetensors")
    assert saved["abstention"]["threshold"] == pytest.approx(rep["threshold"])
    assert float(fresh.kb_abstain.threshold) == pytest.approx(rep["threshold"])
    assert load_config(tmp_path / "run" / "config.resolved.yaml").abstention.threshold == pytest.approx(rep["threshold"])
    # without unanswerable training questions the phase does not run
    plain = inputs(world, make_cfg("stage_a.retrieval_steps=2", "stage_a.copy_gate_steps=0", "stage_a.value_steps=0",
                                   "stage_a.e2e_steps=0"))
    assert "abstention" not in StageA(plain, tmp_path / "plain", progress=False).run()
    grown = inputs(world, make_cfg("stage_a.retrieval_steps=2", "stage_a.copy_gate_steps=0", "stage_a.value_steps=0",
                                   "stage_a.e2e_steps=0", "abstention.steps=5", "abstention.grown_stores=[big]"))
    grown.abstain_train = grown.abstain_dev = list(world["qa"]) + unans
    with pytest.raises(ValueError, match="abstention.grown_stores: train/train_abstention.py reads them on a finished"):
        StageA(grown, tmp_path / "grown", progress=False).run()


def test_grown_store_must_hold_the_runs_facts_first_under_the_same_encoder(world, tmp_path):
    from kblampp.kb_store import KBValueStore, write_store
    from kblampp.training.abstention_phase import grown_kb

    t, facts = world["table"], world["facts"]
    raw = {k: getattr(t, k).numpy() for k in ("e_h", "e_r", "e_t", "e_c")}
    enc = KVEncoder(D_CTX, 16, 16, 8, 32)

    def store(name, rows, encoder=enc):
        write_store(tmp_path / name, [facts[i] for i in rows], {k: v[rows] for k, v in raw.items()}, encoder,
                    "toy:hash-trigram", progress=False)
        return KBValueStore.load(tmp_path / name)

    base = store("base", list(range(12)))
    cfg = make_cfg()
    source, grown_facts = grown_kb(cfg, base, facts[:12], store("grown", list(range(18))).root)
    assert source.num_facts == 18 and [f.raw for f in grown_facts[:12]] == [f.raw for f in facts[:12]]
    with pytest.raises(ValueError, match=r"grown_stores: .*small: 12 facts, not more than the run's store's 12"):
        grown_kb(cfg, base, facts[:12], store("small", list(range(12))).root)
    with pytest.raises(ValueError, match=r"other: encoded by another K/V encoder"):
        grown_kb(cfg, base, facts[:12], store("other", list(range(18)), KVEncoder(D_CTX, 16, 16, 8, 32, seed=1)).root)
    with pytest.raises(ValueError, match=r"shuffled: facts.jsonl line 1 differs from .*base"):
        grown_kb(cfg, base, facts[:12], store("shuffled", [1, 0] + list(range(2, 18))).root)
