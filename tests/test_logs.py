"""The command line's log handler (logs.py): lines batched on a timer, warnings at once, none lost or doubled."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from cds_service.serving.logs import FORMAT, BatchedStreamHandler


@pytest.fixture
def logger_to(tmp_path: Path):
    made = []

    def make(interval: float) -> tuple[logging.Logger, BatchedStreamHandler, Path]:
        path = tmp_path / f"log-{len(made)}.txt"
        handler = BatchedStreamHandler(open(path, "w", buffering=64 * 1024, encoding="utf-8"), interval=interval)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger = logging.getLogger(f"test-logs-{id(handler)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        made.append((logger, handler))
        return logger, handler, path

    yield make
    for logger, handler in made:
        logger.removeHandler(handler)
        handler.close()


def test_info_waits_for_the_timer_warning_goes_at_once_in_order(logger_to) -> None:
    logger, _, path = logger_to(interval=60)
    logger.info("first line")
    assert path.read_text() == ""  # batched, not written per call
    logger.warning("second line")
    lines = path.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["first line", "second line"]


def test_timer_writes_info_lines_soon(logger_to) -> None:
    logger, _, path = logger_to(interval=0.05)
    logger.info("soon")
    deadline = time.monotonic() + 5
    while "soon" not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "soon" in path.read_text()


def test_close_writes_what_is_left(logger_to) -> None:
    logger, handler, path = logger_to(interval=60)
    logger.info("last words")
    handler.close()
    assert "last words" in path.read_text()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_does_not_write_the_parents_lines_again(logger_to) -> None:
    logger, handler, path = logger_to(interval=60)
    logger.info("from the parent")  # still in the buffer when the worker is forked
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            logger.info("from the child")
            handler.flush_now()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    handler.flush_now()
    text = path.read_text()
    assert text.count("from the parent") == 1 and text.count("from the child") == 1


def test_served_log_has_gunicorns_lines_and_no_logging_errors(start_server, tmp_path: Path) -> None:
    """The command's logging set-up must suit the other loggers in the process too (gunicorn's format
    prints the process id)."""
    log = tmp_path / "server.log"
    server = start_server(env={"CDS_TEST_LOG": str(log)}, args=["--dev"], workers=1)
    assert server.url
    deadline = time.monotonic() + 5
    while "Booting worker" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = log.read_text()
    assert "Listening at" in text and "Booting worker" in text
    assert "Logging error" not in text
