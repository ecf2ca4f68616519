"""The one object that answers questions and applies KB changes.

Why one lock: the patched model keeps per-request state in a shared context holder and the KB
arrays/index are mutated in place, so every model call and every mutation runs alone. Questions are
not each given the lock: concurrent ones are gathered by a `Batcher` (at most `batch_max_size`, the
oldest waiting at most `batch_max_wait_ms`) and a batch runs as one batched generate() under the
lock, so the whole batch reads one KB version. The lock is first come, first served (`FairLock`): an
answer asked after an edit was acknowledged runs in a batch formed after it, which sees the edit.
Requests wait for the lock (or for a batch to take them) at most `request_timeout_s` (then 503), and
generation is bounded by max_new_tokens. One bad question does not fail its batch: preparation and
evidence are per question, and a batch whose generate() fails is answered again one question at a time.

A mutation is validated, encoded, written to the WAL (fsync), then applied in memory, then one audit
line is appended (time, seq, op, fact indices, client address; never the token); only then is the
request acknowledged. The next question sees it.

A read-only engine never opens the WAL (nor the audit log): it serves the store as last compacted.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from kblampp.question_time import TIME_KINDS, TimeConstraint, parse_time_constraint
from kblampp.serving.batcher import Batcher, FairLock, Job
from kblampp.serving.config import ServerSettings
from kblampp.serving.kb_log import AuditLog, KBLog, LogEntry, default_audit_path, read_log
from kblampp.serving.model_answerer import AnswerItem
from kblampp.serving.schemas import ApiError
from kblampp.time_query import AnchorFact, constraint_days, hop_texts, needs_anchor, use_anchor, window_satisfies
from kblampp.timewin import window_days


class Answerer(Protocol):
    """The model side (`kblampp.serving.model_answerer`): per item (question, e_q, tau, budget,
    abstain, time kind, forced ids) a `RowAnswer`: answer line, the batch's inject-layer records
    (`KBContext.records`) with the item's row in them, and the abstention decision or None."""

    def answer_batch(self, items: Sequence[Any]) -> list[Any]: ...


class LiveKB(Protocol):
    """The mutable store + index the answerer retrieves from (see `kblampp.serving.live_kb`)."""

    applied_seq: int
    source: Any  # a kblampp.retrieval.KBSource over the live facts

    def num_slots(self) -> int: ...

    def num_live(self) -> int: ...

    def get(self, index: int) -> dict | None: ...

    def encode(self, facts: list[dict]) -> dict: ...

    def add(self, facts: list[dict], encoded: dict | None = None) -> list[int]: ...

    def replace(self, index: int, fact: dict, encoded: dict | None = None) -> None: ...

    def delete(self, index: int) -> None: ...

    def find(self, fact: dict) -> int | None: ...

    def close(self) -> None: ...

    def record(self, entry: LogEntry) -> None: ...

    def recover(self, entries: list[LogEntry]) -> int: ...

    def persist(self, applied_seq: int) -> None: ...

    def stats(self) -> dict: ...


class Embedder(Protocol):
    def encode(self, texts: list[str], batch_size: int = ..., progress: bool = ...) -> np.ndarray: ...


def _rec_get(rec: Any, name: str) -> Any:
    return rec[name] if isinstance(rec, dict) else getattr(rec, name)


def _scalar(x: Any) -> float:
    return float(x.item() if hasattr(x, "item") else x)


def _window_list(fact: dict) -> list[str | None]:
    tw = fact.get("time_window") or {}
    return [tw.get("start"), tw.get("end")]


def _satisfies(constraint: TimeConstraint | None, fact: dict) -> bool | None:
    """Whether the fact's window fits the constraint's dates (None: the constraint has none)."""
    start, end = _window_list(fact)
    return window_satisfies(constraint, *window_days(start, end))


