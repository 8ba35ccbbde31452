"""Logging for the `cds-service` command: one line per hook call, written to stderr a few times a second.

Why batched: every hook call logs a line, and under load writing each line at once (a system call, during
which the worker's other threads take the GIL) cost about a tenth of a whole no-card hook call, measured with
the benchmark. Lines are written at most `FLUSH_SECONDS` after they are logged; warnings and errors at once,
with everything before them; and everything at exit, and before gunicorn forks a worker (so no line is
written twice).

Two formats (CDS_LOG_FORMAT): `text` (the default, FORMAT) and `json`, one object per line for log shippers
(JsonFormatter). Either way a line logged while a request is answered carries that request's id (see
RequestIdFilter and web/app.py), and the rules on patient data apply to every field: the fields are the
request log's (hook instance, service, status, duration, cards), never a body or an identifier.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, TextIO

import orjson

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLUSH_SECONDS = 0.25
FORMATS = ("text", "json")

# The request log's fields (web/api.py passes them as `extra`), as named in a JSON line.
EXTRA_FIELDS = ("hook_instance", "service", "status", "duration_ms", "cards")


def current_request_id() -> str | None:
    """The id of the request this thread is answering (flask.g.request_id), or None outside a request."""
    try:
        from flask import g, has_request_context
    except ImportError:  # pragma: no cover - flask is a dependency
        return None
    return g.get("request_id") if has_request_context() else None


class RequestIdFilter(logging.Filter):
    """Puts `request_id` on every record (None outside a request), for both formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class TextFormatter(logging.Formatter):
    """FORMAT, with ` requestId=<id>` at the end of a line logged while answering a request."""

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} requestId={request_id}" if request_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, process, and the
    request log's fields when the record has them. An exception is named by its type only (a traceback can
    quote data)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "process": record.process,
        }
        for name in EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
        return orjson.dumps(entry, default=str).decode()


def formatter(log_format: str = "text") -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


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


def configure(level: int = logging.INFO, log_format: str | None = None) -> None:
    """Root logging for the command line: batched stderr, and no caller lookup (our format never shows it).
    Like logging.basicConfig, leaves a root logger that has handlers already (a test harness's) alone.
    `log_format`: text or json (default: CDS_LOG_FORMAT, else text)."""
    if log_format is None:
        log_format = (os.environ.get("CDS_LOG_FORMAT") or "text").strip().lower()
    if not logging.getLogger().handlers:
        try:
            stream: TextIO = open(sys.stderr.fileno(), "w", buffering=64 * 1024, encoding="utf-8",
                                  errors="backslashreplace", closefd=False)
        except (AttributeError, ValueError, OSError):  # stderr replaced by something without a descriptor
            stream = sys.stderr
        handler = BatchedStreamHandler(stream)
        handler.setFormatter(formatter(log_format))
        handler.addFilter(RequestIdFilter())
        logging.basicConfig(level=level, handlers=[handler])
    # The logging HOWTO's "Optimization": finding the caller's file and line walked the stack on every call.
    # Process and thread ids stay: they cost little, and gunicorn's own log format prints %(process)d.
    logging._srcfile = None


def gunicorn_logger_class(log_format: str) -> Any:
    """gunicorn's logger, with its own lines (Booting worker, signals) in `log_format` too."""
    from gunicorn import glogging

    if log_format != "json":
        return glogging.Logger

    class JsonLogger(glogging.Logger):
        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for handler in self.error_log.handlers:
                handler.setFormatter(JsonFormatter())

    return JsonLogger
