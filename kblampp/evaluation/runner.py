"""eval_qa end to end: load the model, store and questions once, run every row on the same questions
with the same prompt builder / budget / extraction, score, and write the one table.

`EvalContext` holds what the rows share; `load_eval_context` builds it from a config and a KB
checkpoint, tests build it by hand with tiny models and stores.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kblampp.backbone import answer_instruction
from kblampp.config import KBConfig
from kblampp.evaluation.baselines import (FactRetriever, backbone_prompts, context_prompts, oracle_fact_ids,
                                          rag_fact_ids)
from kblampp.inference.generate import Generation, generate_rows, generate_with_followers
from kblampp.inference.loading import build_source, load_model, resolve_checkpoint
from kblampp.evaluation.hop_metrics import hop_summary, markdown_hops
from kblampp.evaluation.kbqa import (KB_VARIANTS, MULTI_HOP_VARIANTS, KBRequest, LastTokenRecord, abstention_twin,
                                     kb_request, prefill_followers, request_times, time_free_twin)
from kblampp.evaluation.lookup_rows import LOOKUP_ROWS, LookupRows, load_dev
from kblampp.evaluation.report import QuestionResult, is_seen, record_answerable, record_family
from kblampp.evaluation.retrieval_metrics import score_question
from kblampp.metrics import score_answer
from kblampp.name_link import NameIndex
from kblampp.progress import format_duration, format_rate, status
from kblampp.schema import QA_TYPES, Fact, QARecord
from kblampp.time_query import query_vectors

log = logging.getLogger(__name__)

PROMPT_ROWS = ("backbone", "rag", "oracle_context")
ALL_ROWS = LOOKUP_ROWS + PROMPT_ROWS + tuple(KB_VARIANTS)
DEFAULT_ROWS = ("lookup", "lookup_chain", "backbone", "rag", "oracle_context", "kblampp", "kblampp_no_abstention",
                "kblampp_injection", "kblampp_gamma0", "kblampp_eta0", "kblampp_oracle_value")


@dataclass
class EvalContext:
    """Everything the rows share. `embed(texts) -> (n, d_ctx)` is the store's embedding model."""

    cfg: KBConfig
    model: Any  # KBLaMPP (patched); with no KB request it is the plain backbone
    tokenizer: Any
    embed: Any
    store: Any  # KBValueStore
    source: Any  # KBSource used by the KBLaMPP rows
    facts: list[Fact]
    tail_table: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    lookup: LookupRows | None = None  # built and dev-tuned on first use, shared by every later call
    abstainer: Any = None  # kblampp.abstention.Abstainer when the checkpoint has the decision
    names: NameIndex | None = None  # the facts' head names, when `cfg.name_link` (kblampp.name_link)

    def lookup_rows(self, progress: bool = True) -> LookupRows:
        """The no-LLM rows over this KB (fact texts embedded once, tuned on the config's dev split)."""
        if self.lookup is None:
            alive = np.asarray(self.store.alive, dtype=bool) if self.store is not None else None
            self.lookup = LookupRows.build(self.facts, self.embed, self.cfg.abstain_answer, alive,
                                           reference_date=self.cfg.reference_date)
            self.lookup.names, self.lookup.name_limit = self.names, self.cfg.name_link_limit
            dev, label = load_dev(self.cfg.eval_dataset, len(self.facts))
            self.lookup.tune(dev, label)
            if self.cfg.abstention.lookup_threshold is not None:  # the config's floor beats the tuned one
                self.lookup.lookup_settings.min_score = float(self.cfg.abstention.lookup_threshold)
                self.lookup.tuned_on += f"; similarity floor {self.cfg.abstention.lookup_threshold} from the config"
        return self.lookup

    def kb_request(self, q_vecs: torch.Tensor, records: Sequence[QARecord], row: str,
                   times: Any = None) -> KBRequest:
        """The KB request of one KBLaM++ row (`times`: the questions' parsed constraints, from
        `request_times`); rows that abstain write `cfg.abstain_answer`."""
        from kblampp.abstention import answer_token_ids
        from kblampp.inference.generate import stop_token_id

        ids = answer_token_ids(self.tokenizer, self.cfg.abstain_answer) if self.abstainer is not None else None
        return kb_request(self.model, self.source, q_vecs, records, KB_VARIANTS[row], self.tail_table,
                          reference_date=self.cfg.reference_date, times=times, abstainer=self.abstainer,
                          abstain_ids=ids, stop_id=stop_token_id(self.tokenizer),
                          head_name=self._head_name if self.cfg.abstention.name_check else None,
                          linked=self.linked(records))

    def linked(self, records: Sequence[QARecord]) -> torch.Tensor | None:
        """(n, L) the facts whose head each question names, -1 padded; None without `name_link`."""
        if self.names is None:
            return None
        return torch.from_numpy(self.names.linked_ids([r.question for r in records], self.cfg.name_link_limit))

    def _head_name(self, index: int) -> str:
        return self.facts[index].head_name


