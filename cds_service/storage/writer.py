"""Group commit: one thread per process writes what hook calls hand it, many items per transaction.

Why: a hook call that wrote its own row paid for a transaction of its own (~0.3 ms of CPU through
SQLAlchemy) and, under load, queued for SQLite's single write lock with every other thread of every worker.
Handing the rows to one writer per process turns N transactions into one and leaves the lock to two
contenders (the workers' writers) instead of all threads.

What goes through it is fire-and-forget (cards issued, the invocation log): the hook call answers at once; the
row is written within `interval` seconds. Queuing one wakes nobody (waking the writer per row cost more CPU than
the row's share of the transaction). Rows that fail because the database is down are kept (up to `max_parked`)
and tried again after a pause. Rows the database can never hold (too long, a NUL character, a constraint) are the
write function's to drop: it returns only what is worth another try, so one bad row never holds the others.
(JWT ids went through it too, waited for, until issue 17: the request's own thread now checks them, for a third
of the cost; see Store.remember_jti.)

The thread starts on first use in each process (so after gunicorn's fork) and is drained at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from cds_service import metrics

log = logging.getLogger(__name__)


class Job:
    """One unit of work: what to write, and its place in the order of submission."""

    __slots__ = ("payload", "seq")

    def __init__(self, payload: Any) -> None:
        self.payload = payload
        self.seq = 0


# write(batch) does the jobs of one batch and returns those that failed but are worth another try later.
WriteBatch = Callable[[Sequence[Job]], Sequence[Job]]


class GroupWriter:
    """The writer thread of one process and its queue. `submit` from any thread; `flush` / `close` to wait."""

    def __init__(self, write: WriteBatch, name: str = "db-writer", interval: float = 0.05,
                 max_batch: int = 500, max_parked: int = 10_000, retry_after: float = 2.0) -> None:
        self._write = write
        self._interval = interval
        self._name = name
        self._max_batch = max_batch
        self._max_parked = max_parked
        self._retry_after = retry_after
        self._pid = -1
        self._reset()

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` to the counter `name` (e.g. dropped_invalid: records refused for good)."""
        with self._stats_lock:
            self._stats[name] += n
        if name.startswith("dropped_"):
            metrics.RECORDS_DROPPED.labels(name[len("dropped_"):]).inc(n)
        elif name == "failed_batches":
            metrics.DB_ERRORS.inc(n)

    @property
    def stats(self) -> dict[str, int]:
        """The counters of this process's writer: dropped_invalid (records that can never be stored, dropped),
        dropped_overflow (records dropped to bound memory while the database was down), failed_batches."""
        with self._stats_lock:
            return {"dropped_invalid": 0, "dropped_overflow": 0, "failed_batches": 0, **self._stats}

    @property
    def dropped_invalid(self) -> int:
        return self.stats["dropped_invalid"]

    def _reset(self) -> None:
        """Fresh state for this process (a forked child inherits the parent's objects but not its thread)."""
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._stats_lock = threading.Lock()
        self._stats: Counter[str] = Counter()
        self._queue: deque[Job] = deque()
        self._parked: list[Job] = []
        self._retry_at = 0.0
        self._submitted = 0
        self._finished = 0  # every job with seq <= this has been tried at least once
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._depth = 0  # items (card records, log rows) submitted and not yet written or dropped

    @property
    def depth(self) -> int:
        """Items waiting in this process's writer: queued, in the batch being written, or parked."""
        return self._depth

    def _add_depth(self, n: int) -> None:
        """Under self._cond. Mirrored in a gauge, which also tells the master what a killed worker lost."""
        self._depth += n
        metrics.WRITER_DEPTH.set(self._depth)

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():
            self._reset()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
            atexit.register(self.close)

    def submit(self, payload: Any) -> Job:
        job = Job(payload)
        with self._lock_for_submit():
            self._submitted += 1
            job.seq = self._submitted
            self._queue.append(job)
            self._add_depth(_size(job))
        return job

    def _lock_for_submit(self) -> threading.Condition:
        if self._thread is None or self._pid != os.getpid():
            with _START_LOCK:
                self._ensure_thread()
        return self._cond

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every job submitted so far is done: written, or refused for good. False on time-out
        (rows may be waiting for the database to come back)."""
        if self._thread is None or self._pid != os.getpid():
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._cond.notify_all()  # the writer starts now instead of at its next interval
            while self._finished < target or self._parked:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (one more try for parked rows), then stop the thread."""
        if self._thread is None or self._pid != os.getpid():
            return
        with self._cond:
            self._retry_at = 0.0
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._parked or self._queue:
            log.error("%s: %d job(s) could not be written before exit", self._name,
                      len(self._parked) + len(self._queue))

    def _take(self) -> list[Job] | None:
        with self._cond:
            while True:
                retry_due = self._parked and time.monotonic() >= self._retry_at
                if self._queue or retry_due:
                    break
                if self._stopping:
                    return None
                wait = self._interval if not self._parked else min(self._interval, self._retry_at - time.monotonic())
                self._cond.wait(max(0.0, wait))
            batch: list[Job] = []
            if retry_due:
                batch, self._parked = self._parked, []
            while self._queue and len(batch) < self._max_batch:
                batch.append(self._queue.popleft())
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                again = list(self._write(batch))
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any one batch
                log.error("%s: a batch of %d job(s) failed: %s", self._name, len(batch), type(exc).__name__)
                self.count("failed_batches")
                again = []
            with self._cond:
                if again:
                    self._park(again)
                    metrics.DB_ERRORS.inc()
                self._add_depth(-sum(_size(job) for job in batch) + sum(_size(job) for job in again))
                self._finished = max([self._finished] + [job.seq for job in batch])
                self._cond.notify_all()
            if self._stopping and again:
                return  # one more try was made; nothing left to wait for

    def _park(self, jobs: list[Job]) -> None:
        parked = self._parked + jobs
        if len(parked) > self._max_parked:
            dropped = len(parked) - self._max_parked
            self.count("dropped_overflow", dropped)
            log.error("%s: database unavailable; %d queued job(s) dropped to bound memory", self._name, dropped)
            self._add_depth(-sum(_size(job) for job in parked[:dropped]))
            parked = parked[dropped:]
        self._parked = parked
        self._retry_at = time.monotonic() + self._retry_after


def _size(job: Job) -> int:
    """Items in a job: the rows of a card job (a list), else one."""
    return len(job.payload) if isinstance(job.payload, list) else 1


_START_LOCK = threading.Lock()