def evidence_from_records(records: dict[int, list[Any]], kb: LiveKB, top_k: int,
                          constraint: TimeConstraint | None = None, row: int = 0) -> list[dict]:
    """The plan's top_k_facts at the last prompt token of each inject layer, highest alpha first.

    records[layer][0] is the prefill call (B rows, T=prompt length, left padded); row `row`'s last
    position is where its query retrieves before any answer token is written and where the answer
    head's pointer reads."""
    out: list[dict] = []
    for layer in sorted(records):
        calls = records[layer]
        if not calls:
            continue
        first = calls[0]
        alpha = np.asarray(_rec_get(first, "alpha")[row, -1].detach().float().cpu().numpy()
                           if hasattr(_rec_get(first, "alpha"), "detach") else _rec_get(first, "alpha")[row][-1],
                           dtype=np.float64)
        cand = _rec_get(first, "cand_ids")
        cand = np.asarray(cand[row, -1].cpu().numpy() if hasattr(cand, "cpu") else cand[row][-1], dtype=np.int64)
        beta = _scalar(_rec_get(first, "beta")[row, -1] if hasattr(_rec_get(first, "beta"), "shape")
                       else _rec_get(first, "beta")[row][-1])
        order = [j for j in np.argsort(-alpha, kind="stable") if cand[j] >= 0][:top_k]
        for j in order:
            index = int(cand[j])
            fact = kb.get(index)
            if fact is None:  # deleted facts are masked from retrieval; never report them
                continue
            out.append({"index": index, "head": fact["head"]["name"], "relation": fact["relation"]["name"],
                        "tail": fact["tail"]["name"], "context": fact["context"]["sent_span"],
                        "time_window": _window_list(fact), "alpha": float(alpha[j]), "beta": beta,
                        "layer": int(layer), "satisfies_time": _satisfies(constraint, fact)})
    return out


@dataclass
class Question:
    """One answer request waiting for a batch: the text, its resolved time constraint, its limits."""

    question: str
    shown_time: dict | None
    constraint: TimeConstraint | None
    max_new_tokens: int
    top_k: int
    kind: str
    abstain: bool


