"""serving/bridge.py: an RSGI request (as granian gives it) becomes the WSGI environ Flask expects, and the answer
comes back whole; refusals before the app are JSON. The real server is exercised in tests/test_serving.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from cds_service.serving.bridge import Bridge, environ_for, run_wsgi


class Headers:
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def items(self) -> list[tuple[str, str]]:
        return list(self.pairs)

    def get(self, key: str, default: Any = None) -> Any:
        return next((value for name, value in self.pairs if name == key), default)


@dataclass
class Scope:
    headers: Headers
    path: str = "/cds-services/x"
    method: str = "POST"
    query_string: str = ""
    server: str = "127.0.0.1:8080"
    client: str = "10.1.2.3:51000"
    scheme: str = "http"
    http_version: str = "1.1"
    authority: str | None = None
    proto: str = "http"


@dataclass
class Protocol:
    """What granian's RSGI HTTP protocol offers the bridge: the body (whole, or chunk by chunk) and one answer."""

    chunks: list[bytes]
    delay: float = 0.0
    answer: list[Any] = field(default_factory=list)

    async def __call__(self) -> bytes:
        await asyncio.sleep(self.delay)
        return b"".join(self.chunks)

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        for chunk in self.chunks:
            await asyncio.sleep(self.delay)
            yield chunk

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.answer[:] = [status, headers, body]


def echo_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    seen = {key: value for key, value in environ.items() if isinstance(value, str)}
    seen["body"] = environ["wsgi.input"].read().decode()
    start_response("201 Created", [("Content-Type", "application/json"), ("X-Two", "2")])
    return [orjson.dumps(seen)]


def call(bridge: Bridge, scope: Scope, protocol: Protocol) -> tuple[int, dict[str, str], dict[str, Any]]:
    asyncio.run(bridge.__rsgi__(scope, protocol))
    status, headers, body = protocol.answer
    return status, dict(headers), orjson.loads(body)


@pytest.fixture
def bridge():
    made = Bridge(echo_app, threads=2, max_body_bytes=100, max_header_bytes=2000, read_seconds=0.5)
    yield made
    made.close()


def test_environ_follows_pep_3333() -> None:
    scope = Scope(Headers([("host", "cds.example"), ("content-type", "application/json"), ("content-length", "999"),
                           ("x-a", "1"), ("x-a", "2")]), path="/policies/caf\u00e9 x", query_string="a=%20b")
    environ = environ_for(scope, b"abc")
    assert environ["PATH_INFO"] == "/policies/caf\u00e9 x".encode().decode("latin-1")  # bytes as latin-1
    assert environ["QUERY_STRING"] == "a=%20b"
    assert environ["CONTENT_LENGTH"] == "3"  # the body's true length, not what was announced
    assert environ["CONTENT_TYPE"] == "application/json" and "HTTP_CONTENT_TYPE" not in environ
    assert environ["HTTP_X_A"] == "1,2"  # repeated headers joined, as a CGI server does
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"], environ["REMOTE_ADDR"]) == ("127.0.0.1", "8080",
                                                                                       "10.1.2.3")
    assert environ["wsgi.input"].read() == b"abc" and environ["SERVER_PROTOCOL"] == "HTTP/1.1"


def test_http2_authority_is_the_host() -> None:
    environ = environ_for(Scope(Headers([]), authority="cds.example:443", http_version="2"), b"")
    assert environ["HTTP_HOST"] == "cds.example:443" and environ["SERVER_PROTOCOL"] == "HTTP/2"


def test_run_wsgi_collects_the_whole_answer_and_closes_the_iterable() -> None:
    closed = []

    class Answer(list):
        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Any) -> Answer:
        write = start_response("200 OK", [("A", "b")])
        write(b"one,")  # the legacy write() callable
        return Answer([b"two,", b"", b"three"])

    assert run_wsgi(app, environ_for(Scope(Headers([])), b"")) == (200, [("A", "b")], b"one,two,three")
    assert closed == [True]


def test_a_request_reaches_the_app_whole(bridge: Bridge) -> None:
    scope = Scope(Headers([("content-type", "application/json"), ("content-length", "7")]))
    status, headers, seen = call(bridge, scope, Protocol([b'{"a":', b"1}"]))
    assert status == 201 and headers["X-Two"] == "2"
    assert seen["body"] == '{"a":1}' and seen["PATH_INFO"] == "/cds-services/x"


def test_a_chunked_body_is_read_chunk_by_chunk(bridge: Bridge) -> None:
    status, _, seen = call(bridge, Scope(Headers([])), Protocol([b"ab", b"cd"]))
    assert status == 201 and seen["body"] == "abcd" and seen["CONTENT_LENGTH"] == "4"


@pytest.mark.parametrize("headers, chunks, status, error", [
    ([("content-length", "101")], [], 413, "request_entity_too_large"),  # refused before reading
    ([], [b"x" * 60, b"x" * 60], 413, "request_entity_too_large"),  # chunked: refused as it passes the cap
    ([("content-length", "-5")], [], 400, "bad_request"),
    ([("x-pad", "x" * 2100)], [], 431, "request_header_fields_too_large"),
])
def test_refusals_before_the_app_are_json(bridge: Bridge, headers, chunks, status, error) -> None:
    got, answer_headers, body = call(bridge, Scope(Headers(headers)), Protocol(chunks))
    assert (got, body["error"]) == (status, error)
    assert answer_headers["content-type"] == "application/json" and answer_headers["connection"] == "close"
    assert bridge.in_flight == 0


def test_a_body_still_arriving_after_the_deadline_is_refused(bridge: Bridge) -> None:
    got, _, body = call(bridge, Scope(Headers([("content-length", "3")])), Protocol([b"abc"], delay=2.0))
    assert (got, body["error"]) == (408, "request_timeout")


def test_each_answer_is_counted(bridge: Bridge) -> None:
    counted = []
    bridge.on_answered = lambda: counted.append(1)
    call(bridge, Scope(Headers([])), Protocol([b"x"]))
    call(bridge, Scope(Headers([("content-length", "999")])), Protocol([]))
    assert len(counted) == 2


def test_an_app_that_fails_outside_its_error_handlers_gets_a_json_500(caplog) -> None:
    def broken(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("patient Jane Doe")  # what escapes is logged by type only

    bridge = Bridge(broken, threads=1, max_body_bytes=100, max_header_bytes=2000, read_seconds=0.5)
    try:
        status, _, body = call(bridge, Scope(Headers([])), Protocol([b"{}"]))
    finally:
        bridge.close()
    assert (status, body["error"]) == (500, "internal_error")
    assert "RuntimeError" in caplog.text and "Jane" not in caplog.text
