"""The group-commit writer (writer.py) on its own, with a write function standing in for the database."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest

from cds_service.storage.writer import GroupWriter, Job


class Recorder:
    """A write function: remembers each batch; payloads named in `refuse` fail for good, `down` makes the
    fire-and-forget jobs of a batch come back for another try."""

    def __init__(self) -> None:
        self.batches: list[list[object]] = []
        self.down = False
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, jobs):
        self.gate.wait(5)
        self.batches.append([job.payload for job in jobs])
        if self.down:
            for job in jobs:
                if job.waited:
                    job.finish(error=ConnectionError("down"))
            return [job for job in jobs if not job.waited]
        for job in jobs:
            job.finish(result=("written", job.payload))
        return []

    def written(self) -> list[object]:
        return [payload for batch in self.batches for payload in batch]


def test_waited_job_gets_its_result_after_the_write() -> None:
    write = Recorder()
    writer = GroupWriter(write)
    assert writer.submit("a", waited=True).wait(5) == ("written", "a")
    writer.close()


def test_jobs_queued_during_a_write_go_in_one_batch() -> None:
    write = Recorder()
    writer = GroupWriter(write)
    write.gate.clear()  # hold the writer inside its first batch
    writer.submit("first")
    deadline = time.monotonic() + 5
    while writer._queue and time.monotonic() < deadline:  # the writer has taken "first" and waits at the gate
        time.sleep(0.001)
    jobs = [writer.submit(i, waited=True) for i in range(20)]
    write.gate.set()
    assert [job.wait(5)[1] for job in jobs] == list(range(20))
    assert len(write.batches) == 2 and write.batches[1] == list(range(20))  # one transaction, not twenty
    writer.close()


def test_error_in_write_reaches_waiting_callers_and_the_writer_survives() -> None:
    calls = []

    def write(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("boom")
        for job in jobs:
            job.finish(result="ok")
        return []

    writer = GroupWriter(write)
    with pytest.raises(RuntimeError):
        writer.submit("a", waited=True).wait(5)
    assert writer.submit("b", waited=True).wait(5) == "ok"
    writer.close()


def test_rows_kept_while_down_are_written_when_back() -> None:
    write = Recorder()
    write.down = True
    writer = GroupWriter(write, retry_after=0.05)
    writer.submit("card-1")
    assert writer.flush(timeout=0.2) is False
    with pytest.raises(ConnectionError):
        writer.submit("jti-1", waited=True).wait(5)  # a waited job is answered, not kept
    write.down = False
    assert writer.flush(timeout=5) is True
    assert write.batches[-1] == ["card-1"]
    writer.close()


def test_parked_rows_are_bounded() -> None:
    write = Recorder()
    write.down = True
    writer = GroupWriter(write, retry_after=60, max_parked=3)
    for i in range(10):
        writer.submit(i)
        writer.flush(timeout=0.05)
    assert [job.payload for job in writer._parked] == [7, 8, 9]  # the newest kept, memory bounded
    writer.close(timeout=0.5)


def test_close_writes_what_is_queued() -> None:
    write = Recorder()
    writer = GroupWriter(write)
    write.gate.clear()
    for i in range(100):
        writer.submit(i)
    write.gate.set()
    writer.close()
    assert write.written() == list(range(100))


def test_flush_without_any_job_returns_at_once() -> None:
    writer = GroupWriter(Recorder())
    assert writer.flush(timeout=0) is True


def _child(writer: GroupWriter, queue) -> None:
    job: Job = writer.submit("from-child", waited=True)
    queue.put((os.getpid(), job.wait(5)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_its_own_thread() -> None:
    write = Recorder()
    writer = GroupWriter(write)
    assert writer.submit("from-parent", waited=True).wait(5)  # the parent's thread is running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(writer, queue))
    child.start()
    pid, result = queue.get(timeout=10)
    child.join(10)
    assert child.exitcode == 0 and pid != os.getpid() and result == ("written", "from-child")
    writer.close()


def test_the_writer_counts_what_it_drops() -> None:
    """Records dropped for good are counted where an operator can read them (Store.stats reads these)."""
    write = Recorder()
    write.down = True
    writer = GroupWriter(write, retry_after=60, max_parked=3)
    assert writer.stats == {"dropped_invalid": 0, "dropped_overflow": 0, "failed_batches": 0}
    for i in range(10):
        writer.submit(i)
        writer.flush(timeout=0.05)
    assert writer.stats["dropped_overflow"] == 7
    writer.count("dropped_invalid", 2)
    assert writer.dropped_invalid == 2 and writer.stats["dropped_invalid"] == 2
    writer.close(timeout=0.5)
