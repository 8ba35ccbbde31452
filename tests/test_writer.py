"""The group-commit writer (writer.py) on its own, with a write function standing in for the database."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest

from cds_service.storage.writer import GroupWriter


class Recorder:
    """A write function: remembers each batch; `down` makes the jobs of a batch come back for another try."""

    def __init__(self) -> None:
        self.batches: list[list[object]] = []
        self.down = False
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, jobs):
        self.gate.wait(5)
        self.batches.append([job.payload for job in jobs])
        return list(jobs) if self.down else []

    def written(self) -> list[object]:
        return [payload for batch in self.batches for payload in batch]


def test_a_job_is_written_and_flush_waits_for_it() -> None:
    write = Recorder()
    writer = GroupWriter(write)
    writer.submit("a")
    assert writer.flush(timeout=5) is True
    assert write.written() == ["a"] and writer.depth == 0
    writer.close()


def test_jobs_queued_during_a_write_go_in_one_batch() -> None:
    write = Recorder()
    writer = GroupWriter(write)
    write.gate.clear()  # hold the writer inside its first batch
    writer.submit("first")
    deadline = time.monotonic() + 5
    while writer._queue and time.monotonic() < deadline:  # the writer has taken "first" and waits at the gate
        time.sleep(0.001)
    for i in range(20):
        writer.submit(i)
    write.gate.set()
    assert writer.flush(timeout=5) is True
    assert len(write.batches) == 2 and write.batches[1] == list(range(20))  # one transaction, not twenty
    writer.close()


def test_the_writer_survives_an_error_in_a_write() -> None:
    calls = []

    def write(jobs):
        calls.append([job.payload for job in jobs])
        if len(calls) == 1:
            raise RuntimeError("boom")
        return []

    writer = GroupWriter(write)
    writer.submit("a")
    assert writer.flush(timeout=5) is True
    writer.submit("b")
    assert writer.flush(timeout=5) is True
    assert calls == [["a"], ["b"]] and writer.stats["failed_batches"] == 1
    writer.close()


def test_rows_kept_while_down_are_written_when_back() -> None:
    write = Recorder()
    write.down = True
    writer = GroupWriter(write, retry_after=0.05)
    writer.submit("card-1")
    assert writer.flush(timeout=0.2) is False
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


def _child(writer: GroupWriter, write: Recorder, queue) -> None:
    writer.submit("from-child")
    queue.put((os.getpid(), writer.flush(timeout=5), write.written()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_its_own_thread() -> None:
    write = Recorder()
    writer = GroupWriter(write)
    writer.submit("from-parent")
    assert writer.flush(timeout=5) is True  # the parent's thread is running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(writer, write, queue))
    child.start()
    pid, flushed, written = queue.get(timeout=10)
    child.join(10)
    assert child.exitcode == 0 and pid != os.getpid() and flushed is True
    assert written == ["from-parent", "from-child"]  # the child's own thread wrote its job
    assert write.written() == ["from-parent"]
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