def load_eval_context(cfg: KBConfig, checkpoint: str | Path, progress: bool = True) -> EvalContext:
    """Backbone + KB checkpoint, embedder, store (+ index), facts and the answer head's tail table."""
    from kblampp.abstention import model_abstainer
    from kblampp.answer_head import load_or_build_tail_table
    from kblampp.embedding import load_embedder
    from kblampp.kb_store import KBValueStore
    from kblampp.schema import load_facts

    t0 = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint)
    embedder = load_embedder(cfg.embedding_model, device=cfg.device)
    store = KBValueStore.load(cfg.store_dir, embedder=embedder)
    model, tokenizer = load_model(cfg, ckpt, embedder.dim)
    facts = load_facts(store.root / "facts.jsonl")
    tail_table = load_or_build_tail_table(store, [f.tail_name for f in facts], tokenizer)
    source, _ = build_source(cfg, store)
    abstainer = model_abstainer(model, cfg.abstention.threshold)
    names = NameIndex([f.head_name for f in facts], np.asarray(store.alive, bool)) if cfg.name_link else None
    info = {"checkpoint": str(ckpt), "store_dir": str(store.root), "n_facts": store.n,
            "answer_head": hasattr(model, "kb_copy_gate"), "load_s": round(time.perf_counter() - t0, 2),
            "abstain_threshold": None if abstainer is None else abstainer.threshold}
    return EvalContext(cfg, model, tokenizer, lambda texts: embedder.encode(texts, progress=progress),
                       store, source, facts, tail_table, info, abstainer=abstainer, names=names)


def select_questions(records: Sequence[QARecord], max_questions: int = 0, types: Sequence[str] | None = None,
                     qids: Sequence[str] | None = None, seed: int = 0) -> list[QARecord]:
    """Filter by qid / type, then a seeded, type-stratified subset of at most `max_questions`
    (file order kept), so a small run still covers every question type."""
    out = list(records)
    if qids:
        known = {r.qid for r in out}
        missing = [q for q in qids if q not in known]
        if missing:
            raise ValueError(f"qids not in the QA file: {', '.join(missing[:5])}")
        wanted = set(qids)
        out = [r for r in out if r.qid in wanted]
    if types:
        bad = [t for t in types if t not in QA_TYPES]
        if bad:
            raise ValueError(f"types: {bad[0]!r} is not one of {', '.join(QA_TYPES)}")
        out = [r for r in out if r.type in types]
    if max_questions <= 0 or len(out) <= max_questions:
        return out
    rng = np.random.default_rng(seed)
    groups = {t: [i for i, r in enumerate(out) if r.type == t] for t in dict.fromkeys(r.type for r in out)}
    order = {t: list(rng.permutation(idx)) for t, idx in groups.items()}
    chosen: list[int] = []
    while len(chosen) < max_questions:  # round robin over types
        for t in groups:
            if order[t] and len(chosen) < max_questions:
                chosen.append(int(order[t].pop(0)))
    return [out[i] for i in sorted(chosen)]


