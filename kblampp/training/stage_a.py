"""Stage A: backbone frozen, KB modules trained in phases (each on by a non-zero step count):

  1. retrieval  - contrastive query/key/scorer training on cached inject-layer states (no LLM forward)
     time       - the time score's per-kind rows: the answer among its same-(head, relation) facts
  2. copy_gate  - the answer head's gate on cached plain-LM log-probs and the trained retrieval
  3. value      - teacher-forced gold facts, answer CE through the injection path
  4. e2e        - real retrieval: mixture CE + injection CE + retrieval loss
  5. abstention - the `kb_abstain` decision on cached signals, threshold calibrated on dev (runs when
                  the training questions include unanswerable ones)

Run folder: config.resolved.yaml, metrics.jsonl, progress.json, cache/, checkpoints/<phase>/step_*/,
and at the end kb_final.safetensors (KBLaMPP's kb_ tensors, `kblampp.kb_params` format) and
kv_encoder.safetensors. With a trained K/V encoder the store is re-encoded and its index rebuilt, so
the store matches the checkpoint.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kblampp import hf_arch
from kblampp.answer_head import KBCopyGate
from kblampp.config import KBConfig, save_resolved
from kblampp.data import QADataset, answerable_records
from kblampp.kb_params import save_kb_checkpoint
from kblampp.model import KBLaMPP
from kblampp.schema import Fact, QARecord
from kblampp.training.abstention_phase import train_abstention
from kblampp.training.cache import cached_question_states
from kblampp.training.common import StageModules
from kblampp.training.copy_gate_phase import CopyGateTrainer, answer_position_cache
from kblampp.training.e2e_phase import E2ETrainer
from kblampp.training.extra_worlds import load_extra_worlds
from kblampp.training.facts import FactTable, hard_negatives
from kblampp.training.loop import Trainer, load_kb_state, make_accelerator
from kblampp.training.retrieval_phase import RetrievalData, RetrievalTrainer, init_query_from_keys
from kblampp.training.time_phase import TimeTrainer
from kblampp.training.hop_phase import HopTrainer, copy_query_side, hop_data, init_bridge
from kblampp.question_time import parse_time_constraint
from kblampp.time_query import QuestionTimes, anchor_fact_of, gold_anchor_times
from kblampp.training.value_phase import ValueTrainer

PHASES = ("retrieval", "time", "copy_gate", "value", "e2e", "hops")


@dataclass
class StageAInputs:
    """Everything Stage A reads; `load_inputs(cfg)` builds it from the config, tests build it by hand."""

    cfg: KBConfig
    backbone: torch.nn.Module
    tokenizer: Any
    embed: Callable[[list[str]], np.ndarray]  # question/fact text -> normalised float32 (the store's model)
    d_ctx: int
    facts: Sequence[Fact]
    table: FactTable
    kv: Any  # KVEncoder (a copy; trained here)
    tail_table: torch.Tensor
    train_qa: Sequence[QARecord]
    dev_qa: Sequence[QARecord]
    store: Any = None  # KBValueStore, re-encoded at the end when the encoder was trained
    abstain_train: Sequence[QARecord] = ()  # every training question, unanswerable ones too (abstention phase)
    abstain_dev: Sequence[QARecord] = ()
    extra_facts: Sequence[Fact] = ()  # training-only worlds for the retrieval phase (not in the KB)
    extra_qa: Sequence[QARecord] = ()  # questions about them, fact ids shifted past the KB's facts


def load_inputs(cfg: KBConfig, progress: bool = True) -> StageAInputs:
    """Backbone, tokenizer, embedder, the built store (raw embeddings, encoder, tail tokens) and QA."""
    from kblampp.answer_head import load_or_build_tail_table
    from kblampp.backbone import load_backbone
    from kblampp.embedding import load_embedder
    from kblampp.kb_store import KBValueStore
    from kblampp.schema import load_facts, load_qa

    backbone, tokenizer = load_backbone(cfg)
    embedder = load_embedder(cfg.embedding_model)
    store = KBValueStore.load(cfg.store_dir, embedder=embedder)
    facts = load_facts(store.root / "facts.jsonl")
    table = FactTable.from_store(store, facts)
    tail_table = load_or_build_tail_table(store, [f.tail_name for f in facts], tokenizer)
    # unanswerable questions carry no answer fact to train retrieval or the answer head on;
    # the abstention phase reads them all
    all_train = load_qa(cfg.train_dataset, num_facts=store.n)
    all_dev = load_qa(cfg.eval_dataset, num_facts=store.n) if cfg.eval_dataset else []
    extra_facts, extra_qa = load_extra_worlds(cfg.stage_a.retrieval_extra_facts, cfg.stage_a.retrieval_extra_qa,
                                              offset=store.n)
    return StageAInputs(cfg, backbone, tokenizer, lambda texts: embedder.encode(texts, progress=progress),
                        embedder.dim, facts, table, copy.deepcopy(store.encoder), tail_table,
                        answerable_records(all_train), answerable_records(all_dev), store, all_train, all_dev,
                        extra_facts, answerable_records(extra_qa))


def build_model(cfg: KBConfig, backbone: torch.nn.Module, d_ctx: int) -> KBLaMPP:
    """KBLaMPP with the answer head's copy gate registered; everything frozen (phases unfreeze)."""
    model = KBLaMPP(backbone, cfg, d_ctx=d_ctx)
    model.register_kb_module("kb_copy_gate", KBCopyGate(hf_arch.hidden_size(backbone)))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _subset(records: Sequence[QARecord], limit: int, seed: int) -> list[QARecord]:
    if limit <= 0 or limit >= len(records):
        return list(records)
    keep = np.sort(np.random.default_rng(seed).permutation(len(records))[:limit])
    return [records[i] for i in keep]


