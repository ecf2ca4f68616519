"""Gathering concurrent questions into one batched generate(), and the first-come lock around the model.

Why: generation on one request leaves the hardware mostly idle, and with one lock 16 clients queue
for 16 answers in a row. A single worker thread takes the questions waiting in the queue (up to
`max_size`), waits at most `max_wait_s` after the oldest one arrived for more to join, then runs them
as one batch. A lone request is therefore delayed by at most `max_wait_s`.

Why a first-come lock (`FairLock`) rather than `threading.Lock`: the worker releases the model and
takes it again for the next batch at once; a plain lock may let it win every time and starve a KB
edit waiting beside it. With a queue of waiters an edit that asked first runs first, and a batch
formed after an edit was acknowledged takes the lock after that edit released it: it sees the edit.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


class FairLock:
    """A lock granted in the order it was asked for; `acquire(timeout)` gives up after `timeout` s."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: collections.deque[threading.Event] = collections.deque()

    def acquire(self, timeout: float | None = None) -> bool:
        with self._mutex:
            if not self._held and not self._waiters:
                self._held = True
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        if turn.wait(timeout):
            return True
        with self._mutex:  # timed out, unless release() handed it over meanwhile
            if turn.is_set():
                return True
            self._waiters.remove(turn)
            return False

    def release(self) -> None:
        with self._mutex:
            if not self._held:
                raise RuntimeError("FairLock.release: the lock is not held")
            if self._waiters:  # hand over directly: the lock stays held, by the next in line
                self._waiters.popleft().set()
            else:
                self._held = False


@dataclass
class Job:
    """One question waiting for a batch; the worker fills `result` or `error`, then sets `done`."""

    payload: Any
    submitted: float = field(default_factory=time.perf_counter)
    state: str = "queued"  # queued -> running -> done, or queued -> cancelled (the caller gave up)
    started: float = 0.0
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.state = result, error, "done"
        self.done.set()


class Batcher:
    """One worker thread: gathers queued jobs into batches and hands each batch to `run_batch`, which
    must `finish` every job it is given (the worker finishes any it left, with an error)."""

    def __init__(self, run_batch: Callable[[Sequence[Job]], None], max_size: int, max_wait_s: float,
                 name: str = "answer-batcher"):
        if max_size < 1:
            raise ValueError(f"batch max size must be >= 1, got {max_size}")
        if max_wait_s < 0:
            raise ValueError(f"batch max wait must be >= 0, got {max_wait_s}")
        self.run_batch, self.max_size, self.max_wait_s = run_batch, max_size, max_wait_s
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._closed = False
        self.batches = 0
        self.batched_jobs = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, payload: Any) -> Job:
        """Queue one job (it joins the next batch); raises RuntimeError once the batcher is closed."""
        job = Job(payload)
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Withdraw a job that has not started (True); False when it already runs or ran."""
        with self._cond:
            if job.state != "queued":
                return False
            job.state = "cancelled"
            self._queue.remove(job)
            return True

    def wait(self, job: Job, start_timeout: float) -> Any:
        """The job's result (or its error raised here). TimeoutError when no batch took it within
        `start_timeout` s (the job is withdrawn); once started it runs to its end."""
        deadline = job.submitted + start_timeout
        while not job.done.wait(max(0.0, min(0.05, deadline - time.perf_counter()))):
            if time.perf_counter() >= deadline and self.cancel(job):
                raise TimeoutError(f"no batch took the request within {start_timeout:.0f} s")
            if job.state != "queued":  # running: it ends when the batch does (bounded by max_new_tokens)
                job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _next_batch(self) -> list[Job]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return []
            deadline = self._queue[0].submitted + self.max_wait_s  # the oldest waits at most max_wait_s
            while len(self._queue) < self.max_size and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._queue.popleft() for _ in range(min(self.max_size, len(self._queue)))]
            now = time.perf_counter()
            for job in batch:
                job.state, job.started = "running", now
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            try:
                self.run_batch(batch)
            except BaseException as err:  # noqa: BLE001 - delivered to the callers, the worker lives on
                for job in batch:
                    if not job.done.is_set():
                        job.finish(error=err)
            for job in batch:
                if not job.done.is_set():
                    job.finish(error=RuntimeError("the batch ended without an answer for this request"))
            self.batches += 1
            self.batched_jobs += len(batch)

    def close(self, error: BaseException | None = None) -> None:
        """Stop the worker after its current batch; queued jobs end with `error` (idempotent)."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            job.state = "cancelled"
            job.finish(error=error or RuntimeError("batcher closed"))
        if threading.current_thread() is not self._thread:
            self._thread.join()