def _results(row: str, records: Sequence[QARecord], gens: Sequence[Generation], seen: set[str], abstain_answer: str,
             retrieval: Sequence[dict | None] | None = None, extra: Sequence[dict] | None = None) -> list[QuestionResult]:
    out = []
    for i, (rec, gen) in enumerate(zip(records, gens)):
        answerable = record_answerable(rec)
        s = score_answer(gen.output, rec.aliases, rec.question, answerable=answerable, abstain_answer=abstain_answer)
        out.append(QuestionResult(row=row, qid=rec.qid, type=rec.type, seen=is_seen(rec, seen), answer=rec.answer,
                                  output=gen.output, pred=str(s["pred"]), em=float(s["em"]), f1=float(s["f1"]),
                                  contained=float(s["contained"]), prompt_tokens=gen.prompt_tokens,
                                  retrieval=None if retrieval is None else retrieval[i],
                                  extra={} if extra is None else extra[i], family=record_family(rec),
                                  answerable=answerable, em_lenient=float(s["em_lenient"]),
                                  abstained=bool(s["abstained"])))
    return out


def retrieval_scores(cand_ids: Sequence[int], weights: Sequence[float], record: QARecord,
                     facts: Sequence[Fact]) -> dict | None:
    """Retrieval metrics of one question; None where they do not apply (no supporting facts: an
    unanswerable question, or nothing retrieved)."""
    if not record.supporting_facts or not list(cand_ids):
        return None
    return score_question(cand_ids, weights, record, facts).as_dict()


def lookup_results(ec: EvalContext, records: Sequence[QARecord], q_vecs: np.ndarray, seen: set[str],
                   progress: bool = True) -> tuple[dict[str, list[QuestionResult]], dict[str, float]]:
    """Both no-LLM rows and their seconds; their retrieval columns rank the fact(s) each copied from."""
    answers, seconds = ec.lookup_rows(progress).answer(records, q_vecs)
    out = {}
    for row, found in answers.items():
        gens = [Generation(output=a.answer, pred=a.answer, prompt_tokens=0) for a in found]
        ret = [retrieval_scores(a.fact_ids[::-1], [1.0] * len(a.fact_ids), rec, ec.facts)
               for a, rec in zip(found, records)]
        extra = [{"fact_ids": a.fact_ids, "score": round(a.score, 4)} for a in found]
        out[row] = _results(row, records, gens, seen, ec.cfg.abstain_answer, ret, extra)
    return out, seconds


def rag_retrieval_scores(ids: Sequence[Sequence[int]], records: Sequence[QARecord],
                         facts: Sequence[Fact]) -> list[dict | None]:
    """RAG's own retrieval, scored like the KB rows: rank weights stand in for alpha (best = top);
    the time masses do not apply to it."""
    out = []
    for row, rec in zip(ids, records):
        best_first = list(row)[::-1]  # rag_fact_ids writes the best last
        weights = [float(len(best_first) - j) for j in range(len(best_first))]
        d = retrieval_scores(best_first, weights, rec, facts)
        if d is not None:
            d["time_match_mass"] = d["time_mismatch_mass"] = None
        out.append(d)
    return out


