"""Logging for the `cds-service` command: one line per hook call, written to stderr a few times a second.

Why batched: every hook call logs a line, and under load writing each line at once (a system call, during
which the worker's other threads take the GIL) cost about a tenth of a whole no-card hook call, measured with
the benchmark. Lines are written at most `FLUSH_SECONDS` after they are logged; warnings and errors at once,
with everything before them; and everything at exit, and before gunicorn forks a worker (so no line is
written twice).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLUSH_SECONDS = 0.25


class BatchedStreamHandler(logging.StreamHandler):
    """A StreamHandler on a buffered stream that flushes on a timer rather than after every record."""

    def __init__(self, stream: TextIO, interval: float = FLUSH_SECONDS) -> None:
        super().__init__(stream)
        self.interval = interval
        self._pid = -1  # the process whose flushing thread runs
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=self.flush_now)

    def flush(self) -> None:
        """Called by emit() after every record: deliberately nothing (see flush_now)."""

    def flush_now(self) -> None:
        self.acquire()
        try:
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: nothing left to do with the lines
            pass
        finally:
            self.release()

    def handle(self, record: logging.LogRecord) -> bool:
        if self._pid != os.getpid():
            self._start_flushing()
        emitted = super().handle(record)
        if record.levelno >= logging.WARNING:
            self.flush_now()
        return bool(emitted)

    def _start_flushing(self) -> None:
        self.acquire()
        try:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            threading.Thread(target=self._flush_periodically, name="log-flush", daemon=True).start()
        finally:
            self.release()

    def _flush_periodically(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(self.interval)
            self.flush_now()

    def close(self) -> None:
        self.flush_now()
        super().close()


def configure(level: int = logging.INFO) -> None:
    """Root logging for the command line: batched stderr, and no caller lookup (our format never shows it).
    Like logging.basicConfig, leaves a root logger that has handlers already (a test harness's) alone."""
    if not logging.getLogger().handlers:
        try:
            stream: TextIO = open(sys.stderr.fileno(), "w", buffering=64 * 1024, encoding="utf-8",
                                  errors="backslashreplace", closefd=False)
        except (AttributeError, ValueError, OSError):  # stderr replaced by something without a descriptor
            stream = sys.stderr
        handler = BatchedStreamHandler(stream)
        handler.setFormatter(logging.Formatter(FORMAT))
        logging.basicConfig(level=level, handlers=[handler])
    # The logging HOWTO's "Optimization": finding the caller's file and line walked the stack on every call.
    # Process and thread ids stay: they cost little, and gunicorn's own log format prints %(process)d.
    logging._srcfile = None