def gold_times(records: Sequence[QARecord], facts: Sequence[Fact], cfg: KBConfig) -> QuestionTimes:
    """The questions' constraints as parsed, anchored ones dated by their gold anchor fact."""
    parsed = [parse_time_constraint(r.question, cfg.reference_date) for r in records]
    return gold_anchor_times(parsed, [r.supporting_facts for r in records], lambda i: anchor_fact_of(facts[i]),
                             [r.question for r in records])


def training_times(records: Sequence[QARecord], facts: Sequence[Fact], cfg: KBConfig) -> list[tuple[float, float, int]]:
    """(lo, hi, kind) per question from its text (the parser every row uses); anchored constraints
    (succession, relative) take their dates from the gold anchor fact, the first supporting fact. A
    question the parser finds no time in keeps its record's window (kind read from the window)."""
    times = gold_times(records, facts, cfg)
    tau, kind = times.tensors()
    out = []
    for r, c, (lo, hi), k in zip(records, times.used, tau.tolist(), kind.tolist()):
        if c is None and r.tau is not None:
            out.append((float(r.tau[0]), float(r.tau[1]), -1))
        else:
            out.append((lo, hi, k))
    return out


def _retrieval_data(ds: QADataset, states: dict[int, torch.Tensor], table: FactTable, n_hard: int) -> RetrievalData:
    b = ds.batch(range(len(ds)))
    answers = [ex.answer_fact for ex in ds.examples]
    return RetrievalData(states, b["e_q"], b["tau"], b["answer_fact"], b["supporting"],
                         [ex.qtype for ex in ds.examples],
                         hard_negatives(table, answers, [ex.supporting for ex in ds.examples], n_hard),
                         b.get("time_kind"))