@torch.no_grad()
def run_rows(ec: EvalContext, records: Sequence[QARecord], rows: Sequence[str], seen: set[str],
             batch_size: int = 16, rag_k: int | None = None, progress: bool = True, batch_tokens: int | None = None
             ) -> tuple[dict[str, list[QuestionResult]], dict[str, KBRequest], dict[str, float]]:
    """Every requested row on the same questions: (results per row, KB requests per KB row, seconds per row).
    A generate() batch holds at most `batch_size` questions and `batch_tokens` padded prompt tokens."""
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        raise ValueError(f"rows: {unknown[0]!r} is not one of {', '.join(ALL_ROWS)}")
    if not records:
        raise ValueError("no questions to evaluate")
    budget, abstain = ec.cfg.max_new_tokens, ec.cfg.abstain_answer
    instruction = answer_instruction(abstain)
    plain = backbone_prompts(ec.tokenizer, records, instruction)
    q_vecs = np.asarray(ec.embed([r.question for r in records]), dtype=np.float32)  # once, for every row
    times = request_times(ec.model, ec.source, records, ec.embed, ec.facts, ec.cfg.reference_date)
    kb_vecs = query_vectors(ec.embed, [r.question for r in records], times, q_vecs)  # the KB rows' e_q
    timed = [i for i, c in enumerate(times.parsed) if c is not None]  # g_time can be non-zero (first/last too)
    results: dict[str, list[QuestionResult]] = {}
    requests: dict[str, KBRequest] = {}
    seconds: dict[str, float] = {}
    kb_done: dict[str, tuple[list[Generation], list[LastTokenRecord]]] = {}
    followed: dict[str, tuple[KBRequest, list[Generation], float]] = {}  # row -> (request, answers, seconds)
    for row in rows:
        t0, moved, carried = time.perf_counter(), 0.0, 0.0  # follower seconds: moved out of / into this row
        gen_kwargs = dict(batch_size=batch_size, desc=row, progress=progress, batch_tokens=batch_tokens)
        if row in LOOKUP_ROWS:
            if row not in results:  # both rows in one pass; each row's own seconds are kept
                found, lookup_seconds = lookup_results(ec, records, q_vecs, seen, progress)
                results.update({k: v for k, v in found.items() if k in rows})
            seconds[row] = round(lookup_seconds[row], 2)
            continue
        elif row == "backbone":
            gens = generate_rows(ec.model, ec.tokenizer, plain, budget, **gen_kwargs)
            results[row] = _results(row, records, gens, seen, abstain)
        elif row == "rag":
            alive = np.asarray(ec.store.alive, dtype=bool)
            retriever = FactRetriever(np.asarray(ec.store.raw("e_c")), alive=alive)
            ids = rag_fact_ids(retriever, q_vecs, rag_k or ec.cfg.K_top)
            prompts = context_prompts(ec.tokenizer, records, ec.facts, ids, instruction)
            gens = generate_rows(ec.model, ec.tokenizer, prompts, budget, **gen_kwargs)
            results[row] = _results(row, records, gens, seen, abstain, rag_retrieval_scores(ids, records, ec.facts),
                                    [{"context_ids": list(i)} for i in ids])
        elif row == "oracle_context":
            prompts = context_prompts(ec.tokenizer, records, ec.facts, oracle_fact_ids(records), instruction)
            gens = generate_rows(ec.model, ec.tokenizer, prompts, budget, **gen_kwargs)
            results[row] = _results(row, records, gens, seen, abstain)
        else:
            # a row that differs from a finished one only in eta equals it on questions without a time
            # (g_time is exactly 0 there): generate only the timed questions, reuse the rest
            twin = time_free_twin(KB_VARIANTS[row], kb_done)
            idx = list(range(len(records))) if twin is None else timed
            sibling = abstention_twin(KB_VARIANTS[row], kb_done) if twin is None else None
            if sibling is not None:  # the same row with the decision on: redo only what it abstained on
                twin, idx = sibling, [i for i, r in enumerate(kb_done[sibling][1]) if r.abstained]
            sub = [records[i] for i in idx]
            gens, last = (list(kb_done[twin][0]), list(kb_done[twin][1])) if twin else ([None] * len(records),
                                                                                           [None] * len(records))
            if sibling is not None:
                last = [replace(r, abstained=None, p_unanswerable=None) for r in last]
            if row in followed:  # generated with the earlier row whose prompt forward passes it shares
                req, sub_gens, carried = followed.pop(row)
            elif sub:
                req = ec.kb_request(torch.from_numpy(kb_vecs[idx]), sub, row, times=times.select(idx))
                fol = prefill_followers(row, rows) if twin is None else []
                fol_reqs = [ec.kb_request(torch.from_numpy(kb_vecs), records, f, times=times) for f in fol]
                all_gens, secs = generate_with_followers(ec.model, ec.tokenizer, [plain[i] for i in idx], budget,
                                                         batch_size, req, fol_reqs, row, progress, batch_tokens)
                sub_gens, moved = all_gens[0], sum(secs[1:])
                followed.update({f: (r, g, s) for f, r, g, s in zip(fol, fol_reqs, all_gens[1:], secs[1:])})
            if sub:
                for j, i in enumerate(idx):
                    gens[i], last[i] = sub_gens[j], req.records[j]
                requests[row] = req
            kb_done[row] = (gens, last)
            ret = [retrieval_scores(r.cand_ids, r.alpha, rec, ec.facts) for r, rec in zip(last, records)]
            extra = [{"cand_ids": r.cand_ids, "alpha": [round(a, 4) for a in r.alpha], "beta": round(r.beta, 4),
                      "copy_gate": None if r.copy_gate is None else round(r.copy_gate, 4),
                      "abstained": r.abstained,
                      "p_unanswerable": None if r.p_unanswerable is None else round(r.p_unanswerable, 4)}
                     for r in last]
            results[row] = _results(row, records, gens, seen, abstain, ret, extra)
        seconds[row] = round(time.perf_counter() - t0 - moved + carried, 2)
        status(f"row {row}: {len(records)} questions in {format_duration(seconds[row])} "
               f"({format_rate(len(records) / max(seconds[row], 1e-9), 'q')})")
    return {row: results[row] for row in rows}, requests, seconds