class Engine:
    """Answers (gathered into batches) and KB mutations behind one first-come lock; durable
    mutations through the WAL."""

    def __init__(self, kb: LiveKB, answerer: Answerer, embedder: Embedder, log_path: str | Path,
                 settings: ServerSettings, info: dict | None = None, audit_path: str | Path | None = None):
        self.kb, self.answerer, self.embedder, self.settings = kb, answerer, embedder, settings
        self.log_path = Path(log_path)
        self.info = dict(info or {})
        self._lock = FairLock()
        self._counts = {"answer": 0, "chat": 0, "add": 0, "replace": 0, "delete": 0, "get": 0}
        self._since_compact = 0
        self._closed = False
        self.started = time.time()
        self.log: KBLog | None = None
        self.audit: AuditLog | None = None
        if settings.read_only:  # never touch the WAL: serve the store as last compacted
            self.recovered = {"replayed": 0, "log_entries": 0, "torn_tail_dropped": False,
                              "applied_seq": self.kb.applied_seq, "read_only": True}
        else:
            self.recovered = self._recover()
            self.log = KBLog(self.log_path, next_seq=self.kb.applied_seq + 1)
            self.audit = AuditLog(audit_path or default_audit_path(self.log_path))
        # started last: a failed recovery leaves no worker thread behind
        self.batcher = Batcher(self._run_batch, settings.batch_max_size, settings.batch_max_wait_ms / 1000.0)

    # ---- durability -----------------------------------------------------------------------------
    def _recover(self) -> dict:
        """Replay the WAL into memory, fold it into the store in one commit, then truncate the WAL."""
        entries, torn = read_log(self.log_path)
        before = self.kb.applied_seq
        last = self.kb.recover(entries)
        if last > before:
            self.kb.persist(last)
        if entries or torn:
            KBLog(self.log_path, next_seq=last + 1).reset()
        return {"replayed": last - before, "log_entries": len(entries), "torn_tail_dropped": torn,
                "applied_seq": last}

    def compact(self) -> None:
        """Fold the WAL into the store (atomic store write, then atomic WAL truncation)."""
        with self._locked():
            self._compact_locked()

    def _compact_locked(self) -> None:
        self.kb.persist(self.log.next_seq - 1)
        self.log.reset()
        self._since_compact = 0

    def close(self) -> None:
        """Compact if anything changed since the last compaction, close the logs, release the store
        (idempotent)."""
        if self._closed:
            return
        self.batcher.close(ApiError(503, "server is shutting down"))  # after the batch in flight
        with self._locked():
            try:
                if self._since_compact:
                    self._compact_locked()
                for handle in (self.log, self.audit):
                    if handle is not None:
                        handle.close()
            finally:
                self._closed = True
                self.kb.close()

    # ---- locking --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[float]:
        t0 = time.perf_counter()
        if not self._lock.acquire(timeout=self.settings.request_timeout_s):
            raise ApiError(503, f"server busy: waited {self.settings.request_timeout_s:.0f} s for the model",
                           headers={"Retry-After": "1"})
        try:
            if self._closed:
                raise ApiError(503, "server is shutting down")
            yield (time.perf_counter() - t0) * 1000.0
        finally:
            self._lock.release()

    def _after_change(self) -> None:
        self._since_compact += 1
        if self.settings.compact_every and self._since_compact >= self.settings.compact_every:
            self._compact_locked()

    # ---- questions ------------------------------------------------------------------------------
    def resolve_time(self, question: str, question_time: dict | None, reference_date: str | None = None
                     ) -> tuple[dict | None, TimeConstraint | None]:
        """The typed constraint used: the request's (kind read from the window when not given), else
        the one parsed from the question text (with the request's or the config's reference date)."""
        if question_time is not None:
            start, end = question_time.get("start"), question_time.get("end")
            kind = question_time.get("kind") or ("before" if start is None and end is not None else
                                                 "after" if end is None and start is not None else "at")
            c, source = TimeConstraint(kind, start, end, question_time.get("anchor")), "request"
        else:
            c = parse_time_constraint(question, reference_date or self.info.get("reference_date"))
            if c is None:
                return None, None
            source = "parsed"
        return {"kind": c.kind, "start": c.start, "end": c.end, "anchor": c.anchor, "source": source}, c

    def _anchor(self, question: str, c: TimeConstraint, shown: dict) -> tuple[TimeConstraint, dict]:
        """Date a succession / relative constraint by the answerer's first retrieval of its anchor;
        also the keyword arguments (forced candidates) the answer call needs."""
        first_hop = getattr(self.answerer, "anchor_fact", None)
        if not needs_anchor(c) or first_hop is None:
            return c, {}
        select, search = hop_texts(question, c)
        e = self.embedder.encode([select, search], progress=False)
        index, siblings = first_hop(e[0], e[1])
        fact = self.kb.get(index)
        if fact is None:
            return c, {}
        info = AnchorFact(fact["relation"]["name"], *_window_list(fact), fact["head"]["name"], fact["tail"]["name"])
        use = use_anchor(question, c, index, siblings, info)
        shown.update(anchor_fact=index, resolved={"start": use.used.start, "end": use.used.end})
        if use.query_text is None:  # succession
            return use.used, ({"forced_ids": use.forced} if use.forced else {})
        shown.update(query_text=use.query_text)
        return use.used, {"excluded_ids": use.excluded,
                          "e_q": self.embedder.encode([use.query_text], progress=False)[0]}

    def answer(self, question: str, question_time: dict | None, max_new_tokens: int, top_k: int,
               kind: str = "answer", abstain: bool = True, reference_date: str | None = None) -> dict:
        """The answer with its evidence; when the model abstains, `answer` is None, `abstained` True and
        `near_misses` lists the candidates with the reason each one does not answer. The question joins
        the next batch; `kb_seq` is the last KB change (WAL sequence number) its batch saw."""
        t0 = time.perf_counter()
        shown_time, constraint = self.resolve_time(question, question_time, reference_date)
        try:
            job = self.batcher.submit(Question(question, shown_time, constraint, max_new_tokens, top_k, kind, abstain))
        except RuntimeError:
            raise ApiError(503, "server is shutting down") from None
        try:
            out = self.batcher.wait(job, self.settings.request_timeout_s)
        except TimeoutError:
            raise ApiError(503, f"server busy: waited {self.settings.request_timeout_s:.0f} s for the model",
                           headers={"Retry-After": "1"}) from None
        out["timings"]["total_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        tau = out.pop("_tau")
        if out["abstained"]:
            from kblampp.abstention import abstain_reason, near_misses

            out["near_misses"] = near_misses(question, tau, out["evidence"], top_k)
            out["abstain_reason"] = abstain_reason(out["near_misses"])
        return out

    def kb_seq(self) -> int:
        """The sequence number of the last KB change applied in memory (the KB version answers read)."""
        return self.log.next_seq - 1 if self.log is not None else int(self.kb.applied_seq)

    def _run_batch(self, jobs: Sequence[Job]) -> None:
        """The batcher's worker: the whole batch under the lock, so it reads one KB version."""
        try:
            with self._locked():
                self._answer_jobs(jobs)
        except ApiError as err:  # the lock was not free within request_timeout_s, or shutting down
            for job in jobs:
                if not job.done.is_set():
                    job.finish(error=err)

    def _embed(self, questions: list[str]) -> list[np.ndarray | Exception]:
        """Question vectors in one encode call; on failure one by one, so only a bad question fails."""
        try:
            return list(self.embedder.encode(questions, progress=False))
        except Exception:  # noqa: BLE001 - retried per question below; its own error goes to its request
            out: list[np.ndarray | Exception] = []
            for q in questions:
                try:
                    out.append(self.embedder.encode([q], progress=False)[0])
                except Exception as err:  # noqa: BLE001 - delivered to that request only
                    out.append(err)
            return out

    def _prepare(self, q: "Question", e_q: np.ndarray) -> tuple[AnswerItem, TimeConstraint | None, Any]:
        """The model's input for one question (anchored constraint, window, kind, forced candidates)."""
        constraint, extra = q.constraint, {}
        if constraint is not None:
            constraint, extra = self._anchor(q.question, constraint, q.shown_time)
            extra["time_kind"] = TIME_KINDS.index(constraint.kind)
        lo, hi = constraint_days(constraint)
        tau = None if lo != lo else (lo, hi)  # NaN: no dates
        e_q = extra.pop("e_q", e_q)  # a dated relative question queries without its clause
        return AnswerItem(q.question, e_q, tau, q.max_new_tokens, q.abstain, **extra), constraint, tau

    def _generate(self, items: list[AnswerItem]) -> list[Any]:
        """One batched generate(); if it fails, each question alone (its error, if any, is its own)."""
        if not items:
            return []
        try:
            return list(self.answerer.answer_batch(items))
        except Exception as err:  # noqa: BLE001 - retried per question below
            if len(items) == 1:
                return [err]
        out: list[Any] = []
        for item in items:
            try:
                out.append(self.answerer.answer_batch([item])[0])
            except Exception as err:  # noqa: BLE001 - delivered to that request only
                out.append(err)
        return out

    def _answer_jobs(self, jobs: Sequence[Job]) -> None:
        t1 = time.perf_counter()
        questions: list[Question] = [job.payload for job in jobs]
        vectors = self._embed([q.question for q in questions])
        t2 = time.perf_counter()
        ready: list[tuple[Job, TimeConstraint | None, Any]] = []
        items: list[AnswerItem] = []
        for job, q, e_q in zip(jobs, questions, vectors):
            if isinstance(e_q, Exception):
                job.finish(error=e_q)
                continue
            try:
                item, constraint, tau = self._prepare(q, e_q)
            except Exception as err:  # noqa: BLE001 - this question only
                job.finish(error=err)
                continue
            items.append(item)
            ready.append((job, constraint, tau))
        rows = self._generate(items)
        t3 = time.perf_counter()
        seq, batch_id = self.kb_seq(), self.batcher.batches
        for (job, constraint, tau), row in zip(ready, rows):
            if isinstance(row, Exception):
                job.finish(error=row)
                continue
            q = job.payload
            try:
                evidence = evidence_from_records(row.records, self.kb, q.top_k, constraint, row.row)
            except Exception as err:  # noqa: BLE001 - this question only
                job.finish(error=err)
                continue
            self._counts[q.kind] += 1
            abstained = bool(row.decision and row.decision["abstained"])
            out = {"answer": None if abstained else row.text, "abstained": abstained, "evidence": evidence,
                   "question_time": q.shown_time, "kb_seq": seq,
                   "timings": {"queue_ms": round((t1 - job.submitted) * 1000, 3),
                               "embed_ms": round((t2 - t1) * 1000, 3), "generate_ms": round((t3 - t2) * 1000, 3),
                               "batch_size": len(jobs), "batch_id": batch_id}, "_tau": tau}
            if row.decision is not None:
                out["p_unanswerable"] = round(row.decision["p_unanswerable"], 4)
            job.finish(out)

    # ---- KB mutations ---------------------------------------------------------------------------
    def _check_index(self, index: int) -> None:
        if index < 0 or index >= self.kb.num_slots():
            raise ApiError(404, f"fact {index} does not exist (valid indices: 0..{self.kb.num_slots() - 1})")
        if self.kb.get(index) is None:
            raise ApiError(404, f"fact {index} was deleted")

    def _writable(self) -> KBLog:
        if self.log is None:
            raise ApiError(403, "fact mutations are disabled on this server (read-only)")
        return self.log

    def _no_duplicate(self, fact: dict, allowed: int | None = None) -> None:
        """Duplicate policy: a fact equal to another live fact is refused (409) with that fact's index."""
        same = self.kb.find(fact)
        if same is not None and same != allowed:
            raise ApiError(409, f"duplicate: this fact equals live fact {same}",
                           [f"body: same head, relation, tail, context and time_window as fact {same}"])

    def _logged(self, kind: str, entry: LogEntry, indices: list[int], client: str | None) -> None:
        self.kb.record(entry)
        if self.audit is not None:
            self.audit.write(entry.seq, kind, indices, client)
        self._counts[kind] += 1
        self._after_change()

    def add_facts(self, facts: list[dict], client: str | None = None) -> dict:
        with self._locked():
            log = self._writable()
            for fact in facts:
                self._no_duplicate(fact)
            encoded = self.kb.encode(facts)  # before the log: a failure here leaves no trace
            entry = log.append("add", self.kb.num_slots(), encoded["facts"])
            ids = self.kb.add(facts, encoded)
            self._logged("add", entry, ids, client)
        return {"indices": ids, "seq": entry.seq}

    def replace_fact(self, index: int, fact: dict, client: str | None = None) -> dict:
        with self._locked():
            log = self._writable()
            self._check_index(index)
            self._no_duplicate(fact, allowed=index)
            encoded = self.kb.encode([fact])
            entry = log.append("replace", index, encoded["facts"])
            self.kb.replace(index, fact, encoded)
            self._logged("replace", entry, [index], client)
        return {"index": index, "seq": entry.seq}

    def delete_fact(self, index: int, client: str | None = None) -> dict:
        with self._locked():
            log = self._writable()
            self._check_index(index)
            entry = log.append("delete", index)
            self.kb.delete(index)
            self._logged("delete", entry, [index], client)
        return {"index": index, "deleted": True, "seq": entry.seq}

    def get_fact(self, index: int) -> dict:
        with self._locked():
            self._check_index(index)
            self._counts["get"] += 1
            return {"index": index, "fact": self.kb.get(index)}

    # ---- status ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._locked():
            kb = self.kb.stats()
            return {"N": self.kb.num_live(), "slots": self.kb.num_slots(), **kb, **self.info,
                    "uptime_s": round(time.time() - self.started, 3),
                    "requests_served": dict(self._counts),
                    "batching": {"max_size": self.batcher.max_size, "max_wait_ms": self.settings.batch_max_wait_ms,
                                 "batches": self.batcher.batches, "batched_answers": self.batcher.batched_jobs},
                    "wal_next_seq": self.log.next_seq if self.log is not None else None,
                    "recovered_at_start": self.recovered}