class StageA:
    """Holds the model and data of one Stage A run; `run()` trains the phases in order (resumable)."""

    def __init__(self, inp: StageAInputs, run_dir: str | Path | None = None, progress: bool = True):
        self.inp, self.cfg, self.progress = inp, inp.cfg, progress
        self.run_dir = Path(run_dir or inp.cfg.output_dir)
        self.acc = make_accelerator(self.cfg)
        if self.acc.device.type == "cuda" and self.cfg.quantization is None:  # one GPU per process
            inp.backbone.to(self.acc.device)
        self.model = build_model(self.cfg, inp.backbone, inp.d_ctx)
        device = next(inp.backbone.parameters()).device  # KB modules, encoder and facts live beside it
        for mod in (self.model.kb_layers, self.model.kb_copy_gate, inp.kv, getattr(self.model, "kb_hop_choice", None)):
            if mod is not None:
                mod.to(device)
        self.mods = StageModules(self.cfg, self.model, inp.kv, inp.table.to(device))
        for p in inp.kv.parameters():
            p.requires_grad_(False)
        self.trainer = Trainer(self.cfg, self.mods.holder, self.run_dir, self.acc, progress)
        sa = self.cfg.stage_a
        pad = inp.tokenizer.pad_token_id if inp.tokenizer.pad_token_id is not None else inp.tokenizer.eos_token_id
        self.pad = int(pad)
        train = _subset(answerable_records(inp.train_qa), sa.max_train_questions, self.cfg.seed)
        self.train_ds = QADataset(train, inp.tokenizer, np.zeros((len(train), 1), np.float32), self.cfg.max_seq_len,
                                  times=training_times(train, inp.facts, self.cfg))
        dev = _subset(answerable_records(inp.dev_qa), sa.dev_max_questions, self.cfg.seed)
        self.dev_ds = QADataset(dev, inp.tokenizer, np.zeros((len(dev), 1), np.float32), self.cfg.max_seq_len,
                                times=training_times(dev, inp.facts, self.cfg)) if dev else None
        self.extra_ds = None  # questions of the training-only worlds (retrieval phase), ids past the KB's
        if inp.extra_qa:
            everything = list(inp.facts) + list(inp.extra_facts)
            self.extra_ds = QADataset(list(inp.extra_qa), inp.tokenizer, np.zeros((len(inp.extra_qa), 1), np.float32),
                                      self.cfg.max_seq_len, times=training_times(inp.extra_qa, everything, self.cfg))
        self.timings: dict[str, float] = {}
        self.hop_cache: dict[int, dict[str, torch.Tensor]] = {}

    # ---- caches ---------------------------------------------------------------------------------
    def _states(self, ds: QADataset, facts: Sequence[Fact] | None = None) -> dict[int, torch.Tensor]:
        """The first inject layer's state at the last prompt token (plain backbone) + e_q; with more
        inject layers the same forward keeps every layer's residual / attention output for the hop
        phase (`self.hop_cache[id(ds)]`). `facts`: what the records' ids index (default: the KB's)."""
        prompts = [ex.input_ids[:ex.prompt_len] for ex in ds.examples]
        times = gold_times(ds.records, facts or self.inp.facts, self.cfg)  # e_q's text as at run time (relative questions)
        questions = [times.query_text(i, r.question) for i, r in enumerate(ds.records)]
        layers = self.model.inject_layers
        cached = cached_question_states(self.run_dir / "cache", self.model.backbone, self.cfg.backbone, prompts,
                                        questions, layers[0], self.pad, self.inp.embed, self.cfg.stage_a.cache_batch,
                                        self.progress, hop_layers=layers if len(layers) > 1 else None)
        ds.set_context(cached["e_q"])
        if len(layers) > 1:  # the hop phase's residual / attention states
            self.hop_cache[id(ds)] = cached
        return {int(layers[0]): cached["hidden"]}

    def first_layer_modules(self) -> dict[int, Any]:
        """Retrieval and time phases train the first inject layer on its cached states; later layers
        start from it (`copy_query_side`) and are trained by the hop phase."""
        return {self.mods.first_layer: self.model.kb_layers[str(self.mods.first_layer)]}

    def restore_completed(self) -> None:
        """On resume: load the KB tensors of the last completed phase's final checkpoint."""
        done = self.trainer.completed()
        last = [name for name in PHASES if name in done]
        if last:
            folder = self.trainer.latest_checkpoint(last[-1])
            if folder is not None:
                from safetensors.torch import load_file

                load_kb_state(self.mods.holder, load_file(str(folder / "kb.safetensors")), str(folder))

    # ---- phases ---------------------------------------------------------------------------------
    def run(self, resume: bool = True) -> dict[str, Any]:
        cfg, sa, mods = self.cfg, self.cfg.stage_a, self.mods
        if resume:
            self.restore_completed()
        rank, world = self.acc.process_index, self.acc.num_processes
        results: dict[str, Any] = {}
        t0 = time.perf_counter()
        train_states = self._states(self.train_ds)
        dev_states = self._states(self.dev_ds) if self.dev_ds is not None else None
        self.timings["cache_s"] = time.perf_counter() - t0
        train_data = _retrieval_data(self.train_ds, train_states, mods.table, sa.hard_negatives).to(mods.device)
        dev_data = (_retrieval_data(self.dev_ds, dev_states, mods.table, 0).to(mods.device)
                    if dev_states is not None else None)
        if sa.negatives not in ("train_worlds", "all"):
            raise ValueError(f"stage_a.negatives: {sa.negatives!r} is not one of train_worlds, all")
        retr = self._kb_retrieval(train_data, dev_data, rank, world)
        fresh = "retrieval" not in self.trainer.completed() and self.trainer.latest_checkpoint("retrieval") is None
        t0 = time.perf_counter()
        phase_retr = self._with_extra_worlds(retr, train_data, dev_data, rank, world) if not (
            resume and "retrieval" in self.trainer.completed()) else retr
        self.timings["extra_worlds_s"] = time.perf_counter() - t0
        if sa.query_init_scale > 0 and (fresh or not resume):
            for kb in mods.layer_modules().values():
                init_query_from_keys(kb, mods.kv, sa.query_init_scale)
            results["retrieval_init"] = phase_retr.eval_fn(0)
            self.trainer.metrics.write(phase="retrieval", step=0, eval=results["retrieval_init"])
        t0 = time.perf_counter()
        results["retrieval"] = self.trainer.run(phase_retr.phase(mods.layer_names(), "kv"), resume)
        self.timings["retrieval_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if sa.time_steps > 0:
            timer = TimeTrainer(cfg, self.first_layer_modules(), mods.table, train_data, retr.keys().detach(),
                                dev_data, rank, world)
            results["time"] = self.trainer.run(timer.phase(mods.layer_names()), resume)
        self.timings["time_s"] = time.perf_counter() - t0
        multi_hop = len(self.model.inject_layers) > 1
        if multi_hop and not (resume and "hops" in self.trainer.completed()):
            copy_query_side(self.model)

        t0 = time.perf_counter()
        if sa.copy_gate_steps > 0:
            results["copy_gate"] = self._copy_gate(retr, train_data, resume, rank, world)
        self.timings["copy_gate_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        value = ValueTrainer(mods, self.train_ds, rank, world).phase()
        value.params = self._encoder_filter(value.params)
        results["value"] = self.trainer.run(value, resume)
        self.timings["value_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        params = self._encoder_filter(mods.params(query=True, value=True, keys=True, gate=True))
        e2e = E2ETrainer(mods, self.train_ds, self.inp.tail_table, rank, world)
        e2e.columns = retr.columns
        results["e2e"] = self.trainer.run(e2e.phase(params, sa.e2e_steps, sa.e2e_lr), resume)
        self.timings["e2e_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if multi_hop and sa.hop_steps > 0:
            results["hops"] = self._hops(retr, train_data, dev_data, resume, rank, world)
        self.timings["hops_s"] = time.perf_counter() - t0
        if sa.e2e_steps > 0 or sa.value_steps > 0:  # retrieval after the joint phases, as evaluation sees it
            results["retrieval_final"] = retr.eval_fn(sa.e2e_steps)
            self.trainer.metrics.write(phase="final", step=sa.e2e_steps, retrieval=results["retrieval_final"])
        t0 = time.perf_counter()
        if cfg.abstention.steps > 0 and any(not r.answerable for r in self.inp.abstain_train):
            results["abstention"] = self._abstention()
        self.timings["abstention_s"] = time.perf_counter() - t0
        self.finish(results)
        return results

    def _kb_retrieval(self, train: RetrievalData, dev: RetrievalData | None, rank: int, world: int
                      ) -> RetrievalTrainer:
        """Retrieval over the KB's facts and training questions: what every phase after the first uses."""
        sa, mods = self.cfg.stage_a, self.mods
        fixed = None if sa.train_kv_encoder else mods.tensor_kb(grad=False).K.detach()
        retr = RetrievalTrainer(self.cfg, self.first_layer_modules(), mods.table, train, dev,
                                key_encoder=mods.kv if sa.train_kv_encoder else None, fixed_keys=fixed,
                                rank=rank, world=world)
        if sa.negatives == "train_worlds":
            retr.restrict_negatives(mods.table.world_mask({r.raw.get("world") for r in self.train_ds.records} - {None}))
        return retr

    def _with_extra_worlds(self, retr: RetrievalTrainer, train: RetrievalData, dev: RetrievalData | None,
                           rank: int, world: int) -> RetrievalTrainer:
        """The retrieval phase's trainer: `retr` itself, or with training-only worlds (not in the KB) their
        facts appended to the table (softmax columns too) and their questions to the training data."""
        if self.extra_ds is None:
            return retr
        if not self.cfg.stage_a.train_kv_encoder:
            raise ValueError("stage_a.retrieval_extra_facts needs stage_a.train_kv_encoder: true (the extra facts "
                             "have no keys in the store)")
        mods, extra = self.mods, self.inp.extra_facts
        table = mods.table.concat(FactTable.from_facts(extra, self.inp.embed).to(mods.device))
        states = self._states(self.extra_ds, list(self.inp.facts) + list(extra))
        data = train.concat(_retrieval_data(self.extra_ds, states, table, self.cfg.stage_a.hard_negatives).to(mods.device))
        out = RetrievalTrainer(self.cfg, self.first_layer_modules(), table, data, dev, key_encoder=mods.kv,
                               rank=rank, world=world)
        base = retr.columns if retr.columns is not None else torch.ones(mods.table.num_facts, dtype=torch.bool,
                                                                         device=mods.device)
        out.restrict_negatives(torch.cat([base, torch.ones(len(extra), dtype=torch.bool, device=mods.device)]))
        return out

    def _encoder_filter(self, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
        if self.cfg.stage_a.train_kv_encoder:
            return params
        return {n: p for n, p in params.items() if not n.startswith("kv.")}

    def _copy_gate(self, retr: RetrievalTrainer, data: RetrievalData, resume: bool, rank: int, world: int) -> dict:
        sa = self.cfg.stage_a
        done = self.trainer.completed()
        if resume and "copy_gate" in done:  # nothing to train: skip the LM pass that builds the cache
            return done["copy_gate"]
        n = len(self.train_ds)
        rows = np.sort(np.random.default_rng(self.cfg.seed + 5).permutation(n)[:min(sa.copy_gate_questions, n)]).tolist()
        layer = self.mods.first_layer
        cache = answer_position_cache(self.model.backbone, self.train_ds, rows, layer,
                                      batch_size=max(1, sa.cache_batch // 2), progress=self.progress)
        keys = retr.keys().detach()
        cand, alpha, _ = retr.candidates(layer, data, torch.tensor(rows, device=data.e_q.device), keys)
        gate = CopyGateTrainer(self.cfg, self.model.kb_copy_gate, cache, cand, alpha, self.inp.tail_table,
                               hf_arch.vocab_size(self.model.backbone), rank, world)
        return self.trainer.run(gate.phase(self.mods.params(gate=True)), resume)

    def _hops(self, retr: RetrievalTrainer, train: RetrievalData, dev: RetrievalData | None, resume: bool,
              rank: int, world: int) -> dict[str, Any]:
        """Per-hop retrieval and the hop choice on the cached last-token states (kblampp.training.hop_phase)."""
        layers = [int(x) for x in self.model.inject_layers]
        kb = self.mods.tensor_kb(grad=False)
        make = lambda ds, base: hop_data(self.hop_cache[id(ds)], base, ds.records, layers, self.inp.facts)  # noqa: E731
        trainer = HopTrainer(self.cfg, self.model, self.mods.table, kb.K, kb.V, make(self.train_ds, train),
                             make(self.dev_ds, dev) if dev is not None else None, retr.columns, rank, world)
        if not (resume and "hops" in self.trainer.completed()):
            init = init_bridge(self.model, self.mods.kv, trainer.train.residual, self.cfg)
            kb = self.mods.tensor_kb(grad=False)  # values now carry the tail's embedding
            trainer.values = kb.V.detach()
            self.trainer.metrics.write(phase="hops", step=0, init=init, eval=trainer.eval_fn(0))
        return self.trainer.run(trainer.phase(self.mods.layer_names()), resume)

    def _abstention(self) -> dict[str, Any]:
        """The abstention decision on cached signals (the KB modules as trained); threshold from dev."""
        if self.cfg.abstention.grown_stores:
            raise ValueError("abstention.grown_stores: train/train_abstention.py reads them on a finished run (a "
                             "grown store is encoded by the trained K/V encoder, which Stage A is still training)")
        report = train_abstention(self.model, self.inp.tokenizer, self.cfg, self.mods.tensor_kb(grad=False),
                                  self.inp.abstain_train, self.inp.abstain_dev, self.inp.embed, self.run_dir / "cache",
                                  self.progress, facts=self.inp.facts)
        self.cfg.abstention.threshold = report["threshold"]  # saved with the checkpoint and the run's config
        if self.acc.is_main_process:
            save_resolved(self.cfg, self.run_dir)
        self.trainer.metrics.write(phase="abstention", step=self.cfg.abstention.steps, eval=report)
        return report

    # ---- outputs --------------------------------------------------------------------------------
    def finish(self, results: dict[str, Any]) -> None:
        """kb_final.safetensors + kv_encoder.safetensors; the store re-encoded if the encoder trained."""
        if not self.acc.is_main_process:
            return
        from kblampp.kv_encoder import save_kv_encoder

        save_kb_checkpoint(self.model, self.cfg, self.run_dir / "kb_final.safetensors")
        save_kv_encoder(self.mods.kv, self.run_dir / "kv_encoder.safetensors")
        if self.cfg.stage_a.train_kv_encoder and self.inp.store is not None:
            results["store"] = reencode_store(self.cfg, self.inp.store, self.run_dir / "kv_encoder.safetensors",
                                              self.progress)
        (self.run_dir / "stage_a_summary.json").write_text(
            json.dumps({"results": results, "timings_s": self.timings}, indent=1, default=float), encoding="utf-8")


def reencode_store(cfg: KBConfig, store: Any, encoder_path: Path, progress: bool = True) -> dict:
    """Recompute K/V with the trained encoder (raw embeddings reused) and rebuild every index of the store."""
    from kblampp.kb_store import build_store_index, encode_file
    from kblampp.knowledge_index import config_params

    source = (store.manifest.get("source") or {}).get("path") or cfg.tuples_path
    methods = sorted(p.name[len("index_"):] for p in Path(store.root).glob("index_*") if p.is_dir())
    report = encode_file(source, store.root, store.manifest["embedding_model"], store.d_k, store.d_v,
                         int(store.manifest.get("d_tau", cfg.d_tau)), store.d_ctx, encoder_path,
                         store.manifest["dtype"], progress=progress)
    rebuilt = []
    for method in methods:
        build_store_index(store.root, method, cfg.index.similarity, **config_params(cfg.index, method))
        rebuilt.append(method)
    return {"reused_raw": report["reused_raw"], "indexes_rebuilt": rebuilt}