def usable_rows(ec: EvalContext, rows: Sequence[str]) -> tuple[list[str], list[str]]:
    """(rows to run, rows skipped): answer-head rows need a checkpoint with a copy gate."""
    has_gate = getattr(ec.model, "kb_copy_gate", None) is not None
    keep, skipped = [], []
    for row in rows:
        variant = KB_VARIANTS.get(row)
        no_hops = row in MULTI_HOP_VARIANTS and len(ec.model.inject_layers) < 2
        (skipped if variant is not None and ((variant.answer_head and not has_gate) or no_hops) else keep).append(row)
    for row in skipped:
        log.warning("row %s skipped: the checkpoint has no kb_copy_gate (answer head) or only one inject layer", row)
    return keep, skipped


def run_meta(ec: EvalContext, qa_path: str, n_questions: int, batch_size: int, rag_k: int | None,
             batch_tokens: int | None = None) -> dict[str, Any]:
    """The settings every row shares, printed above the table."""

    return {"qa": qa_path, "questions": n_questions, "backbone": ec.cfg.backbone, "max_new_tokens": ec.cfg.max_new_tokens,
            "K_top": ec.cfg.K_top, "rag_k": rag_k or ec.cfg.K_top, "retrieval": ec.cfg.retrieval,
            "n_facts": len(ec.facts), "batch_size": batch_size, "batch_tokens": batch_tokens,
            "abstain_answer": ec.cfg.abstain_answer,
            "question_time": "parsed from the question text", "instruction": answer_instruction(ec.cfg.abstain_answer)}



