"""How `cds-service serve` serves: gunicorn's master process, granian's HTTP server inside each worker.

gunicorn is the process manager: it binds the socket, forks the workers (the app is loaded before the fork, see
cli.py), restarts a worker that dies, runs `worker_exit` (the card writer's flush) and `child_exit` (what a killed
worker lost), recycles workers (--max-requests) and stops them gracefully on SIGTERM and SIGHUP.

Each worker serves gunicorn's socket with granian's HTTP/1.1 server (Rust: hyper on tokio) through its RSGI
interface and `bridge.Bridge`: the connection, the request line and headers (under their own read deadline) and
the body (awaited on the worker's event loop, under the size cap and the read deadline) are read without a Python
thread; only a complete request is handed to one of the worker's threads, which runs the Flask app. A client that
trickles its request costs an open socket and a pending read, never a thread (issue 13, finding 3). It is also
cheaper: a no-op Flask app cost 0.35 ms of worker CPU per call served this way against 0.62 ms under gunicorn's own
thread worker, and the service's common call 0.70 ms against 0.99 ms under waitress (bench/RESULTS.md, issue 17).

granian is used below its command line (gunicorn, not granian, manages the processes), through the same calls its
own embedded server makes; the version is pinned in pyproject.toml for that reason, and tests/test_serving.py
exercises every part of it against the real server.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

from granian import _granian
from granian._futures import _future_watcher_wrapper, _new_cbscheduler  # granian's embedded server's own calls
from granian.server.common import HTTP1Settings
from gunicorn.workers.base import Worker

from cds_service.serving.bridge import Bridge

HEARTBEAT_SECONDS = 1.0  # how often a worker tells the master it is alive
MAX_CONNECTIONS = 1000  # requests a worker reads or answers at once (each one is a pending read, not a thread)
MAX_HEADER_BYTES = 64 * 1024  # request headers over this are refused (431, JSON)
BACKLOG = 2048
# granian's internals, as its own embedded server calls them (their shipped type stubs lag behind them)
RSGIWorker: Any = _granian.RSGIWorker
SocketHolder: Any = _granian.SocketHolder
WorkerSignal: Any = _granian.WorkerSignal
HTTP1_BUFFER_BYTES = 417_792  # granian's default: a request head over it is refused by the HTTP layer itself (431)
DEFER_ACCEPT_SECONDS = 5  # how long the kernel holds a connection that sends nothing before handing it over


class GranianWorker(Worker):
    """A gunicorn worker that serves its socket with granian and `Bridge` (see the module's docstring).

    Set `max_body_bytes` and `request_read_seconds` on the class (cli.py does, from the settings) before
    gunicorn starts."""

    max_body_bytes = 2 * 1024 * 1024
    request_read_seconds = 30.0

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        limit = self.max_requests if self.max_requests < sys.maxsize else 0
        served = 0

        def answered() -> None:
            nonlocal served
            served += 1
            if limit and served == limit:
                self.log.info("Autorestarting worker after current request (max requests: %d)", limit)
                self.alive = False

        bridge = Bridge(self.wsgi, self.cfg.threads, self.max_body_bytes, MAX_HEADER_BYTES, self.request_read_seconds,
                        answered)
        signal = WorkerSignal()
        stopped: asyncio.Future[None] = loop.create_future()

        def granian_stopped() -> None:  # on a thread of granian's
            loop.call_soon_threadsafe(lambda: None if stopped.done() else stopped.set_result(None))

        signal.add_cb(granian_stopped)
        http1 = HTTP1Settings(header_read_timeout=int(self.request_read_seconds * 1000), keep_alive=True,
                              max_buffer_size=HTTP1_BUFFER_BYTES, pipeline_flush=False)
        listener = self.sockets[0].sock  # cli.py binds one address
        # A connection is handed to a worker only once its first bytes have arrived: a worker told to stop then
        # never closes, unanswered, a connection it accepted a moment before its request came in.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_SECONDS)
        server = RSGIWorker(
            self.age, (None, SocketHolder(listener.fileno(), False, BACKLOG)), None,
            1, 512, 1, 30, MAX_CONNECTIONS,  # runtime threads, their blocking threads (made on demand), Python
            "1", http1, None, False, None,  # callback threads, their idle timeout, backpressure; HTTP/1 only, no
            # websockets, no static files;
            False, None, None, None, "tls1.3", None, [], False,  # no TLS (a proxy in front terminates it)
            (None, None))  # no granian metrics
        server.serve_async(_new_cbscheduler(loop, _future_watcher_wrapper(bridge.__rsgi__), impl_asyncio=True),
                           loop, signal)
        try:
            loop.run_until_complete(self._until_stopped(signal, stopped))
            loop.run_until_complete(self._drain(bridge))
        finally:
            bridge.close()
            loop.close()

    async def _until_stopped(self, signal: Any, stopped: asyncio.Future[None]) -> None:
        """Heartbeat until gunicorn asks the worker to stop (SIGTERM, SIGHUP, --max-requests) or the master is gone;
        then stop granian accepting."""
        while self.alive and not stopped.done():
            self.notify()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                break
            await asyncio.sleep(HEARTBEAT_SECONDS)
        signal.set()

    async def _drain(self, bridge: Bridge) -> None:
        """Graceful stop: finish and send what is in progress, for at most gunicorn's graceful timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.graceful_timeout
        await asyncio.sleep(0.05)  # a request granian accepted just before it stopped reaches the bridge
        while bridge.in_flight and loop.time() < deadline:
            self.notify()
            await asyncio.sleep(0.05)
