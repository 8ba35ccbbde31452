"""From granian's RSGI protocol to the Flask (WSGI) app: the whole request is read first, then one thread runs it.

Why not granian's own WSGI interface: it hands a request to a Python thread as soon as the headers are in and that
thread then reads the body from the socket, so a client that trickles its body holds the thread (issue 13,
finding 3). Why not an ASGI-to-WSGI adapter (a2wsgi): it streams the body and every part of the answer between
the event loop and the thread, and measured as costly per call as gunicorn's own thread worker (bench/RESULTS.md).

Here the body is awaited on the worker's event loop, where a slow client costs a pending read and no thread, under
the size cap (a Content-Length over it is refused before a byte is read) and the read deadline; only a complete
request is handed to a thread, once, and its answer comes back whole (every response of this service is small).
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from granian.rsgi import ProtocolClosed

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Answer = tuple[int, list[tuple[str, str]], bytes]

JSON = ("content-type", "application/json")
CLOSE = ("connection", "close")


def json_error(status: int, error: str, message: str) -> Answer:
    """A refusal of the server itself, in the JSON shape the API's own errors have; the connection is closed
    after it (the rest of the request, if any, is never read)."""
    return status, [JSON, CLOSE], orjson.dumps({"error": error, "message": message})


class BodyTooLarge(Exception):
    pass


def environ_for(scope: Any, body: bytes) -> dict[str, Any]:
    """The WSGI environ (PEP 3333) of an RSGI request scope and its complete body."""
    host, _, port = scope.server.rpartition(":")
    client = scope.client.rpartition(":")[0] if ":" in scope.client else scope.client
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope.method,
        "SCRIPT_NAME": "",
        # RSGI gives the path percent-decoded as text; WSGI wants those bytes as latin-1 (PEP 3333, "native strings").
        "PATH_INFO": scope.path.encode("utf-8", "surrogateescape").decode("latin-1"),
        "QUERY_STRING": scope.query_string,
        "SERVER_NAME": host.strip("[]"),
        "SERVER_PORT": port,
        "SERVER_PROTOCOL": f"HTTP/{scope.http_version}",
        "REMOTE_ADDR": client.strip("[]"),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.scheme,
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for name, value in scope.headers.items():
        key = name.upper().replace("-", "_")
        if key == "CONTENT_LENGTH":
            continue  # the body's true length is set above
        if key != "CONTENT_TYPE":
            key = "HTTP_" + key
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    if "HTTP_HOST" not in environ and scope.authority:  # HTTP/2 names the host in :authority
        environ["HTTP_HOST"] = scope.authority
    return environ


def run_wsgi(app: WsgiApp, environ: dict[str, Any]) -> Answer:
    """Call the WSGI app and collect its whole answer (on a pool thread)."""
    started: list[Any] = []
    written: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, headers]
        return written.append

    result = app(environ, start_response)
    try:
        for chunk in result:
            if chunk:
                written.append(chunk)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started
    return int(status[:3]), headers, b"".join(written)


class Bridge:
    """The RSGI callable of one worker: reads each request whole, then runs `app` on one of `threads` threads.

    `in_flight` counts the requests being read or answered, for the worker's graceful stop; `on_answered` is
    called after each answer (the worker's request count, for --max-requests)."""

    def __init__(self, app: WsgiApp, threads: int, max_body_bytes: int, max_header_bytes: int, read_seconds: float,
                 on_answered: Callable[[], None] | None = None) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.read_seconds = read_seconds
        self.on_answered = on_answered
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cds-request")
        self.in_flight = 0

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":  # no websockets here
            return
        self.in_flight += 1  # only the event loop's thread counts
        try:
            status, headers, body = await self._answer(scope, protocol)
            try:
                protocol.response_bytes(status, headers, body)
            except ProtocolClosed:
                pass  # the client went away: nothing to send it to
        finally:
            self.in_flight -= 1
        if self.on_answered is not None:
            self.on_answered()

    async def _answer(self, scope: Any, protocol: Any) -> Answer:
        if sum(len(name) + len(value) + 4 for name, value in scope.headers.items()) > self.max_header_bytes:
            return json_error(431, "request_header_fields_too_large",
                              f"the request headers are over {self.max_header_bytes} bytes")
        declared = scope.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return json_error(400, "bad_request", "Content-Length is not a number")
            if int(declared) > self.max_body_bytes:
                return json_error(413, "request_entity_too_large",
                                  f"the request body is over {self.max_body_bytes} bytes")
        try:
            read = protocol() if declared is not None else self._read(protocol)  # one read when the length is known
            body = await asyncio.wait_for(read, self.read_seconds)
        except BodyTooLarge:
            return json_error(413, "request_entity_too_large", f"the request body is over {self.max_body_bytes} bytes")
        except asyncio.TimeoutError:
            return json_error(408, "request_timeout",
                              f"the request did not arrive within {self.read_seconds:g} seconds")
        except Exception:  # the client went away or sent a malformed body (granian's RSGIProtocolError)
            return json_error(400, "bad_request", "the request body could not be read")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, run_wsgi, self.app, environ_for(scope, body))
        except Exception as exc:  # noqa: BLE001 - the app answers its own errors; this is what escaped it
            log.error("the application raised %s outside its error handlers", type(exc).__name__)
            return json_error(500, "internal_error", "the service failed to answer; this is logged")

    async def _read(self, protocol: Any) -> bytes:
        """The whole body, refused past the cap as it arrives (a chunked body announces no length)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in protocol:
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Wait for the requests running on the threads, then end the threads."""
        self.pool.shutdown(wait=True)