@torch.no_grad()
def evaluate(ec: EvalContext, qa_path: str | Path, out_dir: str | Path, rows: Sequence[str] = DEFAULT_ROWS,
             max_questions: int = 0, types: Sequence[str] | None = None, batch_size: int = 16,
             rag_k: int | None = None, kb_edit_n: int = 0, seed: int = 0, progress: bool = True,
             batch_tokens: int | None = None) -> dict[str, Any]:
    """The whole eval_qa run: questions, every row, the KB-edit check; writes results.json/.md and
    predictions.jsonl into `out_dir` and returns the JSON payload."""
    from kblampp.evaluation.kb_edit import markdown_kb_edit, run_kb_edit
    from kblampp.evaluation.report import seen_answers, write_report
    from kblampp.schema import load_qa

    records = select_questions(load_qa(qa_path, num_facts=len(ec.facts)), max_questions, types, seed=seed)
    train_path = Path(ec.cfg.train_dataset) if ec.cfg.train_dataset else None
    seen = seen_answers(load_qa(train_path)) if train_path is not None and train_path.is_file() else set()
    notes = [] if seen else [f"No training QA at {train_path}: every answer counts as unseen."]
    keep, skipped = usable_rows(ec, rows)
    notes += [f"Row {r} skipped: " + ("the model has one inject layer." if r in MULTI_HOP_VARIANTS else
                                      "the checkpoint has no answer-head copy gate.") for r in skipped]
    results, requests, seconds = run_rows(ec, records, keep, seen, batch_size, rag_k, progress, batch_tokens)
    if ec.lookup is not None:
        notes.append(ec.lookup.describe())
    shared = [r for r in keep if r in KB_VARIANTS and time_free_twin(KB_VARIANTS[r], keep[:keep.index(r)])]
    if shared:
        notes.append(f"{', '.join(shared)}: generated only for the questions with a parsed time; on the others "
                     "g_time is exactly 0, so the outputs of the same row with eta unchanged are reused (its ms/q "
                     "is per question of the whole split).")
    followers = [r for r in keep if any(r in prefill_followers(o, keep) for o in keep[:keep.index(r)]
                                        if o in KB_VARIANTS)]
    if followers:
        notes.append(f"{', '.join(followers)}: generated in the same batches as an earlier row that differs only in "
                     "its logits processors, from that row's cache of the prompt (all but its last token, which "
                     "is computed again); its ms/q excludes that shared prompt pass.")
    notes.append("ms/q = wall time of the row over all its questions (embedding the questions once and loading "
                 "excluded); measured on whatever else the machine was running.")
    extra: dict[str, Any] = {"info": ec.info, "skipped_rows": skipped, "row_seconds": seconds,
                             "lookup_setup_s": None if ec.lookup is None else round(ec.lookup.setup_s, 2)}
    if kb_edit_n > 0:
        t0 = time.perf_counter()
        extra["kb_edit"] = run_kb_edit(ec, records, kb_edit_n, batch_size, seed, progress=progress)
        status(f"kb_edit: {kb_edit_n} facts edited and asked again in {format_duration(time.perf_counter() - t0)}")
        notes.append(markdown_kb_edit(extra["kb_edit"]))
    stats = {row: {"ms_per_question": 1000.0 * s / len(records)} for row, s in seconds.items()}
    meta = run_meta(ec, str(qa_path), len(records), batch_size, rag_k, batch_tokens)
    hops = {row: s for row, req in requests.items() if len(req.records) == len(records)
            and (s := hop_summary([req.records[i] for i in range(len(records))], records, ec.facts)) is not None}
    if hops:
        extra["hops"] = hops
        notes.append(markdown_hops(hops))
    del requests
    return write_report(out_dir, results, meta=meta, extra=extra, notes=notes, row_stats=stats)


@torch.no_grad()
def collect_evidence(ec: EvalContext, records: Sequence[QARecord], row: str = "kblampp", batch_size: int = 16,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Evidence entries (plan 7.2) of one KBLaM++ row for `records`: answer, candidates, alpha."""
    from kblampp.evaluation.evidence import evidence_entry

    if row not in KB_VARIANTS:
        raise ValueError(f"row: {row!r} is not a KBLaM++ row ({', '.join(KB_VARIANTS)})")
    if not records:
        raise ValueError("no questions selected")
    keep, _ = usable_rows(ec, [row])
    if not keep:
        raise ValueError(f"row {row!r} needs the answer head, but the checkpoint has no kb_copy_gate")
    times = request_times(ec.model, ec.source, records, ec.embed, ec.facts, ec.cfg.reference_date)
    q_vecs = np.asarray(ec.embed([r.question for r in records]), dtype=np.float32)
    e_q = query_vectors(ec.embed, [r.question for r in records], times, q_vecs)
    req = ec.kb_request(torch.from_numpy(e_q), records, row, times=times)
    prompts = backbone_prompts(ec.tokenizer, records, answer_instruction(ec.cfg.abstain_answer))
    gens = generate_rows(ec.model, ec.tokenizer, prompts, ec.cfg.max_new_tokens,
                         batch_size=batch_size, request=req, desc=row, progress=progress,
                         questions=[r.question for r in records])
    return [evidence_entry(rec, gen.pred, req.records[i], ec.facts, output=gen.output, time=times.row(i))
            for i, (rec, gen) in enumerate(zip(records, gens))]
