"""How `cds-service serve` serves: gunicorn's master process, waitress inside each worker.

Why this design: under gunicorn's own thread worker a connection is handed to a worker thread as soon as it
is readable, and that thread then reads the request body from the socket. A client that announces a body
and trickles it a byte at a time holds the thread for as long as it likes (issue 13, finding 3): a dozen such
sockets, no token needed, held every thread of every worker.

Waitress reads every request (line, headers and the whole body, chunked or not) in its event loop, on no
thread of the application, and hands a request to a thread only once it has arrived complete. A slow client
costs an open socket, never a thread. It also refuses, before reading it, a body larger than
CDS_MAX_BODY_BYTES (Content-Length) and stops reading a chunked one at that size.

gunicorn stays the process manager: it binds the socket, forks the workers (the app is loaded before
the fork, see cli.py), restarts a worker that dies, runs `worker_exit` (the card writer's flush) and
stops the workers gracefully on SIGTERM. This module is the worker class that runs waitress's loop in each
worker on the sockets gunicorn bound.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from gunicorn.workers.base import Worker
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

HEARTBEAT_SECONDS = 1.0  # how often a worker tells the master it is alive
IDLE_CONNECTION_SECONDS = 30  # a connection with nothing happening on it is closed after this
MAX_CONNECTIONS = 1000  # open connections per worker (each one is a socket, not a thread)
MAX_HEADER_BYTES = 64 * 1024  # request line and headers together (431 beyond)
JUST_ACCEPTED_SECONDS = 0.5  # at a graceful stop, a connection this fresh is waited for (see _busy)


class JsonErrorTask(ErrorTask):
    """Waitress's own refusals (a body over the cap, malformed headers) as the JSON errors the API uses."""

    def execute(self) -> None:
        error = self.request.error
        code = error.reason.lower().replace(" ", "_")
        message = str(error.body or error.reason).strip()
        body = orjson.dumps({"error": code, "message": message})
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class Channel(HTTPChannel):
    """A connection. Remembers when the request it is reading began, for the read deadline."""

    error_task_class = JsonErrorTask
    reading_since = 0.0

    def received(self, data: bytes) -> bool:
        if data and self.request is None:
            self.reading_since = time.monotonic()
        return super().received(data)


def close_overdue(socket_map: dict[int, Any], now: float, limit: float) -> int:
    """Close the connections that have spent more than `limit` seconds sending one request; their number.

    Such a client holds no thread, but each holds a connection, and there are MAX_CONNECTIONS of those."""
    closed = 0
    for channel in list(socket_map.values()):
        if isinstance(channel, Channel) and channel.request is not None and not channel.will_close \
                and now - channel.reading_since > limit:
            channel.will_close = True  # closed by the loop's next pass
            closed += 1
    return closed


def _connection_limit() -> int:
    """MAX_CONNECTIONS, or fewer when the process may not open that many files (waitress also needs some)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - 64))


def waitress_settings(threads: int, max_body_bytes: int) -> dict[str, Any]:
    """The waitress adjustments of one worker."""
    return {
        "threads": threads,
        "max_request_body_size": max_body_bytes,
        "max_request_header_size": MAX_HEADER_BYTES,
        "connection_limit": _connection_limit(),
        "channel_timeout": IDLE_CONNECTION_SECONDS,
        "cleanup_interval": 5,
        "asyncore_use_poll": True,  # select() cannot watch descriptors above 1023
        "ident": "",  # no Server header
        "expose_tracebacks": False,
    }


class WaitressWorker(Worker):
    """A gunicorn worker that serves its sockets with waitress (see the module's docstring).

    Set `max_body_bytes` and `request_read_seconds` on the class (cli.py does, from the settings) before
    gunicorn starts.
    """

    max_body_bytes = 2 * 1024 * 1024
    request_read_seconds = 30.0

    def _recycled_after(self, limit: int) -> Callable[..., Iterable[bytes]]:
        return _recycling_app(self, self.wsgi, limit)

    def run(self) -> None:
        # "Task queue depth is N" at every request that waits for a thread: under load a warning per call
        # (and, warnings being flushed at once, a write per call); a full queue is what the bench measures.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        socket_map: dict[int, Any] = {}
        app = self.wsgi if self.max_requests >= sys.maxsize else self._recycled_after(self.max_requests)
        server = create_server(app, map=socket_map, sockets=[listener.sock for listener in self.sockets],
                               **waitress_settings(self.cfg.threads, self.max_body_bytes))
        listeners = [d for d in socket_map.values() if isinstance(d, BaseWSGIServer)]
        for listener in listeners:
            listener.channel_class = Channel
        dispatcher = server.task_dispatcher
        beat = 0.0
        try:
            while self.alive:
                now = time.monotonic()
                if now - beat >= HEARTBEAT_SECONDS:
                    self.notify()
                    beat = now
                    close_overdue(socket_map, now, self.request_read_seconds)
                    if self.ppid != os.getppid():  # the master is gone
                        self.log.info("Parent changed, shutting down: %s", self)
                        break
                wasyncore.loop(timeout=HEARTBEAT_SECONDS, map=socket_map, use_poll=True, count=1)
            # Graceful stop: accept nothing new, finish and send what is in progress, then close.
            for listener in listeners:
                listener.accepting = False
                listener.del_channel()
            deadline = time.monotonic() + self.cfg.graceful_timeout
            while time.monotonic() < deadline and _busy(socket_map, dispatcher):
                self.notify()
                wasyncore.loop(timeout=0.1, map=socket_map, use_poll=True, count=1)
        finally:
            dispatcher.shutdown(cancel_pending=True, timeout=5)
            wasyncore.close_all(socket_map)


def _recycling_app(worker: Any, app: Callable[..., Iterable[bytes]], limit: int) -> Callable[..., Iterable[bytes]]:
    """`app`, counting requests; after `limit` of them the worker stops gracefully (gunicorn's --max-requests,
    which gunicorn leaves to each worker class) and the master starts a fresh one."""
    lock = threading.Lock()
    served = [0]

    def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return app(environ, start_response)
        finally:
            with lock:
                served[0] += 1
                due = served[0] == limit
            if due:
                worker.log.info("Autorestarting worker after current request (max requests: %d)", limit)
                worker.alive = False

    return counted


def _busy(socket_map: dict[int, Any], dispatcher: Any) -> bool:
    """True while a request is being answered, read, or an answer is still being sent; or while a connection
    accepted a moment ago (its request surely on its way) has not yet sent it. A keep-alive connection idle
    for longer is closed: waiting for it would hold the stop for up to IDLE_CONNECTION_SECONDS."""
    if dispatcher.queue or dispatcher.active_count:
        return True
    now = time.time()
    return any(isinstance(c, HTTPChannel) and (c.requests or c.total_outbufs_len or c.request is not None
                                               or now - c.last_activity < JUST_ACCEPTED_SECONDS)
               for c in socket_map.values())
